-- identity: tenants, members and their media, member imports, partner API clients and the
-- directory change feed. Every row that belongs to a tenant carries tenant_id, and every key and
-- index starts with it, so a tenant's data lives together (and can shard together later).

CREATE TABLE tenants (
    tenant_id   UUID PRIMARY KEY,
    name        TEXT NOT NULL,
    kind        TEXT NOT NULL CHECK (kind IN ('enterprise', 'university', 'k12')),
    time_zone   TEXT NOT NULL,
    currency    TEXT NOT NULL CHECK (currency = 'CNY'),
    created_at  TIMESTAMPTZ NOT NULL
);

-- The head of each tenant's feed and card blacklist. Every directory write locks this row first
-- and holds it to commit, so a tenant's writes are serial: numbers are handed out in commit
-- order, and a reader that has seen number n has seen every number below it.
CREATE TABLE directory_heads (
    tenant_id          UUID PRIMARY KEY REFERENCES tenants,
    feed_sequence      BIGINT NOT NULL DEFAULT 0,
    blacklist_version  BIGINT NOT NULL DEFAULT 0
);

CREATE TABLE members (
    tenant_id           UUID NOT NULL REFERENCES tenants,
    member_id           UUID NOT NULL UNIQUE,
    -- Byte order ("C"), so pages sort the same on every server whatever its locale.
    external_number     TEXT COLLATE "C" NOT NULL,
    name                TEXT NOT NULL,
    groups              JSONB NOT NULL DEFAULT '{}'::jsonb,
    status              TEXT NOT NULL CHECK (status IN ('active', 'frozen', 'left')),
    frozen_reason       TEXT NOT NULL DEFAULT '',
    face_enrolment_ref  TEXT NOT NULL DEFAULT '',
    version             BIGINT NOT NULL CHECK (version >= 1),
    created_at          TIMESTAMPTZ NOT NULL,
    updated_at          TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (tenant_id, member_id),
    UNIQUE (tenant_id, external_number)
);
CREATE INDEX members_by_name_prefix ON members (tenant_id, lower(name) text_pattern_ops);

CREATE TABLE cards (
    tenant_id  UUID NOT NULL,
    member_id  UUID NOT NULL,
    card_uid   TEXT COLLATE "C" NOT NULL CHECK (card_uid ~ '^[0-9A-F]{8,20}$'),
    status     TEXT NOT NULL CHECK (status IN ('active', 'lost', 'replaced')),
    bound_at   TIMESTAMPTZ NOT NULL,
    lost_at    TIMESTAMPTZ,
    PRIMARY KEY (tenant_id, member_id, card_uid),
    -- On member_id alone (unique by itself): the two-column key's check got a plan that scanned
    -- the tenant's members per card, which made a first bulk import quadratic.
    FOREIGN KEY (member_id) REFERENCES members (member_id)
);
CREATE UNIQUE INDEX cards_one_active_per_uid ON cards (tenant_id, card_uid) WHERE status = 'active';
CREATE UNIQUE INDEX cards_one_active_per_member ON cards (tenant_id, member_id) WHERE status = 'active';

-- A lost card stays here for good; devices pull it by version.
CREATE TABLE card_blacklist (
    tenant_id  UUID NOT NULL REFERENCES tenants,
    card_uid   TEXT COLLATE "C" NOT NULL,
    member_id  UUID NOT NULL,
    lost_at    TIMESTAMPTZ NOT NULL,
    version    BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, card_uid),
    UNIQUE (tenant_id, version)
);

CREATE TABLE directory_changes (
    tenant_id   UUID NOT NULL REFERENCES tenants,
    sequence    BIGINT NOT NULL,
    kind        TEXT NOT NULL,
    member_id   UUID NOT NULL,
    -- The member right after the change, as the feed serves it.
    member      JSONB NOT NULL,
    changed_at  TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (tenant_id, sequence)
);

CREATE TABLE member_imports (
    import_id       UUID PRIMARY KEY,
    tenant_id       UUID NOT NULL REFERENCES tenants,
    state           TEXT NOT NULL CHECK (state IN ('running', 'done', 'failed')),
    -- Kept only while running, so an import cut short by a restart resumes; dropped at the end
    -- because it is personal data.
    csv             BYTEA,
    rows_total      INT NOT NULL DEFAULT 0,
    rows_done       INT NOT NULL DEFAULT 0,
    rows_created    INT NOT NULL DEFAULT 0,
    rows_updated    INT NOT NULL DEFAULT 0,
    rows_unchanged  INT NOT NULL DEFAULT 0,
    rows_failed     INT NOT NULL DEFAULT 0,
    failure         TEXT NOT NULL DEFAULT '',
    created_at      TIMESTAMPTZ NOT NULL,
    finished_at     TIMESTAMPTZ,
    CHECK (rows_done <= rows_total)
);
CREATE INDEX member_imports_by_tenant ON member_imports (tenant_id, created_at);
CREATE INDEX member_imports_running ON member_imports (created_at) WHERE state = 'running';

CREATE TABLE member_import_errors (
    import_id        UUID NOT NULL REFERENCES member_imports ON DELETE CASCADE,
    line             INT NOT NULL,
    external_number  TEXT NOT NULL,
    reason           TEXT NOT NULL,
    PRIMARY KEY (import_id, line)
);

CREATE TABLE api_clients (
    client_id    TEXT PRIMARY KEY,
    name         TEXT NOT NULL,
    scopes       TEXT[] NOT NULL,
    -- argon2id; the secret itself is shown once and never stored.
    secret_hash  TEXT NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL
);

CREATE TABLE tenant_grants (
    tenant_id   UUID NOT NULL REFERENCES tenants,
    client_id   TEXT NOT NULL REFERENCES api_clients,
    scopes      TEXT[] NOT NULL,
    granted_at  TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (tenant_id, client_id)
);
CREATE INDEX tenant_grants_by_client ON tenant_grants (client_id);
