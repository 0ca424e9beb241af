-- codegen: tenant issuer keys, phone holder keys, issued credentials (and token batches), the
-- revocation list, and what codegen has learnt of member status from identity's events. Every row
-- carries tenant_id and every key starts with it.

-- One row per tenant that has used codegen: its offline caps and the heads of its two versioned
-- lists. Key changes lock this row, so trust list versions are handed out in commit order; a
-- revocation locks it too, for the revocation list.
CREATE TABLE tenant_state (
    tenant_id                 UUID PRIMARY KEY,
    -- Bounded by the code format's fields: caps in fen are u32, the daily count a u8.
    per_transaction_cap_fen   BIGINT NOT NULL DEFAULT 5000 CHECK (per_transaction_cap_fen BETWEEN 0 AND 4294967295),
    per_day_cap_fen           BIGINT NOT NULL DEFAULT 20000 CHECK (per_day_cap_fen BETWEEN 0 AND 4294967295),
    per_day_count             INT NOT NULL DEFAULT 20 CHECK (per_day_count BETWEEN 0 AND 255),
    trust_version             BIGINT NOT NULL DEFAULT 0,
    revocation_version        BIGINT NOT NULL DEFAULT 0
);

CREATE TABLE issuer_keys (
    tenant_id       UUID NOT NULL REFERENCES tenant_state,
    -- Key ids are a few bytes of SHA-256 and may collide, so the public key is the identity.
    public_key      BYTEA NOT NULL CHECK (length(public_key) = 32),
    key_id          BYTEA NOT NULL,
    -- The 32-byte Ed25519 seed, sealed with a key derived from the master key and this row's
    -- tenant, key id and public key (services/codegen/keys.py). Never stored in the clear.
    sealed_private  BYTEA NOT NULL,
    status          TEXT NOT NULL CHECK (status IN ('signing', 'verifying', 'retired')),
    not_before      TIMESTAMPTZ NOT NULL,
    retire_after    TIMESTAMPTZ,
    -- The trust list version of this key's last change.
    version         BIGINT NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (tenant_id, public_key)
);
CREATE UNIQUE INDEX issuer_keys_one_signing ON issuer_keys (tenant_id) WHERE status = 'signing';
CREATE INDEX issuer_keys_by_version ON issuer_keys (tenant_id, version);
CREATE INDEX issuer_keys_to_retire ON issuer_keys (retire_after) WHERE status = 'verifying';

CREATE TABLE holder_keys (
    tenant_id      UUID NOT NULL,
    public_key     BYTEA NOT NULL CHECK (length(public_key) = 32),
    member_id      UUID NOT NULL,
    status         TEXT NOT NULL CHECK (status IN ('active', 'revoked')),
    registered_at  TIMESTAMPTZ NOT NULL,
    revoked_at     TIMESTAMPTZ,
    PRIMARY KEY (tenant_id, public_key)
);
CREATE INDEX holder_keys_by_member ON holder_keys (tenant_id, member_id);

CREATE TABLE credentials (
    tenant_id          UUID NOT NULL,
    credential_id      UUID NOT NULL,
    member_id          UUID NOT NULL,
    kind               TEXT NOT NULL CHECK (kind IN ('holder', 'token_batch')),
    -- NULL for a token batch.
    holder_public_key  BYTEA,
    issuer_public_key  BYTEA NOT NULL,
    key_id             BYTEA NOT NULL,
    purposes           TEXT[] NOT NULL,
    per_transaction_cap_fen  BIGINT NOT NULL,
    per_day_cap_fen          BIGINT NOT NULL,
    per_day_count            INT NOT NULL,
    not_before         TIMESTAMPTZ NOT NULL,
    not_after          TIMESTAMPTZ NOT NULL CHECK (not_after > not_before),
    issued_at          TIMESTAMPTZ NOT NULL,
    revoked_at         TIMESTAMPTZ,
    PRIMARY KEY (tenant_id, credential_id),
    FOREIGN KEY (tenant_id, issuer_public_key) REFERENCES issuer_keys (tenant_id, public_key)
);
CREATE INDEX credentials_by_member ON credentials (tenant_id, member_id) WHERE revoked_at IS NULL;
CREATE INDEX credentials_by_holder_key ON credentials (tenant_id, holder_public_key) WHERE revoked_at IS NULL;
CREATE INDEX credentials_by_issuer_key ON credentials (tenant_id, issuer_public_key, not_after);

CREATE TABLE revocations (
    tenant_id      UUID NOT NULL REFERENCES tenant_state,
    version        BIGINT NOT NULL,
    credential_id  UUID NOT NULL,
    member_id      UUID NOT NULL,
    revoked_at     TIMESTAMPTZ NOT NULL,
    not_after      TIMESTAMPTZ NOT NULL,
    reason         TEXT NOT NULL,
    PRIMARY KEY (tenant_id, version),
    UNIQUE (tenant_id, credential_id),
    FOREIGN KEY (tenant_id, credential_id) REFERENCES credentials (tenant_id, credential_id)
);

-- The newest member status identity's events told us of. Issuing checks it as well as GetMember,
-- so a credential issued on a stale "active" answer cannot outlive a freeze that codegen has
-- already applied (both sides take the member's advisory lock).
CREATE TABLE member_status (
    tenant_id  UUID NOT NULL,
    member_id  UUID NOT NULL,
    status     TEXT NOT NULL CHECK (status IN ('active', 'frozen', 'left')),
    version    BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, member_id)
);
