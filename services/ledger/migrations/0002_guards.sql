-- Guards: caps on usage counters that a payment checks and raises in its own transaction.
--
-- A counter is named by the caller, window included (e.g. member:<id>:scene:canteen:day:2026-11-26),
-- so the ledger never resets one: a new day is a new key. A payment raises each of its counters
-- with one statement (INSERT ... ON CONFLICT DO UPDATE ... WHERE value + increment <= limit), so
-- the check and the update cannot be split by a concurrent payment.

CREATE TABLE usage_counters (
    tenant_id    UUID NOT NULL,
    counter_key  TEXT NOT NULL,
    value        BIGINT NOT NULL CHECK (value >= 0),
    updated_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, counter_key)
);

-- Which guards a payment applied, as it applied them: the record a later correction (or an
-- audit of "why was this refused / allowed") reads. Immutable like the transfer it belongs to.
CREATE TABLE transfer_guards (
    transfer_id  UUID NOT NULL REFERENCES transfers,
    tenant_id    UUID NOT NULL,
    counter_key  TEXT NOT NULL,
    increment    BIGINT NOT NULL CHECK (increment > 0),
    limit_value  BIGINT NOT NULL CHECK (limit_value >= 0),
    -- The counter's value right after this payment raised it.
    value_after  BIGINT NOT NULL,
    PRIMARY KEY (transfer_id, counter_key)
);

CREATE TRIGGER transfer_guards_immutable BEFORE UPDATE OR DELETE ON transfer_guards
    FOR EACH ROW EXECUTE FUNCTION forbid_change();
CREATE TRIGGER transfer_guards_no_truncate BEFORE TRUNCATE ON transfer_guards
    FOR EACH STATEMENT EXECUTE FUNCTION forbid_change();
