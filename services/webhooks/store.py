"""The SQL of webhooks: endpoints and their sealed secrets, the fan-out of messages into
deliveries, the dispatcher's claims, the attempt log, and the account owners the ledger told.

Every statement names its tenant (the dispatcher's claims read across tenants, and then carry
each row's own tenant on). Times are passed in (the service's clock), never read from the
database, so a test can move them.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from runtime.errors import Conflict, FailedPrecondition, NotFound, ResourceExhausted
from runtime.events import emit
from runtime.sealing import seal, unseal
from services.webhooks import domain
from services.webhooks.domain import DeliveryStatus, EndpointState, Message, Owner

SEAL_PERSON = b"onecard-whsec"
DISABLED_SUBJECT = "webhooks.endpoint.disabled"
LEASE_S = 60.0


def request_digest(**fields: Any) -> bytes:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).digest()


def _context(tenant_id: uuid.UUID, endpoint_id: uuid.UUID, secret_id: uuid.UUID) -> bytes:
    return f"{tenant_id}/{endpoint_id}/{secret_id}".encode()


@dataclass(frozen=True)
class SecretRow:
    secret_id: uuid.UUID
    created_at: datetime
    expires_at: datetime | None


@dataclass(frozen=True)
class EndpointRow:
    tenant_id: uuid.UUID
    endpoint_id: uuid.UUID
    client_id: str
    url: str
    event_types: list[str]
    description: str
    state: str
    allow_private_targets: bool
    scopes: list[str]
    disabled_reason: str
    disabled_at: datetime | None
    failing_since: datetime | None
    created_at: datetime
    updated_at: datetime
    seq: int
    secrets: tuple[SecretRow, ...] = ()


@dataclass(frozen=True)
class AttemptRow:
    attempt: int
    started_at: datetime
    latency_ms: int
    response_status: int
    error_kind: str
    response_body: str


@dataclass(frozen=True)
class DeliveryRow:
    tenant_id: uuid.UUID
    delivery_id: uuid.UUID
    endpoint_id: uuid.UUID
    message_id: str
    event_id: str
    event_type: str
    order_key: str
    payload: bytes
    status: str
    attempts: int
    created_at: datetime
    retry_from: datetime
    next_attempt_at: datetime
    finished_at: datetime | None
    redelivery_of: uuid.UUID | None
    seq: int
    attempt_log: tuple[AttemptRow, ...] = ()


_ENDPOINT_COLUMNS = ("seq, tenant_id, endpoint_id, client_id, url, event_types, description, state, "
                     "allow_private_targets, scopes, disabled_reason, disabled_at, failing_since, created_at, updated_at")
_DELIVERY_COLUMNS = ("seq, tenant_id, delivery_id, endpoint_id, message_id, event_id, event_type, order_key, payload, "
                     "status, attempts, created_at, retry_from, next_attempt_at, finished_at, redelivery_of")


def _endpoint(row: asyncpg.Record, secrets: Sequence[SecretRow] = ()) -> EndpointRow:
    return EndpointRow(**{k: row[k] for k in row.keys()}, secrets=tuple(secrets))


def _delivery(row: asyncpg.Record, attempts: Sequence[AttemptRow] = ()) -> DeliveryRow:
    return DeliveryRow(**{k: row[k] for k in row.keys()}, attempt_log=tuple(attempts))


class WebhookStore:
    def __init__(self, pool: asyncpg.Pool, *, master_key: bytes):
        self._pool = pool
        self._master_key = master_key

    # --- endpoints -------------------------------------------------------------------------------

    async def create_endpoint(self, *, tenant_id: uuid.UUID, client_id: str, url: str, event_types: list[str],
                              description: str, allow_private_targets: bool, scopes: list[str],
                              idempotency_key: str, secret: str, now: datetime) -> tuple[EndpointRow, str]:
        """The new endpoint and its secret; a repeat of the key with the same request answers the
        first endpoint and its first secret, with another request CONFLICT."""
        digest = request_digest(client_id=client_id, url=url, event_types=event_types, description=description,
                                allow_private_targets=allow_private_targets)
        async with self._pool.acquire() as conn, conn.transaction():
            existing = await conn.fetchrow(
                f"SELECT {_ENDPOINT_COLUMNS}, request_sha256 FROM endpoints WHERE tenant_id = $1 AND idempotency_key = $2",
                tenant_id, idempotency_key)
            if existing is not None:
                if bytes(existing["request_sha256"]) != digest:
                    raise Conflict("this idempotency key was used with another request", reason="IDEMPOTENCY_KEY_REUSED")
                first = await conn.fetchrow(
                    "SELECT secret_id, sealed FROM endpoint_secrets WHERE tenant_id = $1 AND endpoint_id = $2"
                    " AND idempotency_key IS NULL", tenant_id, existing["endpoint_id"])
                endpoint = await self._load(conn, tenant_id=tenant_id, endpoint_id=existing["endpoint_id"])
                return endpoint, self._open(tenant_id, existing["endpoint_id"], first["secret_id"], first["sealed"])
            count = await conn.fetchval(
                "SELECT count(*) FROM endpoints WHERE tenant_id = $1 AND client_id = $2 AND state <> 'deleted'",
                tenant_id, client_id)
            if count >= domain.MAX_ENDPOINTS_PER_CLIENT:
                raise ResourceExhausted(f"at most {domain.MAX_ENDPOINTS_PER_CLIENT} endpoints per client",
                                        reason="TOO_MANY_ENDPOINTS")
            endpoint_id = uuid.uuid4()
            await conn.execute(
                "INSERT INTO endpoints (tenant_id, endpoint_id, client_id, url, event_types, description,"
                " allow_private_targets, scopes, created_at, updated_at, idempotency_key, request_sha256)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9, $10, $11)",
                tenant_id, endpoint_id, client_id, url, event_types, description, allow_private_targets, scopes, now,
                idempotency_key, digest)
            await self._insert_secret(conn, tenant_id=tenant_id, endpoint_id=endpoint_id, secret=secret, now=now)
            return await self._load(conn, tenant_id=tenant_id, endpoint_id=endpoint_id), secret

    async def _insert_secret(self, conn: asyncpg.Connection, *, tenant_id: uuid.UUID, endpoint_id: uuid.UUID,
                             secret: str, now: datetime, idempotency_key: str | None = None,
                             digest: bytes | None = None) -> uuid.UUID:
        secret_id = uuid.uuid4()
        sealed = seal(master_key=self._master_key, person=SEAL_PERSON,
                      context=_context(tenant_id, endpoint_id, secret_id), plaintext=secret.encode())
        await conn.execute(
            "INSERT INTO endpoint_secrets (tenant_id, endpoint_id, secret_id, sealed, created_at, idempotency_key,"
            " request_sha256) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            tenant_id, endpoint_id, secret_id, sealed, now, idempotency_key, digest)
        return secret_id

    def _open(self, tenant_id: uuid.UUID, endpoint_id: uuid.UUID, secret_id: uuid.UUID, sealed: bytes) -> str:
        return unseal(master_key=self._master_key, person=SEAL_PERSON,
                      context=_context(tenant_id, endpoint_id, secret_id), sealed=bytes(sealed)).decode()

    async def _load(self, conn: asyncpg.Connection, *, tenant_id: uuid.UUID, endpoint_id: uuid.UUID,
                    client_id: str | None = None, for_update: bool = False) -> EndpointRow:
        row = await conn.fetchrow(
            f"SELECT {_ENDPOINT_COLUMNS} FROM endpoints WHERE tenant_id = $1 AND endpoint_id = $2"
            " AND ($3::text IS NULL OR client_id = $3)" + (" FOR UPDATE" if for_update else ""),
            tenant_id, endpoint_id, client_id)
        if row is None:
            raise NotFound("no such webhook endpoint", reason="ENDPOINT_NOT_FOUND")
        secrets = await conn.fetch(
            "SELECT secret_id, created_at, expires_at FROM endpoint_secrets WHERE tenant_id = $1 AND endpoint_id = $2"
            " ORDER BY created_at, secret_id", tenant_id, endpoint_id)
        return _endpoint(row, [SecretRow(**dict(s)) for s in secrets])

    async def get_endpoint(self, *, tenant_id: uuid.UUID, endpoint_id: uuid.UUID, client_id: str | None) -> EndpointRow:
        async with self._pool.acquire() as conn:
            return await self._load(conn, tenant_id=tenant_id, endpoint_id=endpoint_id, client_id=client_id)

    async def list_endpoints(self, *, tenant_id: uuid.UUID, client_id: str | None, after_seq: int | None,
                             limit: int) -> list[EndpointRow]:
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                f"SELECT {_ENDPOINT_COLUMNS} FROM endpoints WHERE tenant_id = $1 AND ($2::text IS NULL OR client_id = $2)"
                " AND state <> 'deleted' AND seq > $3 ORDER BY seq LIMIT $4",
                tenant_id, client_id, after_seq or 0, limit)
            return [await self._load(conn, tenant_id=tenant_id, endpoint_id=r["endpoint_id"]) for r in rows]

    async def update_endpoint(self, *, tenant_id: uuid.UUID, endpoint_id: uuid.UUID, client_id: str | None,
                              changes: dict[str, Any], scopes: list[str] | None, now: datetime) -> EndpointRow:
        async with self._pool.acquire() as conn, conn.transaction():
            current = await self._load(conn, tenant_id=tenant_id, endpoint_id=endpoint_id, client_id=client_id,
                                       for_update=True)
            if current.state == EndpointState.DELETED:
                raise NotFound("no such webhook endpoint", reason="ENDPOINT_NOT_FOUND")
            values = dict(changes)
            enabled = values.pop("enabled", None)
            if enabled is True:
                if current.state == EndpointState.DISABLED_GRANT_REVOKED:
                    raise FailedPrecondition("the tenant revoked this client's grant", reason="GRANT_REVOKED")
                values.update(state=EndpointState.ENABLED, disabled_reason="", disabled_at=None, failing_since=None)
            elif enabled is False and current.state == EndpointState.ENABLED:
                values.update(state=EndpointState.DISABLED, disabled_at=now)
            if scopes is not None:
                values["scopes"] = scopes
            if values:
                assignments = ", ".join(f"{column} = ${i}" for i, column in enumerate(values, start=4))
                await conn.execute(
                    f"UPDATE endpoints SET {assignments}, updated_at = $3 WHERE tenant_id = $1 AND endpoint_id = $2",
                    tenant_id, endpoint_id, now, *values.values())
            return await self._load(conn, tenant_id=tenant_id, endpoint_id=endpoint_id)

    async def delete_endpoint(self, *, tenant_id: uuid.UUID, endpoint_id: uuid.UUID, client_id: str | None,
                              now: datetime) -> EndpointRow:
        async with self._pool.acquire() as conn, conn.transaction():
            current = await self._load(conn, tenant_id=tenant_id, endpoint_id=endpoint_id, client_id=client_id,
                                       for_update=True)
            if current.state != EndpointState.DELETED:
                await conn.execute("UPDATE endpoints SET state = 'deleted', updated_at = $3, disabled_at = $3"
                                   " WHERE tenant_id = $1 AND endpoint_id = $2", tenant_id, endpoint_id, now)
                await conn.execute("UPDATE deliveries SET status = 'dropped', finished_at = $3, leased_until = NULL"
                                   " WHERE tenant_id = $1 AND endpoint_id = $2 AND status = 'pending'",
                                   tenant_id, endpoint_id, now)
            return await self._load(conn, tenant_id=tenant_id, endpoint_id=endpoint_id)

    async def rotate_secret(self, *, tenant_id: uuid.UUID, endpoint_id: uuid.UUID, client_id: str | None,
                            secret: str, overlap_s: float, idempotency_key: str, now: datetime) -> tuple[EndpointRow, str]:
        digest = request_digest(endpoint_id=endpoint_id, overlap_s=overlap_s)
        async with self._pool.acquire() as conn, conn.transaction():
            current = await self._load(conn, tenant_id=tenant_id, endpoint_id=endpoint_id, client_id=client_id,
                                       for_update=True)
            existing = await conn.fetchrow(
                "SELECT endpoint_id, secret_id, sealed, request_sha256 FROM endpoint_secrets"
                " WHERE tenant_id = $1 AND idempotency_key = $2", tenant_id, idempotency_key)
            if existing is not None:
                if bytes(existing["request_sha256"]) != digest:
                    raise Conflict("this idempotency key was used with another request", reason="IDEMPOTENCY_KEY_REUSED")
                return current, self._open(tenant_id, existing["endpoint_id"], existing["secret_id"], existing["sealed"])
            if current.state == EndpointState.DELETED:
                raise NotFound("no such webhook endpoint", reason="ENDPOINT_NOT_FOUND")
            # Every secret still signing signs until the overlap ends (one ending sooner keeps its end).
            await conn.execute(
                "UPDATE endpoint_secrets SET expires_at = LEAST(COALESCE(expires_at, 'infinity'),"
                " $3 + make_interval(secs => $4)) WHERE tenant_id = $1 AND endpoint_id = $2"
                " AND (expires_at IS NULL OR expires_at > $3)", tenant_id, endpoint_id, now, float(overlap_s))
            await self._insert_secret(conn, tenant_id=tenant_id, endpoint_id=endpoint_id, secret=secret, now=now,
                                      idempotency_key=idempotency_key, digest=digest)
            await conn.execute("UPDATE endpoints SET updated_at = $3 WHERE tenant_id = $1 AND endpoint_id = $2",
                               tenant_id, endpoint_id, now)
            return await self._load(conn, tenant_id=tenant_id, endpoint_id=endpoint_id), secret

    async def signing_secrets(self, *, tenant_id: uuid.UUID, endpoint_id: uuid.UUID, now: datetime) -> list[str]:
        """The secrets that sign now: the current one and those still in their overlap."""
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT secret_id, sealed FROM endpoint_secrets WHERE tenant_id = $1 AND endpoint_id = $2"
                " AND (expires_at IS NULL OR expires_at > $3) ORDER BY created_at DESC", tenant_id, endpoint_id, now)
        return [self._open(tenant_id, endpoint_id, r["secret_id"], r["sealed"]) for r in rows]

    # --- grants (identity's events) --------------------------------------------------------------

    @staticmethod
    async def grant_changed(conn: asyncpg.Connection, *, tenant_id: uuid.UUID, client_id: str, scopes: list[str],
                            now: datetime) -> None:
        await conn.execute(
            "UPDATE endpoints SET scopes = $3, updated_at = $4,"
            " state = CASE WHEN state = 'disabled_grant_revoked' THEN 'disabled' ELSE state END"
            " WHERE tenant_id = $1 AND client_id = $2 AND state <> 'deleted'", tenant_id, client_id, scopes, now)

    @staticmethod
    async def grant_revoked(conn: asyncpg.Connection, *, tenant_id: uuid.UUID, client_id: str, now: datetime) -> None:
        await conn.execute(
            "UPDATE endpoints SET scopes = '{}', state = 'disabled_grant_revoked', disabled_at = $3, updated_at = $3"
            " WHERE tenant_id = $1 AND client_id = $2 AND state <> 'deleted'", tenant_id, client_id, now)

    # --- fan-out ---------------------------------------------------------------------------------

    @staticmethod
    async def fan_out(conn: asyncpg.Connection, *, message: Message, event_id: str, occurred_at: str,
                      now: datetime) -> int:
        """One pending delivery of ``message`` per enabled endpoint of its tenant that subscribes
        to its type and whose scopes read it, in the consumer's transaction. Answers how many."""
        endpoints = await conn.fetch(
            "SELECT endpoint_id, scopes FROM endpoints WHERE tenant_id = $1 AND state = 'enabled'"
            " AND $2 = ANY(event_types) ORDER BY seq", uuid.UUID(message.tenant_id), message.event_type)
        body = domain.payload(event_type=message.event_type, occurred_at=occurred_at, data=message.data)
        made = 0
        for endpoint in endpoints:
            if not domain.readable(message.event_type, endpoint["scopes"]):
                continue
            delivery_id = uuid.uuid4()
            inserted = await conn.fetchval(
                "INSERT INTO deliveries (tenant_id, delivery_id, endpoint_id, message_id, event_id, event_type,"
                " order_key, payload, created_at, retry_from, next_attempt_at)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9, $9)"
                " ON CONFLICT (tenant_id, endpoint_id, event_id) WHERE redelivery_of IS NULL DO NOTHING RETURNING true",
                uuid.UUID(message.tenant_id), delivery_id, endpoint["endpoint_id"], f"msg_{delivery_id.hex}",
                event_id, message.event_type, message.order_key, body, now)
            made += bool(inserted)
        return made

    # --- the dispatcher --------------------------------------------------------------------------

    async def claim_due(self, *, now: datetime, limit: int, lease_s: float = LEASE_S) -> list[DeliveryRow]:
        """Due deliveries whose (endpoint, order_key) has no earlier one pending, leased to this
        dispatcher (another replica skips them while the lease lasts)."""
        async with self._pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                f"SELECT {', '.join('d.' + c.strip() for c in _DELIVERY_COLUMNS.split(','))} FROM deliveries d"
                " JOIN endpoints e ON e.tenant_id = d.tenant_id AND e.endpoint_id = d.endpoint_id"
                " WHERE d.status = 'pending' AND d.next_attempt_at <= $1"
                " AND (d.leased_until IS NULL OR d.leased_until <= $1) AND e.state = 'enabled'"
                " AND NOT EXISTS (SELECT 1 FROM deliveries p WHERE p.endpoint_id = d.endpoint_id"
                "   AND p.order_key = d.order_key AND p.status = 'pending' AND p.seq < d.seq)"
                " ORDER BY d.seq LIMIT $2 FOR UPDATE OF d SKIP LOCKED", now, limit)
            if rows:
                await conn.execute("UPDATE deliveries SET leased_until = $2 WHERE seq = ANY($1::bigint[])",
                                   [r["seq"] for r in rows], now + timedelta(seconds=lease_s))
            return [_delivery(r) for r in rows]

    async def endpoint_for_delivery(self, delivery: DeliveryRow) -> EndpointRow:
        async with self._pool.acquire() as conn:
            return await self._load(conn, tenant_id=delivery.tenant_id, endpoint_id=delivery.endpoint_id)

    async def record_attempt(self, *, delivery: DeliveryRow, started_at: datetime, latency_ms: int,
                             response_status: int, error_kind: str, response_body: str, delivered: bool,
                             next_attempt_at: datetime | None, disable_after_s: float, now: datetime) -> str:
        """The attempt logged and the delivery moved on: delivered, retried at ``next_attempt_at``,
        or failed (None). The endpoint's failing streak starts or ends; one failing for
        ``disable_after_s`` is disabled and ``webhooks.endpoint.disabled`` sent. Answers the
        delivery's status."""
        async with self._pool.acquire() as conn, conn.transaction():
            status = (DeliveryStatus.DELIVERED if delivered else
                      DeliveryStatus.PENDING if next_attempt_at is not None else DeliveryStatus.FAILED)
            # Numbered by the row, not by what the claim read: an attempt whose lease ran out while
            # another dispatcher tried again is logged too, after it. A delivery dropped meanwhile
            # (its endpoint deleted) keeps its status; the attempt is still logged.
            attempt = await conn.fetchval(
                "UPDATE deliveries SET attempts = attempts + 1,"
                " status = CASE WHEN status = 'pending' THEN $3 ELSE status END,"
                " next_attempt_at = CASE WHEN status = 'pending' THEN $4 ELSE next_attempt_at END,"
                " finished_at = CASE WHEN status = 'pending' THEN $5 ELSE finished_at END, leased_until = NULL"
                " WHERE tenant_id = $1 AND delivery_id = $2 RETURNING attempts",
                delivery.tenant_id, delivery.delivery_id, status, next_attempt_at or delivery.next_attempt_at,
                None if status == DeliveryStatus.PENDING else now)
            await conn.execute(
                "INSERT INTO attempts (tenant_id, delivery_id, attempt, started_at, latency_ms, response_status,"
                " error_kind, response_body) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                delivery.tenant_id, delivery.delivery_id, attempt, started_at, latency_ms, response_status,
                error_kind, response_body)
            if delivered:
                await conn.execute("UPDATE endpoints SET failing_since = NULL WHERE tenant_id = $1 AND endpoint_id = $2",
                                   delivery.tenant_id, delivery.endpoint_id)
                return status
            since = await conn.fetchval(
                "UPDATE endpoints SET failing_since = COALESCE(failing_since, $3) WHERE tenant_id = $1"
                " AND endpoint_id = $2 AND state = 'enabled' RETURNING failing_since",
                delivery.tenant_id, delivery.endpoint_id, started_at)
            if since is not None and now - since >= timedelta(seconds=disable_after_s):
                await self._disable_failing(conn, delivery=delivery, since=since, now=now)
            return status

    @staticmethod
    async def _disable_failing(conn: asyncpg.Connection, *, delivery: DeliveryRow, since: datetime,
                               now: datetime) -> None:
        reason = f"every delivery failed since {since.isoformat()}"
        await conn.execute(
            "UPDATE endpoints SET state = 'disabled_failing', disabled_reason = $3, disabled_at = $4, updated_at = $4"
            " WHERE tenant_id = $1 AND endpoint_id = $2", delivery.tenant_id, delivery.endpoint_id, reason, now)
        row = await conn.fetchrow("SELECT client_id, url FROM endpoints WHERE tenant_id = $1 AND endpoint_id = $2",
                                  delivery.tenant_id, delivery.endpoint_id)
        await emit(conn, subject=DISABLED_SUBJECT, event_type=DISABLED_SUBJECT, tenant_id=str(delivery.tenant_id),
                   data={"tenant_id": str(delivery.tenant_id), "endpoint_id": str(delivery.endpoint_id),
                         "client_id": row["client_id"], "failing_since": since.isoformat(),
                         "disabled_at": now.isoformat(), "reason": reason})

    async def drop(self, delivery: DeliveryRow, *, now: datetime) -> None:
        """Not sent: the endpoint's scopes no longer read the event type."""
        async with self._pool.acquire() as conn:
            await conn.execute("UPDATE deliveries SET status = 'dropped', finished_at = $3, leased_until = NULL"
                               " WHERE tenant_id = $1 AND delivery_id = $2", delivery.tenant_id,
                               delivery.delivery_id, now)

    async def next_due(self) -> datetime | None:
        async with self._pool.acquire() as conn:
            return await conn.fetchval("SELECT min(next_attempt_at) FROM deliveries WHERE status = 'pending'")

    # --- the delivery log ------------------------------------------------------------------------

    async def list_deliveries(self, *, tenant_id: uuid.UUID, endpoint_id: uuid.UUID, client_id: str | None,
                              status: str | None, before_seq: int | None, limit: int) -> list[DeliveryRow]:
        async with self._pool.acquire() as conn:
            await self._load(conn, tenant_id=tenant_id, endpoint_id=endpoint_id, client_id=client_id)
            rows = await conn.fetch(
                f"SELECT {_DELIVERY_COLUMNS} FROM deliveries WHERE tenant_id = $1 AND endpoint_id = $2"
                " AND ($3::text IS NULL OR status = $3) AND ($4::bigint IS NULL OR seq < $4) ORDER BY seq DESC LIMIT $5",
                tenant_id, endpoint_id, status, before_seq, limit)
            return [_delivery(r) for r in rows]

    async def get_delivery(self, *, tenant_id: uuid.UUID, delivery_id: uuid.UUID, client_id: str | None) -> DeliveryRow:
        async with self._pool.acquire() as conn:
            return await self._get_delivery(conn, tenant_id=tenant_id, delivery_id=delivery_id, client_id=client_id)

    @staticmethod
    async def _get_delivery(conn: asyncpg.Connection, *, tenant_id: uuid.UUID, delivery_id: uuid.UUID,
                            client_id: str | None) -> DeliveryRow:
        row = await conn.fetchrow(
            f"SELECT {', '.join('d.' + c.strip() for c in _DELIVERY_COLUMNS.split(','))} FROM deliveries d"
            " JOIN endpoints e ON e.tenant_id = d.tenant_id AND e.endpoint_id = d.endpoint_id"
            " WHERE d.tenant_id = $1 AND d.delivery_id = $2 AND ($3::text IS NULL OR e.client_id = $3)",
            tenant_id, delivery_id, client_id)
        if row is None:
            raise NotFound("no such delivery", reason="DELIVERY_NOT_FOUND")
        attempts = await conn.fetch(
            "SELECT attempt, started_at, latency_ms, response_status, error_kind, response_body FROM attempts"
            " WHERE tenant_id = $1 AND delivery_id = $2 ORDER BY attempt", tenant_id, delivery_id)
        return _delivery(row, [AttemptRow(**dict(a)) for a in attempts])

    async def redeliver(self, *, tenant_id: uuid.UUID, delivery_id: uuid.UUID, client_id: str | None,
                        idempotency_key: str, now: datetime) -> DeliveryRow:
        digest = request_digest(delivery_id=delivery_id)
        async with self._pool.acquire() as conn, conn.transaction():
            original = await self._get_delivery(conn, tenant_id=tenant_id, delivery_id=delivery_id, client_id=client_id)
            existing = await conn.fetchrow(
                "SELECT delivery_id, request_sha256 FROM deliveries WHERE tenant_id = $1 AND idempotency_key = $2",
                tenant_id, idempotency_key)
            if existing is not None:
                if bytes(existing["request_sha256"]) != digest:
                    raise Conflict("this idempotency key was used with another request", reason="IDEMPOTENCY_KEY_REUSED")
                return await self._get_delivery(conn, tenant_id=tenant_id, delivery_id=existing["delivery_id"],
                                                client_id=None)
            state = await conn.fetchval("SELECT state FROM endpoints WHERE tenant_id = $1 AND endpoint_id = $2",
                                        tenant_id, original.endpoint_id)
            if state == EndpointState.DELETED:
                raise FailedPrecondition("the endpoint was deleted", reason="ENDPOINT_DELETED")
            new_id = uuid.uuid4()
            await conn.execute(
                "INSERT INTO deliveries (tenant_id, delivery_id, endpoint_id, message_id, event_id, event_type,"
                " order_key, payload, created_at, retry_from, next_attempt_at, redelivery_of, idempotency_key,"
                " request_sha256) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9, $9, $10, $11, $12)",
                tenant_id, new_id, original.endpoint_id, original.message_id, original.event_id, original.event_type,
                original.order_key, original.payload, now, original.redelivery_of or original.delivery_id,
                idempotency_key, digest)
            return await self._get_delivery(conn, tenant_id=tenant_id, delivery_id=new_id, client_id=None)

    # --- account owners (the ledger's, cached: owners never change) -------------------------------

    @staticmethod
    async def owners(conn: asyncpg.Connection, *, tenant_id: uuid.UUID, account_ids: Iterable[str]) -> dict[str, Owner]:
        rows = await conn.fetch(
            "SELECT account_id, owner_kind, owner_id, purse_kind FROM account_owners WHERE tenant_id = $1"
            " AND account_id = ANY($2::text[])", tenant_id, list(account_ids))
        return {r["account_id"]: Owner(owner_kind=r["owner_kind"], owner_id=r["owner_id"], purse_kind=r["purse_kind"])
                for r in rows}

    @staticmethod
    async def remember_owners(conn: asyncpg.Connection, *, tenant_id: uuid.UUID, owners: dict[str, Owner]) -> None:
        await conn.executemany(
            "INSERT INTO account_owners (tenant_id, account_id, owner_kind, owner_id, purse_kind)"
            " VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
            [(tenant_id, account_id, o.owner_kind, o.owner_id, o.purse_kind) for account_id, o in owners.items()])
