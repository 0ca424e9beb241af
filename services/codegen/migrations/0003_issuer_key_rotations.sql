-- RotateIssuerKey under an idempotency key (filed in the tenant with its caller's scope,
-- runtime.idempotency): the rotation it made, so a retried rotation is one rotation. Rotations
-- made without a key leave no row here (the trust list's versions record them).
CREATE TABLE issuer_key_rotations (
    tenant_id            UUID NOT NULL REFERENCES tenant_state,
    idempotency_key      TEXT NOT NULL,
    public_key           BYTEA NOT NULL,
    -- NULL: the tenant had no key before.
    previous_public_key  BYTEA,
    trust_list_version   BIGINT NOT NULL,
    rotated_at           TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (tenant_id, idempotency_key),
    FOREIGN KEY (tenant_id, public_key) REFERENCES issuer_keys (tenant_id, public_key),
    FOREIGN KEY (tenant_id, previous_public_key) REFERENCES issuer_keys (tenant_id, public_key)
);
