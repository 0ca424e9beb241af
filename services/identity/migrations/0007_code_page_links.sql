-- One-time links to the member code page (docs/partners.md, "Member code page"). A partner asks
-- for a link for one member; the page redeems it once for a member-bound access token. Only the
-- SHA-256 of the link's secret is kept. Redeeming sets redeemed_at, once; rows are never deleted,
-- so who opened a page for whom, and when, stays on record. Keyed by tenant like every tenant's
-- table: the link names its tenant beside the secret, so a redemption is looked up within it.
CREATE TABLE code_page_links (
    tenant_id        UUID NOT NULL REFERENCES tenants,
    link_id          UUID NOT NULL,
    member_id        UUID NOT NULL REFERENCES members (member_id),
    client_id        TEXT NOT NULL REFERENCES api_clients,
    secret_hash      BYTEA NOT NULL CHECK (length(secret_hash) = 32),
    -- '<scope>/<key>' (runtime/idempotency.py), for repeats.
    idempotency_key  TEXT NOT NULL,
    created_at       TIMESTAMPTZ NOT NULL,
    expires_at       TIMESTAMPTZ NOT NULL,
    redeemed_at      TIMESTAMPTZ,
    PRIMARY KEY (tenant_id, link_id),
    UNIQUE (tenant_id, secret_hash),
    UNIQUE (tenant_id, idempotency_key),
    CHECK (expires_at > created_at),
    CHECK (redeemed_at IS NULL OR redeemed_at >= created_at)
);
CREATE INDEX code_page_links_by_member ON code_page_links (tenant_id, member_id, created_at);
