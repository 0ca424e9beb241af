-- Offline evidence (docs/devicehub.md §5): settlement checks each uploaded payment again before it
-- books it, and needs to know when the device could have made it, what it counted, and which rules
-- it could have held.

-- One row per hello: the hub's clock at it and the highest record sequence the device had issued
-- then. A record numbered above a mark's last_sequence was made after that hello. bundle_version:
-- the POLICY_BUNDLE version the hub had last sent the device before the hello (one it may still
-- hold if this stream ended before the next reached it). Marks no unsettled record needs are
-- pruned at each hello.
CREATE TABLE device_marks (
    tenant_id       UUID NOT NULL,
    device_id       UUID NOT NULL,
    seq             BIGSERIAL,
    marked_at       TIMESTAMPTZ NOT NULL,
    last_sequence   BIGINT NOT NULL CHECK (last_sequence >= 0),
    bundle_version  BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant_id, device_id, seq),
    FOREIGN KEY (tenant_id, device_id) REFERENCES devices (tenant_id, device_id)
);

-- The POLICY_BUNDLE version last sent to the device (written when the hub sends one).
ALTER TABLE devices ADD COLUMN bundle_version_sent BIGINT NOT NULL DEFAULT 0;
UPDATE devices SET bundle_version_sent = COALESCE((synced_versions->>'POLICY_BUNDLE')::bigint, 0);

-- Devices enrolled before marks existed: nothing they recorded is older than their enrolment.
INSERT INTO device_marks (tenant_id, device_id, marked_at, last_sequence, bundle_version)
    SELECT tenant_id, device_id, enrolled_at, 0, bundle_version_sent FROM devices
    WHERE status = 'active' AND enrolled_at IS NOT NULL;

-- Per device, the usage counters of the offline payments settlement booked (the plan's guards
-- and the day counters, as the device counts them), by the service date their key ends with.
CREATE TABLE offline_counters (
    tenant_id     UUID NOT NULL,
    device_id     UUID NOT NULL,
    counter_key   TEXT NOT NULL,
    service_date  DATE NOT NULL,
    value         BIGINT NOT NULL CHECK (value >= 0),
    PRIMARY KEY (tenant_id, device_id, counter_key)
);
CREATE INDEX offline_counters_by_date ON offline_counters (service_date);

-- A device's rejected records since its last DEVICE_FLAGGED alarm was cleared.
CREATE INDEX offline_records_rejected ON offline_records (tenant_id, device_id, settled_at)
    WHERE outcome = 'rejected';
