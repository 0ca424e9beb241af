-- Mini-program backends (docs/miniprograms.md): partners' external user ids bound to members,
-- member PINs, and who made a freeze.

-- Who froze a frozen member: 'tenant' (admin, import) or 'member' (self-service); '' when not
-- frozen. Members frozen before this migration were frozen by their tenant.
ALTER TABLE members ADD COLUMN frozen_by TEXT NOT NULL DEFAULT ''
    CHECK (frozen_by IN ('', 'tenant', 'member'));
UPDATE members SET frozen_by = 'tenant' WHERE status = 'frozen';

-- A change a member made through a partner: the partner's client and its attestation id.
ALTER TABLE directory_changes ADD COLUMN client_id TEXT NOT NULL DEFAULT '';
ALTER TABLE directory_changes ADD COLUMN attestation_id TEXT NOT NULL DEFAULT '';

-- One row per binding ever made. Unbinding or replacing only sets unbound_at (and why), so the
-- history of who was which external user, when, stays whole.
CREATE TABLE external_user_bindings (
    binding_id        UUID PRIMARY KEY,
    tenant_id         UUID NOT NULL REFERENCES tenants,
    client_id         TEXT NOT NULL REFERENCES api_clients,
    external_user_id  TEXT COLLATE "C" NOT NULL CHECK (external_user_id ~ '^[\x21-\x7e]{1,128}$'),
    member_id         UUID NOT NULL REFERENCES members (member_id),
    bound_at          TIMESTAMPTZ NOT NULL,
    unbound_at        TIMESTAMPTZ,
    unbound_reason    TEXT NOT NULL DEFAULT '' CHECK (unbound_reason IN ('', 'unbound', 'replaced')),
    CHECK ((unbound_at IS NULL) = (unbound_reason = '')),
    CHECK (unbound_at IS NULL OR unbound_at >= bound_at)
);
-- Standing bindings: one member per external user id, one external user id per member, per client.
CREATE UNIQUE INDEX external_user_bindings_by_user ON external_user_bindings (tenant_id, client_id, external_user_id)
    WHERE unbound_at IS NULL;
CREATE UNIQUE INDEX external_user_bindings_by_member ON external_user_bindings (tenant_id, client_id, member_id)
    WHERE unbound_at IS NULL;
CREATE INDEX external_user_bindings_history ON external_user_bindings (tenant_id, member_id, bound_at);

-- A member's PIN: scrypt, salted, its parameters stored with the hash. failed_attempts and
-- locked_until throttle guessing; they are working state, the audit trail is member_pin_events.
CREATE TABLE member_pins (
    tenant_id        UUID NOT NULL REFERENCES tenants,
    member_id        UUID NOT NULL REFERENCES members (member_id),
    pin_hash         TEXT NOT NULL,
    set_at           TIMESTAMPTZ NOT NULL,
    failed_attempts  INT NOT NULL DEFAULT 0 CHECK (failed_attempts >= 0),
    locked_until     TIMESTAMPTZ,
    PRIMARY KEY (tenant_id, member_id)
);

-- What happened to a member's PIN, append only: set, changed, reset (by the admin), every check
-- (verified / failed) and every lockout, with the partner and its attestation id. Never the PIN.
CREATE TABLE member_pin_events (
    tenant_id       UUID NOT NULL REFERENCES tenants,
    member_id       UUID NOT NULL REFERENCES members (member_id),
    event_id        BIGINT GENERATED ALWAYS AS IDENTITY,
    kind            TEXT NOT NULL CHECK (kind IN ('set', 'changed', 'admin_set', 'reset', 'verified', 'failed',
                                                  'locked')),
    client_id       TEXT NOT NULL,
    attestation_id  TEXT NOT NULL DEFAULT '',
    at              TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (tenant_id, member_id, event_id)
);

-- A tenant's self-service settings; a tenant without a row has the defaults.
CREATE TABLE self_service_settings (
    tenant_id           UUID PRIMARY KEY REFERENCES tenants,
    -- Only the tenant's admin sets a member's first PIN (at the school's office).
    first_pin_by_admin  BOOLEAN NOT NULL,
    updated_at          TIMESTAMPTZ NOT NULL,
    updated_by          TEXT NOT NULL
);
