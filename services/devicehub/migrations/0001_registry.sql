-- devicehub: the device registry (devices, their one-time enrolment tokens), fleet alarms and
-- rollouts. Every row carries tenant_id and every query names it. The outbox and the consumer
-- inbox (processed_events) come from the runtime's own migration.

-- A device of a tenant. PENDING until it enrols with its own Ed25519 key; DECOMMISSIONED for good
-- (the key is forgotten). seq orders lists (page tokens hold it).
CREATE TABLE devices (
    seq                      BIGSERIAL UNIQUE,
    tenant_id                UUID NOT NULL,
    device_id                UUID PRIMARY KEY,
    kind                     TEXT NOT NULL CHECK (kind IN ('pos', 'gate', 'shuttle', 'cabinet', 'kiosk')),
    model                    TEXT NOT NULL,
    name                     TEXT NOT NULL,
    location                 TEXT NOT NULL DEFAULT '',
    scene_tags               TEXT[] NOT NULL DEFAULT '{}',
    merchant_account_id      TEXT NOT NULL DEFAULT '',
    parent_device_id         UUID,
    status                   TEXT NOT NULL CHECK (status IN ('pending', 'active', 'decommissioned')),
    firmware_version         TEXT NOT NULL DEFAULT '',
    -- The config the hub wants the device on (config_version bumps on every change) and the
    -- version the device last reported in a heartbeat.
    config_json              TEXT NOT NULL DEFAULT '{}',
    config_version           BIGINT NOT NULL DEFAULT 0 CHECK (config_version >= 0),
    reported_config_version  BIGINT NOT NULL DEFAULT 0,
    capacity                 INT NOT NULL DEFAULT 0 CHECK (capacity >= 0),
    -- The enrolled public key (NULL before enrolment and after decommissioning).
    public_key               BYTEA CHECK (public_key IS NULL OR length(public_key) = 32),
    key_fingerprint          TEXT NOT NULL DEFAULT '',
    -- Fleet state from the stream and heartbeats.
    online                   BOOLEAN NOT NULL DEFAULT false,
    last_seen_at             TIMESTAMPTZ,
    queue_depth              INT NOT NULL DEFAULT 0,
    oldest_queued_at         TIMESTAMPTZ,
    clock_offset_ms          BIGINT NOT NULL DEFAULT 0,
    health                   JSONB NOT NULL DEFAULT '{}'::jsonb,
    -- What the device acknowledged (SyncAck), by kind name.
    synced_versions          JSONB NOT NULL DEFAULT '{}'::jsonb,
    created_at               TIMESTAMPTZ NOT NULL,
    updated_at               TIMESTAMPTZ NOT NULL,
    enrolled_at              TIMESTAMPTZ,
    decommissioned_at        TIMESTAMPTZ,
    UNIQUE (tenant_id, device_id),
    CHECK (status <> 'active' OR public_key IS NOT NULL)
);
CREATE INDEX devices_by_tenant ON devices (tenant_id, seq);
CREATE INDEX devices_by_location ON devices (tenant_id, location, seq);
-- The fleet watcher's two questions: who went silent, who has been offline too long.
CREATE INDEX devices_online ON devices (last_seen_at) WHERE online;
CREATE INDEX devices_offline ON devices (last_seen_at) WHERE NOT online AND status = 'active';

-- One-time enrolment tokens: only the SHA-256 of the token is kept. A device has at most one
-- usable token (a new one replaces the old); a token is used once.
CREATE TABLE enrolment_tokens (
    token_sha256  BYTEA PRIMARY KEY CHECK (length(token_sha256) = 32),
    tenant_id     UUID NOT NULL,
    device_id     UUID NOT NULL,
    expires_at    TIMESTAMPTZ NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL,
    used_at       TIMESTAMPTZ,
    revoked_at    TIMESTAMPTZ,
    FOREIGN KEY (tenant_id, device_id) REFERENCES devices (tenant_id, device_id)
);
CREATE INDEX enrolment_tokens_by_device ON enrolment_tokens (tenant_id, device_id);

