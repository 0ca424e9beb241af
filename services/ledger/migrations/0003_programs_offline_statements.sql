-- Subsidy programs and their grant batches, closed purses, offline settlement with receivables,
-- and the indexes daily statements read.

ALTER TABLE accounts DROP CONSTRAINT accounts_status_check;
ALTER TABLE accounts ADD CONSTRAINT accounts_status_check CHECK (status IN ('open', 'frozen', 'closed'));

ALTER TABLE transfers DROP CONSTRAINT transfers_kind_check;
ALTER TABLE transfers ADD CONSTRAINT transfers_kind_check
    CHECK (kind IN ('top_up', 'payment', 'refund', 'hold', 'capture', 'void', 'expiry', 'subsidy_grant',
                    'subsidy_expiry', 'clawback', 'offline_settlement'));

-- A subsidy program or voucher campaign: where its grants come from and when it ends. The row's
-- status moves active -> ending -> ended; the money itself only ever moves by transfers.
CREATE TABLE programs (
    tenant_id           UUID NOT NULL,
    purse_kind          TEXT NOT NULL CHECK (purse_kind IN ('subsidy', 'voucher')),
    ref                 TEXT NOT NULL,
    funding_account_id  UUID NOT NULL REFERENCES accounts,
    ends_at             TIMESTAMPTZ,
    status              TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'ending', 'ended')),
    expired_purses      INTEGER NOT NULL DEFAULT 0,
    expired_fen         BIGINT NOT NULL DEFAULT 0,
    created_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, purse_kind, ref)
);
CREATE INDEX programs_due ON programs (ends_at) WHERE status <> 'ended';

-- A grant run under the tenant's bill number; its rows are settled a chunk per transaction, each
-- chunk's counters and row results committed with the chunk's transfers.
CREATE TABLE grant_batches (
    batch_id      UUID PRIMARY KEY,
    tenant_id     UUID NOT NULL,
    bill_number   TEXT NOT NULL,
    fingerprint   BYTEA NOT NULL,
    purse_kind    TEXT NOT NULL,
    ref           TEXT NOT NULL,
    status        TEXT NOT NULL DEFAULT 'running' CHECK (status IN ('running', 'done')),
    total_rows    INTEGER NOT NULL CHECK (total_rows > 0),
    done_rows     INTEGER NOT NULL DEFAULT 0,
    granted_rows  INTEGER NOT NULL DEFAULT 0,
    failed_rows   INTEGER NOT NULL DEFAULT 0,
    granted_fen   BIGINT NOT NULL DEFAULT 0,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    finished_at   TIMESTAMPTZ,
    UNIQUE (tenant_id, bill_number),
    FOREIGN KEY (tenant_id, purse_kind, ref) REFERENCES programs,
    CHECK (done_rows = granted_rows + failed_rows AND done_rows <= total_rows)
);
CREATE INDEX grant_batches_running ON grant_batches (created_at) WHERE status = 'running';

CREATE TABLE grant_rows (
    batch_id     UUID NOT NULL REFERENCES grant_batches,
    line         INTEGER NOT NULL,
    member_id    TEXT NOT NULL,
    amount_fen   BIGINT NOT NULL CHECK (amount_fen > 0),
    status       TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'granted', 'failed')),
    transfer_id  UUID REFERENCES transfers,
    account_id   UUID REFERENCES accounts,
    reason       TEXT NOT NULL DEFAULT '',
    message      TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (batch_id, line),
    UNIQUE (batch_id, member_id),
    CHECK ((status = 'granted') = (transfer_id IS NOT NULL))
);
CREATE INDEX grant_rows_pending ON grant_rows (batch_id, line) WHERE status = 'pending';

-- What an offline settlement could not take from the member's purses and charged to the
-- member's receivable instead. Immutable, like the transfer it belongs to.
CREATE TABLE shortfalls (
    transfer_id             UUID PRIMARY KEY REFERENCES transfers,
    tenant_id               UUID NOT NULL,
    member_id               TEXT NOT NULL,
    receivable_account_id   UUID NOT NULL REFERENCES accounts,
    shortfall_fen           BIGINT NOT NULL CHECK (shortfall_fen > 0)
);
CREATE TRIGGER shortfalls_immutable BEFORE UPDATE OR DELETE ON shortfalls
    FOR EACH ROW EXECUTE FUNCTION forbid_change();

-- Daily statements: a merchant's or a device's transfers by booking time.
CREATE INDEX transfers_by_merchant_day ON transfers (tenant_id, merchant_account_id, booked_at)
    WHERE merchant_account_id IS NOT NULL;
CREATE INDEX transfers_by_device_day ON transfers (tenant_id, device_id, booked_at) WHERE device_id <> '';
