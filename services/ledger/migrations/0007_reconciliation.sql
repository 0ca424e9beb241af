-- Prefunded clearing accounts, top-up reversals, refunds to the bank, the daily reconciliation
-- file per partner, and members' low-balance thresholds (docs/reconciliation.md).

-- The school's bank receipts: one account per tenant (owner the tenant), debited by every funding
-- of a partner's clearing account. It may go below zero without a floor (it stands for money at
-- the school's bank), so it is sharded like the other such accounts.
ALTER TABLE accounts DROP CONSTRAINT accounts_purse_kind_check;
ALTER TABLE accounts ADD CONSTRAINT accounts_purse_kind_check
    CHECK (purse_kind IN ('cash', 'subsidy', 'voucher', 'merchant_settlement', 'bank_clearing', 'subsidy_funding',
                          'receivable', 'bank_receipts'));

ALTER TABLE transfers DROP CONSTRAINT transfers_kind_check;
ALTER TABLE transfers ADD CONSTRAINT transfers_kind_check
    CHECK (kind IN ('top_up', 'payment', 'refund', 'hold', 'capture', 'void', 'expiry', 'subsidy_grant',
                    'subsidy_expiry', 'clawback', 'offline_settlement', 'clearing_funding', 'top_up_reversal',
                    'bank_refund'));

-- What a funding records besides its transfer: the bank transfer's reference and value date. A
-- bank reference funds a clearing account once: the same transfer recorded twice would be money
-- counted twice.
CREATE TABLE clearing_fundings (
    transfer_id     UUID PRIMARY KEY REFERENCES transfers,
    tenant_id       UUID NOT NULL,
    account_id      UUID NOT NULL REFERENCES accounts,
    bank_reference  TEXT NOT NULL CHECK (bank_reference <> ''),
    value_date      DATE NOT NULL,
    UNIQUE (tenant_id, account_id, bank_reference)
);
CREATE TRIGGER clearing_fundings_immutable BEFORE UPDATE OR DELETE ON clearing_fundings
    FOR EACH ROW EXECUTE FUNCTION forbid_change();
CREATE TRIGGER clearing_fundings_no_truncate BEFORE TRUNCATE ON clearing_fundings
    FOR EACH STATEMENT EXECUTE FUNCTION forbid_change();

-- A top-up is reversed at most once, whoever asks and under whatever key.
CREATE UNIQUE INDEX transfers_one_reversal_per_top_up ON transfers (original_transfer_id)
    WHERE kind = 'top_up_reversal';

-- The reconciliation file reads a partner's day by booking time: only the kinds that touch a
-- clearing account are indexed, so the payment path writes no extra index entry.
CREATE INDEX transfers_clearing_by_day ON transfers (tenant_id, booked_at)
    WHERE kind IN ('top_up', 'clearing_funding', 'top_up_reversal', 'bank_refund');

-- A member's cash purse may carry a low-balance threshold: a posting that takes its available
-- balance from at or above it to below it emits ledger.balance.low in the same transaction.
ALTER TABLE accounts ADD COLUMN low_balance_threshold_fen BIGINT
    CONSTRAINT accounts_low_balance_on_cash_only
    CHECK (low_balance_threshold_fen IS NULL OR (low_balance_threshold_fen >= 0 AND purse_kind = 'cash'));
