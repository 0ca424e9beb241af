-- webhooks: partners' endpoints, their sealed secrets, and the delivery log (every delivery and
-- every attempt). Every row carries tenant_id. Attempts are never changed or deleted; a delivery
-- row changes only its status and schedule, and a manual redelivery is a new row.

CREATE TABLE endpoints (
    seq                    BIGSERIAL UNIQUE,
    tenant_id              UUID NOT NULL,
    endpoint_id            UUID NOT NULL,
    client_id              TEXT NOT NULL,
    url                    TEXT NOT NULL,
    event_types            TEXT[] NOT NULL,
    description            TEXT NOT NULL DEFAULT '',
    -- enabled, disabled, disabled_failing, disabled_grant_revoked, deleted
    state                  TEXT NOT NULL DEFAULT 'enabled',
    allow_private_targets  BOOLEAN NOT NULL DEFAULT false,
    -- The client's scopes in the tenant, as the gateway last said or identity's grant events since.
    scopes                 TEXT[] NOT NULL,
    disabled_reason        TEXT NOT NULL DEFAULT '',
    disabled_at            TIMESTAMPTZ,
    failing_since          TIMESTAMPTZ,
    created_at             TIMESTAMPTZ NOT NULL,
    updated_at             TIMESTAMPTZ NOT NULL,
    -- The scoped idempotency key (runtime.idempotency) and the request it bound.
    idempotency_key        TEXT NOT NULL,
    request_sha256         BYTEA NOT NULL,
    PRIMARY KEY (tenant_id, endpoint_id),
    UNIQUE (tenant_id, idempotency_key)
);
CREATE INDEX endpoints_by_client ON endpoints (tenant_id, client_id, seq);

-- Secrets, sealed with the master key (runtime.sealing) and bound to their row. expires_at NULL:
-- the current secret; set by a rotation to the end of the overlap.
CREATE TABLE endpoint_secrets (
    tenant_id        UUID NOT NULL,
    endpoint_id      UUID NOT NULL,
    secret_id        UUID NOT NULL,
    sealed           BYTEA NOT NULL,
    created_at       TIMESTAMPTZ NOT NULL,
    expires_at       TIMESTAMPTZ,
    -- The rotation's scoped idempotency key and request (NULL for the endpoint's first secret).
    idempotency_key  TEXT,
    request_sha256   BYTEA,
    PRIMARY KEY (tenant_id, endpoint_id, secret_id),
    FOREIGN KEY (tenant_id, endpoint_id) REFERENCES endpoints,
    UNIQUE (tenant_id, idempotency_key)
);

-- One message for one endpoint. seq orders the deliveries of one (endpoint, order_key): the next
-- is sent only when every earlier one is delivered, failed or dropped.
CREATE TABLE deliveries (
    seq              BIGSERIAL UNIQUE,
    tenant_id        UUID NOT NULL,
    delivery_id      UUID NOT NULL,
    endpoint_id      UUID NOT NULL,
    message_id       TEXT NOT NULL,
    event_id         TEXT NOT NULL,
    event_type       TEXT NOT NULL,
    -- member:<id>, or the subject of an event that names no member (device:<id>, batch:<id>, ...)
    order_key        TEXT NOT NULL,
    payload          BYTEA NOT NULL,
    -- pending, delivered, failed, dropped
    status           TEXT NOT NULL DEFAULT 'pending',
    attempts         INTEGER NOT NULL DEFAULT 0,
    created_at       TIMESTAMPTZ NOT NULL,
    -- The retry window counts from here (a redelivery starts its own).
    retry_from       TIMESTAMPTZ NOT NULL,
    next_attempt_at  TIMESTAMPTZ NOT NULL,
    -- A dispatcher that claimed it sends until then; after, another may claim it.
    leased_until     TIMESTAMPTZ,
    finished_at      TIMESTAMPTZ,
    redelivery_of    UUID,
    idempotency_key  TEXT,
    request_sha256   BYTEA,
    PRIMARY KEY (tenant_id, delivery_id),
    FOREIGN KEY (tenant_id, endpoint_id) REFERENCES endpoints,
    UNIQUE (tenant_id, idempotency_key)
);
-- One delivery per (endpoint, event): a replayed event fans out once.
CREATE UNIQUE INDEX deliveries_once ON deliveries (tenant_id, endpoint_id, event_id) WHERE redelivery_of IS NULL;
CREATE INDEX deliveries_due ON deliveries (next_attempt_at, seq) WHERE status = 'pending';
CREATE INDEX deliveries_queue ON deliveries (endpoint_id, order_key, seq) WHERE status = 'pending';
CREATE INDEX deliveries_by_endpoint ON deliveries (tenant_id, endpoint_id, seq);

CREATE TABLE attempts (
    tenant_id        UUID NOT NULL,
    delivery_id      UUID NOT NULL,
    attempt          INTEGER NOT NULL,
    started_at       TIMESTAMPTZ NOT NULL,
    latency_ms       BIGINT NOT NULL,
    response_status  INTEGER NOT NULL DEFAULT 0,
    error_kind       TEXT NOT NULL DEFAULT '',
    response_body    TEXT NOT NULL DEFAULT '' CHECK (octet_length(response_body) <= 1024),
    PRIMARY KEY (tenant_id, delivery_id, attempt),
    FOREIGN KEY (tenant_id, delivery_id) REFERENCES deliveries
);

CREATE FUNCTION refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% rows are never changed or deleted', TG_TABLE_NAME;
END $$;
CREATE TRIGGER attempts_immutable BEFORE UPDATE OR DELETE ON attempts
    FOR EACH ROW EXECUTE FUNCTION refuse_change();

-- What the ledger said owns an account (owners never change): the member of a posting.
CREATE TABLE account_owners (
    tenant_id   UUID NOT NULL,
    account_id  TEXT NOT NULL,
    owner_kind  TEXT NOT NULL,
    owner_id    TEXT NOT NULL,
    purse_kind  TEXT NOT NULL,
    PRIMARY KEY (tenant_id, account_id)
);
