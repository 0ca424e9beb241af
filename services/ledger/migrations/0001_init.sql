-- ledger: accounts, immutable transfers and their postings, holds, payments' refund totals and
-- the idempotency keys of writes. Every row carries tenant_id. Money is BIGINT fen, never float.
--
-- Sign convention: a posting's amount_fen > 0 credits its account (the balance grows), < 0 debits
-- it. A transfer's postings sum to zero, so the sum over all accounts is zero too.

CREATE TABLE accounts (
    account_id    UUID PRIMARY KEY,
    tenant_id     UUID NOT NULL,
    owner_kind    TEXT NOT NULL CHECK (owner_kind IN ('member', 'merchant', 'tenant', 'system')),
    owner_id      TEXT NOT NULL,
    purse_kind    TEXT NOT NULL CHECK (purse_kind IN ('cash', 'subsidy', 'voucher', 'merchant_settlement',
                                                     'bank_clearing', 'subsidy_funding', 'receivable')),
    ref           TEXT NOT NULL DEFAULT '',
    currency      TEXT NOT NULL DEFAULT 'CNY' CHECK (currency = 'CNY'),
    no_overdraft  BOOLEAN NOT NULL,
    -- Sharded accounts (every account that may go below zero: merchants, clearing, funding) keep
    -- their balance in account_shards, so concurrent transfers to one of them do not queue on
    -- one row lock; their posted_fen here stays 0. A no-overdraft purse is never sharded: its
    -- check must see the whole balance in one row.
    sharded       BOOLEAN NOT NULL,
    status        TEXT NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'frozen')),
    -- Derived caches of the postings (tests prove they match); updated only with a posting.
    posted_fen    BIGINT NOT NULL DEFAULT 0,
    pending_fen   BIGINT NOT NULL DEFAULT 0 CHECK (pending_fen >= 0),
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, owner_kind, owner_id, purse_kind, ref),
    CHECK (NOT (no_overdraft AND sharded)),
    -- The last line of defence against an overdraft: whatever the code does, the row refuses it.
    CHECK (NOT no_overdraft OR posted_fen - pending_fen >= 0)
);
CREATE INDEX accounts_by_owner ON accounts (tenant_id, owner_kind, owner_id);

CREATE TABLE account_shards (
    account_id  UUID NOT NULL REFERENCES accounts,
    shard       SMALLINT NOT NULL,
    posted_fen  BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (account_id, shard)
);

CREATE TABLE transfers (
    transfer_id           UUID PRIMARY KEY,
    -- Booking order, for history pages.
    seq                   BIGSERIAL UNIQUE,
    tenant_id             UUID NOT NULL,
    kind                  TEXT NOT NULL CHECK (kind IN ('top_up', 'payment', 'refund', 'hold', 'capture', 'void',
                                                        'expiry', 'subsidy_grant')),
    -- Empty for the transfers the service makes itself (expiry).
    idempotency_key       TEXT NOT NULL,
    amount_fen            BIGINT NOT NULL CHECK (amount_fen > 0),
    merchant_account_id   UUID,
    device_id             TEXT NOT NULL DEFAULT '',
    external_ref          TEXT NOT NULL DEFAULT '',
    original_transfer_id  UUID REFERENCES transfers,
    event_time            TIMESTAMPTZ NOT NULL,
    booked_at             TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX transfers_by_key ON transfers (tenant_id, idempotency_key) WHERE idempotency_key <> '';

CREATE TABLE postings (
    transfer_id  UUID NOT NULL REFERENCES transfers,
    account_id   UUID NOT NULL REFERENCES accounts,
    tenant_id    UUID NOT NULL,
    seq          BIGINT NOT NULL,
    -- The leg's place in its transfer (a refund returns money in reverse leg order).
    leg          SMALLINT NOT NULL,
    amount_fen   BIGINT NOT NULL,
    -- The change of the account's held amount (a hold +, its capture, void or expiry -).
    pending_fen  BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (transfer_id, account_id)
);
CREATE INDEX postings_by_account ON postings (account_id, seq DESC);
CREATE INDEX postings_by_tenant ON postings (tenant_id);

-- Transfers and postings are the record: corrections are new transfers, never edits.
CREATE FUNCTION forbid_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is immutable: % refused', TG_TABLE_NAME, TG_OP USING ERRCODE = 'restrict_violation';
END $$;
CREATE TRIGGER transfers_immutable BEFORE UPDATE OR DELETE ON transfers
    FOR EACH ROW EXECUTE FUNCTION forbid_change();
CREATE TRIGGER transfers_no_truncate BEFORE TRUNCATE ON transfers
    FOR EACH STATEMENT EXECUTE FUNCTION forbid_change();
CREATE TRIGGER postings_immutable BEFORE UPDATE OR DELETE ON postings
    FOR EACH ROW EXECUTE FUNCTION forbid_change();
CREATE TRIGGER postings_no_truncate BEFORE TRUNCATE ON postings
    FOR EACH STATEMENT EXECUTE FUNCTION forbid_change();

-- Checked at commit, once every leg of the transfer is in: its postings sum to zero.
CREATE FUNCTION check_transfer_balanced() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    total BIGINT;
BEGIN
    SELECT sum(amount_fen) INTO total FROM postings WHERE transfer_id = NEW.transfer_id;
    IF total <> 0 THEN
        RAISE EXCEPTION 'transfer % is unbalanced: its postings sum to % fen', NEW.transfer_id, total
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER postings_balanced AFTER INSERT ON postings
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION check_transfer_balanced();

CREATE TABLE holds (
    hold_id                 UUID PRIMARY KEY REFERENCES transfers,
    tenant_id               UUID NOT NULL,
    account_id              UUID NOT NULL REFERENCES accounts,
    merchant_account_id     UUID NOT NULL REFERENCES accounts,
    amount_fen              BIGINT NOT NULL CHECK (amount_fen > 0),
    status                  TEXT NOT NULL CHECK (status IN ('pending', 'captured', 'voided', 'expired')),
    expires_at              TIMESTAMPTZ NOT NULL,
    settled_by_transfer_id  UUID REFERENCES transfers,
    CHECK ((status = 'pending') = (settled_by_transfer_id IS NULL))
);
CREATE INDEX holds_due ON holds (expires_at) WHERE status = 'pending';

-- One row per payment: what it paid and what its refunds returned so far. Refunds lock this row,
-- so two concurrent refunds of one payment cannot both see the same room.
CREATE TABLE payments (
    transfer_id   UUID PRIMARY KEY REFERENCES transfers,
    tenant_id     UUID NOT NULL,
    paid_fen      BIGINT NOT NULL CHECK (paid_fen > 0),
    refunded_fen  BIGINT NOT NULL DEFAULT 0,
    CHECK (refunded_fen BETWEEN 0 AND paid_fen)
);

-- The first result of each write, by its client key: a repeat answers it, a different request
-- under the key is refused. A write that fails rolls its key back with it, so the key stays free.
CREATE TABLE idempotency_keys (
    tenant_id        UUID NOT NULL,
    idempotency_key  TEXT NOT NULL,
    operation        TEXT NOT NULL,
    fingerprint      BYTEA NOT NULL,
    result           JSONB,
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, idempotency_key)
);