-- Alarms: at most one open (open or acknowledged) alarm per (tenant, device, kind); a repeat
-- raises its count and last_raised_at. kind is the AlarmKind name without its prefix.
CREATE TABLE alarms (
    seq              BIGSERIAL UNIQUE,
    tenant_id        UUID NOT NULL,
    alarm_id         UUID PRIMARY KEY,
    device_id        UUID NOT NULL,
    kind             TEXT NOT NULL,
    severity         TEXT NOT NULL CHECK (severity IN ('info', 'warning', 'critical')),
    state            TEXT NOT NULL CHECK (state IN ('open', 'acknowledged', 'cleared')),
    detail           TEXT NOT NULL DEFAULT '',
    count            INT NOT NULL DEFAULT 1 CHECK (count >= 1),
    opened_at        TIMESTAMPTZ NOT NULL,
    last_raised_at   TIMESTAMPTZ NOT NULL,
    acknowledged_at  TIMESTAMPTZ,
    acknowledged_by  TEXT NOT NULL DEFAULT '',
    cleared_at       TIMESTAMPTZ,
    cleared_by       TEXT NOT NULL DEFAULT ''
);
CREATE UNIQUE INDEX alarms_one_open ON alarms (tenant_id, device_id, kind) WHERE state IN ('open', 'acknowledged');
CREATE INDEX alarms_by_tenant ON alarms (tenant_id, seq);

-- Rollouts of firmware or config to a device group in stages.
CREATE TABLE rollouts (
    seq                BIGSERIAL UNIQUE,
    tenant_id          UUID NOT NULL,
    rollout_id         UUID PRIMARY KEY,
    idempotency_key    TEXT NOT NULL,
    request_sha256     BYTEA NOT NULL,
    target             TEXT NOT NULL CHECK (target IN ('firmware', 'config')),
    version            TEXT NOT NULL DEFAULT '',
    config_json        TEXT NOT NULL DEFAULT '',
    kind               TEXT NOT NULL,
    model              TEXT NOT NULL DEFAULT '',
    location           TEXT NOT NULL DEFAULT '',
    stage_sizes        INT[] NOT NULL,
    success_threshold  DOUBLE PRECISION NOT NULL CHECK (success_threshold > 0 AND success_threshold <= 1),
    error_threshold    INT NOT NULL CHECK (error_threshold >= 1),
    state              TEXT NOT NULL CHECK (state IN ('running', 'succeeded', 'stopped')),
    current_stage      INT NOT NULL DEFAULT 0,
    detail             TEXT NOT NULL DEFAULT '',
    created_at         TIMESTAMPTZ NOT NULL,
    updated_at         TIMESTAMPTZ NOT NULL,
    UNIQUE (tenant_id, idempotency_key),
    UNIQUE (tenant_id, rollout_id)
);
CREATE INDEX rollouts_by_tenant ON rollouts (tenant_id, seq);

-- The devices of a rollout, each in one stage, with its update step. told_at: when the hub sent
-- it the UpdateCommand (NULL: not yet; only devices of started stages are ever told).
CREATE TABLE rollout_devices (
    tenant_id         UUID NOT NULL,
    rollout_id        UUID NOT NULL REFERENCES rollouts,
    device_id         UUID NOT NULL,
    stage             INT NOT NULL CHECK (stage >= 0),
    step              TEXT NOT NULL CHECK (step IN ('waiting', 'pending', 'downloading', 'installing', 'succeeded', 'failed')),
    reported_version  TEXT NOT NULL DEFAULT '',
    detail            TEXT NOT NULL DEFAULT '',
    told_at           TIMESTAMPTZ,
    updated_at        TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (rollout_id, device_id),
    FOREIGN KEY (tenant_id, device_id) REFERENCES devices (tenant_id, device_id)
);
CREATE INDEX rollout_devices_by_device ON rollout_devices (tenant_id, device_id);
