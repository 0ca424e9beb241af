-- policy: each tenant's rule sets as immutable, numbered versions, which one is published, the
-- history of publications, and the Ed25519 keys that sign bundles for devices. Every row carries
-- tenant_id and every key starts with it.

-- One row per tenant that has used policy: the last version number handed out and the published
-- version. Creating a version and publishing lock this row, so numbers follow commit order and
-- exactly one version is published at a time.
CREATE TABLE tenant_state (
    tenant_id          UUID PRIMARY KEY,
    last_version       BIGINT NOT NULL DEFAULT 0,
    -- NULL until the first publication; who published it when is the newest row of publications.
    published_version  BIGINT
);

-- A rule set version: the document as its canonical JSON (what parse_rule_set accepted) and its
-- SHA-256. Never changed or deleted (trigger); a change is a new version.
CREATE TABLE rule_set_versions (
    tenant_id   UUID NOT NULL REFERENCES tenant_state,
    version     BIGINT NOT NULL CHECK (version >= 1),
    document    TEXT NOT NULL,
    sha256      BYTEA NOT NULL CHECK (length(sha256) = 32),
    note        TEXT NOT NULL DEFAULT '',
    created_at  TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (tenant_id, version)
);

ALTER TABLE tenant_state ADD CONSTRAINT tenant_state_published_exists
    FOREIGN KEY (tenant_id, published_version) REFERENCES rule_set_versions (tenant_id, version)
    DEFERRABLE INITIALLY DEFERRED;

-- Every publication, the current one last: who published which version when.
CREATE TABLE publications (
    tenant_id     UUID NOT NULL,
    seq           BIGSERIAL,
    version       BIGINT NOT NULL,
    published_by  TEXT NOT NULL,
    published_at  TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (tenant_id, seq),
    FOREIGN KEY (tenant_id, version) REFERENCES rule_set_versions (tenant_id, version)
);
CREATE INDEX publications_by_version ON publications (tenant_id, version, seq);

CREATE FUNCTION refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% rows are never changed or deleted', TG_TABLE_NAME;
END $$;

CREATE TRIGGER rule_set_versions_immutable BEFORE UPDATE OR DELETE ON rule_set_versions
    FOR EACH ROW EXECUTE FUNCTION refuse_change();
CREATE TRIGGER rule_set_versions_no_truncate BEFORE TRUNCATE ON rule_set_versions
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_change();
CREATE TRIGGER publications_immutable BEFORE UPDATE OR DELETE ON publications
    FOR EACH ROW EXECUTE FUNCTION refuse_change();

-- The tenant's bundle signing keys. The 32-byte Ed25519 seed is sealed with a key derived from
-- ONECARD_POLICY_MASTER_KEY and this row's tenant, key id and public key (services/policy/keys.py,
-- runtime/sealing.py); never stored in the clear. One signs (the newest); devices trust all listed.
CREATE TABLE bundle_keys (
    tenant_id       UUID NOT NULL REFERENCES tenant_state,
    key_id          TEXT NOT NULL,
    public_key      BYTEA NOT NULL CHECK (length(public_key) = 32),
    sealed_private  BYTEA NOT NULL,
    signing         BOOLEAN NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (tenant_id, key_id),
    UNIQUE (tenant_id, public_key)
);
CREATE UNIQUE INDEX bundle_keys_one_signing ON bundle_keys (tenant_id) WHERE signing;

-- Signed bundles, made once per (version, key) on first GetBundle and answered again after.
CREATE TABLE bundles (
    tenant_id   UUID NOT NULL,
    version     BIGINT NOT NULL,
    key_id      TEXT NOT NULL,
    bundle      BYTEA NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (tenant_id, version, key_id),
    FOREIGN KEY (tenant_id, version) REFERENCES rule_set_versions (tenant_id, version),
    FOREIGN KEY (tenant_id, key_id) REFERENCES bundle_keys (tenant_id, key_id)
);
