-- devicehub transactions: settled offline records, access rules and access records, cabinet
-- orders, and the served payments the dining index counts. Every row carries tenant_id and every
-- query names it. The devices table (0001) is read, never written, from here.

-- One row per (device, sequence) the hub received: the first answer, so a re-upload of the same
-- record changes nothing and hears what happened. outcome: the RecordOutcome name, lower case.
CREATE TABLE offline_records (
    tenant_id      UUID NOT NULL,
    device_id      UUID NOT NULL,
    sequence       BIGINT NOT NULL CHECK (sequence >= 1),
    purpose        TEXT NOT NULL,
    outcome        TEXT NOT NULL CHECK (outcome IN ('booked', 'shortfall', 'duplicate', 'code_reused', 'rejected')),
    reason         TEXT NOT NULL DEFAULT '',
    transfer_id    TEXT NOT NULL DEFAULT '',
    shortfall_fen  BIGINT NOT NULL DEFAULT 0,
    -- SHA-256 of the signed record as uploaded: the same sequence with other content is refused.
    record_sha256  BYTEA NOT NULL,
    event_time     TIMESTAMPTZ,
    settled_at     TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (tenant_id, device_id, sequence)
);

-- Per device: the highest sequence received and the ones below it never received (a gap).
-- Uploads of one device lock this row, so they apply one after the other.
CREATE TABLE device_sequences (
    tenant_id   UUID NOT NULL,
    device_id   UUID NOT NULL,
    highest     BIGINT NOT NULL DEFAULT 0,
    missing     BIGINT[] NOT NULL DEFAULT '{}',
    updated_at  TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (tenant_id, device_id)
);

-- The tenant's access rules, every version kept; the highest is current.
CREATE TABLE access_rules (
    tenant_id   UUID NOT NULL,
    version     BIGINT NOT NULL CHECK (version >= 1),
    -- Canonical JSON (sorted keys, no spaces) and its SHA-256, lowercase hex.
    rules_json  TEXT NOT NULL,
    sha256      TEXT NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (tenant_id, version)
);

-- Pass/deny records, online and uploaded; one per (device, nonce).
CREATE TABLE access_records (
    seq          BIGSERIAL UNIQUE,
    tenant_id    UUID NOT NULL,
    device_id    UUID NOT NULL,
    nonce        TEXT NOT NULL,
    member_id    TEXT NOT NULL DEFAULT '',
    location     TEXT NOT NULL DEFAULT '',
    -- 'code', 'card', 'face' or '' (unknown).
    method       TEXT NOT NULL DEFAULT '',
    -- 'access' or 'ride'.
    purpose      TEXT NOT NULL,
    passed       BOOLEAN NOT NULL,
    reason       TEXT NOT NULL,
    rule         TEXT NOT NULL DEFAULT '',
    offline      BOOLEAN NOT NULL,
    event_time   TIMESTAMPTZ NOT NULL,
    recorded_at  TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (tenant_id, device_id, nonce)
);
CREATE INDEX access_records_by_tenant ON access_records (tenant_id, seq);
CREATE INDEX access_records_by_device ON access_records (tenant_id, device_id, seq);
CREATE INDEX access_records_by_member ON access_records (tenant_id, member_id, seq);

-- Vending cabinet orders, by the POS that placed them; holds: the ledger holds, one per plan leg.
CREATE TABLE cabinet_orders (
    tenant_id          UUID NOT NULL,
    pos_device_id      UUID NOT NULL,
    order_id           TEXT NOT NULL,
    cabinet_device_id  UUID NOT NULL,
    request_sha256     BYTEA NOT NULL,
    member_id          TEXT NOT NULL DEFAULT '',
    amount_fen         BIGINT NOT NULL,
    charged_fen        BIGINT NOT NULL DEFAULT 0,
    item               TEXT NOT NULL DEFAULT '',
    stage              TEXT NOT NULL CHECK (stage IN ('held', 'captured', 'voided', 'declined')),
    reason             TEXT NOT NULL DEFAULT '',
    holds              JSONB NOT NULL DEFAULT '[]'::jsonb,
    balances           JSONB NOT NULL DEFAULT '[]'::jsonb,
    created_at         TIMESTAMPTZ NOT NULL,
    updated_at         TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (tenant_id, pos_device_id, order_id)
);

-- Payments booked at a location's POS devices (online and offline), by event time: the dining
-- index counts them. One per transfer; rows older than a day are pruned.
CREATE TABLE served_payments (
    tenant_id    UUID NOT NULL,
    transfer_id  TEXT NOT NULL,
    location     TEXT NOT NULL,
    device_id    UUID NOT NULL,
    event_time   TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (tenant_id, transfer_id)
);
CREATE INDEX served_payments_by_location ON served_payments (tenant_id, location, event_time);
CREATE INDEX served_payments_by_time ON served_payments (event_time);
