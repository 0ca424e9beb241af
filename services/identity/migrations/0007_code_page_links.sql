-- One-time links to the member code page (docs/partners.md, "Member code page"). A partner asks
-- for a link for one member; the page redeems it once for a member-bound access token. Only the
-- SHA-256 of the link's secret is kept. Redeeming sets redeemed_at, once; rows are never deleted,
-- so who opened a page for whom, and when, stays on record.
CREATE TABLE code_page_links (
    link_id          UUID PRIMARY KEY,
    tenant_id        UUID NOT NULL REFERENCES tenants,
    member_id        UUID NOT NULL REFERENCES members (member_id),
    client_id        TEXT NOT NULL REFERENCES api_clients,
    secret_hash      BYTEA NOT NULL UNIQUE CHECK (length(secret_hash) = 32),
    -- '<scope>/<key>' (runtime/idempotency.py); the request it made, for repeats.
    idempotency_key  TEXT NOT NULL UNIQUE,
    created_at       TIMESTAMPTZ NOT NULL,
    expires_at       TIMESTAMPTZ NOT NULL,
    redeemed_at      TIMESTAMPTZ,
    CHECK (expires_at > created_at),
    CHECK (redeemed_at IS NULL OR redeemed_at >= created_at)
);
CREATE INDEX code_page_links_by_member ON code_page_links (tenant_id, member_id, created_at);
