-- Each rotation of a tenant's bundle signing key (RotateBundleKey), under the idempotency key that
-- asked for it, filed in the tenant with its caller's scope (runtime.idempotency: `mesh:ops/<key>`),
-- so a retried rotation is one rotation; and the record an auditor reads of which key replaced which, and when
-- (bundle_keys.signing only says which key signs now).
CREATE TABLE bundle_key_rotations (
    tenant_id        UUID NOT NULL REFERENCES tenant_state,
    idempotency_key  TEXT NOT NULL,
    key_id           TEXT NOT NULL,
    -- NULL: the tenant had no key before.
    previous_key_id  TEXT,
    rotated_at       TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (tenant_id, idempotency_key),
    FOREIGN KEY (tenant_id, key_id) REFERENCES bundle_keys (tenant_id, key_id),
    FOREIGN KEY (tenant_id, previous_key_id) REFERENCES bundle_keys (tenant_id, key_id)
);
CREATE INDEX bundle_key_rotations_tenant ON bundle_key_rotations (tenant_id, rotated_at);
