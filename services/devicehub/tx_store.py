"""All of the transactions part's SQL (migrations 0002 and 0003's counters, and reads of 0001's
devices and alarms and 0003's device marks). Rows in, plain values out; no rules and no protobuf
here."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

import asyncpg

from runtime.events import emit

SUBJECT_ACCESS_RULES_CHANGED = "devicehub.access_rules.changed"


@dataclass(frozen=True)
class StoredRecord:
    """An offline record as first settled."""

    sequence: int
    outcome: str
    reason: str
    transfer_id: str
    shortfall_fen: int
    record_sha256: bytes


@dataclass(frozen=True)
class NewRecord:
    sequence: int
    purpose: str
    outcome: str
    reason: str
    transfer_id: str
    shortfall_fen: int
    record_sha256: bytes
    event_time: datetime | None


@dataclass(frozen=True)
class AccessRow:
    tenant_id: uuid.UUID
    device_id: uuid.UUID
    nonce: str
    member_id: str
    location: str
    method: str
    purpose: str
    passed: bool
    reason: str
    rule: str
    offline: bool
    event_time: datetime
    seq: int = 0


@dataclass(frozen=True)
class ServedRow:
    tenant_id: uuid.UUID
    transfer_id: str
    location: str
    device_id: uuid.UUID
    event_time: datetime


@dataclass(frozen=True)
class CabinetOrderRow:
    tenant_id: uuid.UUID
    pos_device_id: uuid.UUID
    order_id: str
    cabinet_device_id: uuid.UUID
    request_sha256: bytes
    member_id: str
    amount_fen: int
    charged_fen: int
    item: str
    stage: str
    reason: str
    holds: list[dict[str, Any]] = field(default_factory=list)
    balances: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class DiningRow:
    location: str
    served: int
    capacity: int
    devices_online: int


def _cabinet(row: asyncpg.Record) -> CabinetOrderRow:
    return CabinetOrderRow(
        tenant_id=row["tenant_id"], pos_device_id=row["pos_device_id"], order_id=row["order_id"],
        cabinet_device_id=row["cabinet_device_id"], request_sha256=bytes(row["request_sha256"]),
        member_id=row["member_id"], amount_fen=row["amount_fen"], charged_fen=row["charged_fen"], item=row["item"],
        stage=row["stage"], reason=row["reason"], holds=_json(row["holds"]), balances=_json(row["balances"]),
    )


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def _access(row: asyncpg.Record) -> AccessRow:
    return AccessRow(
        tenant_id=row["tenant_id"], device_id=row["device_id"], nonce=row["nonce"], member_id=row["member_id"],
        location=row["location"], method=row["method"], purpose=row["purpose"], passed=row["passed"],
        reason=row["reason"], rule=row["rule"], offline=row["offline"], event_time=row["event_time"], seq=row["seq"],
    )


_ACCESS_COLUMNS = ("tenant_id, device_id, nonce, member_id, location, method, purpose, passed, reason, rule, offline,"
                   " event_time")


class UploadTx:
    """One upload's transaction: the device's sequence row locked until it commits."""

    def __init__(self, conn: asyncpg.Connection, *, tenant_id: uuid.UUID, device_id: uuid.UUID, highest: int,
                 missing: list[int]):
        self.conn = conn
        self.tenant_id = tenant_id
        self.device_id = device_id
        self.highest = highest
        self.missing = missing

    async def existing(self, sequences: Sequence[int]) -> dict[int, StoredRecord]:
        rows = await self.conn.fetch(
            """SELECT sequence, outcome, reason, transfer_id, shortfall_fen, record_sha256 FROM offline_records
               WHERE tenant_id = $1 AND device_id = $2 AND sequence = ANY($3::bigint[])""",
            self.tenant_id, self.device_id, list(sequences))
        return {r["sequence"]: StoredRecord(r["sequence"], r["outcome"], r["reason"], r["transfer_id"],
                                            r["shortfall_fen"], bytes(r["record_sha256"])) for r in rows}

    async def insert_records(self, records: Sequence[NewRecord], *, now: datetime) -> None:
        if not records:
            return
        await self.conn.execute(
            """INSERT INTO offline_records (tenant_id, device_id, sequence, purpose, outcome, reason, transfer_id,
                                            shortfall_fen, record_sha256, event_time, settled_at)
               SELECT $1, $2, u.*, $3 FROM unnest($4::bigint[], $5::text[], $6::text[], $7::text[], $8::text[],
                                                  $9::bigint[], $10::bytea[], $11::timestamptz[]) AS u
               ON CONFLICT DO NOTHING""",
            self.tenant_id, self.device_id, now,
            [r.sequence for r in records], [r.purpose for r in records], [r.outcome for r in records],
            [r.reason for r in records], [r.transfer_id for r in records], [r.shortfall_fen for r in records],
            [r.record_sha256 for r in records], [r.event_time for r in records])

    async def save_sequences(self, *, highest: int, missing: Sequence[int], now: datetime) -> None:
        await self.conn.execute(
            "UPDATE device_sequences SET highest = $3, missing = $4, updated_at = $5"
            " WHERE tenant_id = $1 AND device_id = $2",
            self.tenant_id, self.device_id, highest, list(missing), now)

    async def insert_access(self, rows: Sequence[AccessRow], *, now: datetime) -> set[str]:
        """Insert access records; answers the nonces that were new."""
        if not rows:
            return set()
        inserted = await self.conn.fetch(
            f"""INSERT INTO access_records ({_ACCESS_COLUMNS}, recorded_at)
                SELECT u.*, $13 FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::text[],
                                           $7::text[], $8::bool[], $9::text[], $10::text[], $11::bool[],
                                           $12::timestamptz[]) AS u
                ON CONFLICT DO NOTHING RETURNING nonce""",
            *_access_columns(rows), now)
        return {r["nonce"] for r in inserted}

    async def insert_served(self, rows: Sequence[ServedRow]) -> None:
        await insert_served(self.conn, rows)

    # --- what settlement checks records against (migration 0003) ---------------------------------

    async def marks(self) -> list[tuple[datetime, int, int]]:
        """The device's hellos, oldest first: (hub time, last issued sequence, bundle version sent)."""
        rows = await self.conn.fetch(
            "SELECT marked_at, last_sequence, bundle_version FROM device_marks"
            " WHERE tenant_id = $1 AND device_id = $2 ORDER BY seq", self.tenant_id, self.device_id)
        return [(r["marked_at"], r["last_sequence"], r["bundle_version"]) for r in rows]

    async def counters(self, keys: Sequence[str]) -> dict[str, int]:
        """The device's settled usage counters of these keys (a key never counted is left out)."""
        if not keys:
            return {}
        rows = await self.conn.fetch(
            "SELECT counter_key, value FROM offline_counters"
            " WHERE tenant_id = $1 AND device_id = $2 AND counter_key = ANY($3::text[])",
            self.tenant_id, self.device_id, list(keys))
        return {r["counter_key"]: r["value"] for r in rows}

    async def add_counters(self, rows: Sequence[tuple[str, date, int]], *, prune_before: date) -> None:
        """Raise (key, service date, increment) counters; forget the device's counters of days
        before ``prune_before`` (no record that old is settled any more)."""
        await self.conn.execute(
            "DELETE FROM offline_counters WHERE tenant_id = $1 AND device_id = $2 AND service_date < $3",
            self.tenant_id, self.device_id, prune_before)
        if not rows:
            return
        await self.conn.execute(
            """INSERT INTO offline_counters AS c (tenant_id, device_id, counter_key, service_date, value)
               SELECT $1, $2, u.key, u.day, sum(u.inc)
               FROM unnest($3::text[], $4::date[], $5::bigint[]) AS u(key, day, inc)
               GROUP BY u.key, u.day
               ON CONFLICT (tenant_id, device_id, counter_key) DO UPDATE SET value = c.value + EXCLUDED.value""",
            self.tenant_id, self.device_id, [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])

    async def rejected_since_review(self) -> int:
        """The device's rejected records settled since its last DEVICE_FLAGGED alarm was cleared."""
        return await self.conn.fetchval(
            """SELECT count(*) FROM offline_records r
               WHERE r.tenant_id = $1 AND r.device_id = $2 AND r.outcome = 'rejected'
                 AND r.settled_at > COALESCE((SELECT max(a.cleared_at) FROM alarms a
                                              WHERE a.tenant_id = $1 AND a.device_id = $2
                                                AND a.kind = 'DEVICE_FLAGGED' AND a.state = 'cleared'),
                                             '-infinity'::timestamptz)""",
            self.tenant_id, self.device_id)


def _access_columns(rows: Sequence[AccessRow]) -> list[list[Any]]:
    return [[r.tenant_id for r in rows], [r.device_id for r in rows], [r.nonce for r in rows],
            [r.member_id for r in rows], [r.location for r in rows], [r.method for r in rows],
            [r.purpose for r in rows], [r.passed for r in rows], [r.reason for r in rows], [r.rule for r in rows],
            [r.offline for r in rows], [r.event_time for r in rows]]


async def insert_served(conn: asyncpg.Connection | asyncpg.Pool, rows: Sequence[ServedRow]) -> None:
    if not rows:
        return
    await conn.execute(
        """INSERT INTO served_payments (tenant_id, transfer_id, location, device_id, event_time)
           SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::uuid[], $5::timestamptz[])
           ON CONFLICT DO NOTHING""",
        [r.tenant_id for r in rows], [r.transfer_id for r in rows], [r.location for r in rows],
        [r.device_id for r in rows], [r.event_time for r in rows])


class TxStore:
    def __init__(self, pool: asyncpg.Pool):
        self._pool = pool

    # --- offline records -----------------------------------------------------------------------

    @asynccontextmanager
    async def upload(self, *, tenant_id: uuid.UUID, device_id: uuid.UUID, now: datetime) -> AsyncIterator[UploadTx]:
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO device_sequences (tenant_id, device_id, updated_at) VALUES ($1, $2, $3)"
                " ON CONFLICT DO NOTHING", tenant_id, device_id, now)
            row = await conn.fetchrow(
                "SELECT highest, missing FROM device_sequences WHERE tenant_id = $1 AND device_id = $2 FOR UPDATE",
                tenant_id, device_id)
            yield UploadTx(conn, tenant_id=tenant_id, device_id=device_id, highest=row["highest"],
                           missing=list(row["missing"]))

    async def sequences(self, *, tenant_id: uuid.UUID, device_id: uuid.UUID) -> tuple[int, list[int]]:
        row = await self._pool.fetchrow(
            "SELECT highest, missing FROM device_sequences WHERE tenant_id = $1 AND device_id = $2",
            tenant_id, device_id)
        return (row["highest"], list(row["missing"])) if row else (0, [])

    async def sequences_of(self, *, tenant_id: uuid.UUID, device_ids: list[uuid.UUID]
                           ) -> dict[uuid.UUID, tuple[int, list[int]]]:
        """``sequences`` for many devices of a tenant in one query; devices with none are left out."""
        if not device_ids:
            return {}
        rows = await self._pool.fetch(
            "SELECT device_id, highest, missing FROM device_sequences WHERE tenant_id = $1 AND device_id = ANY($2)",
            tenant_id, device_ids)
        return {row["device_id"]: (row["highest"], list(row["missing"])) for row in rows}

    # --- access rules --------------------------------------------------------------------------

    async def current_access_rules(self, tenant_id: uuid.UUID) -> tuple[int, str, str] | None:
        row = await self._pool.fetchrow(
            "SELECT version, rules_json, sha256 FROM access_rules WHERE tenant_id = $1 ORDER BY version DESC LIMIT 1",
            tenant_id)
        return (row["version"], row["rules_json"], row["sha256"]) if row else None

    async def save_access_rules(self, *, tenant_id: uuid.UUID, rules_json: str, sha256: str,
                                now: datetime) -> tuple[int, bool]:
        """Store a new version unless it equals the current one. Answers (version, changed)."""
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended('devicehub.access_rules:' || $1, 0))",
                               str(tenant_id))
            row = await conn.fetchrow(
                "SELECT version, sha256 FROM access_rules WHERE tenant_id = $1 ORDER BY version DESC LIMIT 1",
                tenant_id)
            if row is not None and row["sha256"] == sha256:
                return row["version"], False
            version = (row["version"] if row else 0) + 1
            await conn.execute(
                "INSERT INTO access_rules (tenant_id, version, rules_json, sha256, created_at)"
                " VALUES ($1, $2, $3, $4, $5)", tenant_id, version, rules_json, sha256, now)
            await emit(conn, subject=SUBJECT_ACCESS_RULES_CHANGED, event_type=SUBJECT_ACCESS_RULES_CHANGED,
                       data={"tenant_id": str(tenant_id), "version": version, "sha256": sha256},
                       tenant_id=str(tenant_id))
            return version, True

    # --- access records ------------------------------------------------------------------------

    async def record_access(self, row: AccessRow, *, now: datetime) -> AccessRow:
        """Insert the record; an existing one of the same (device, nonce) is answered instead."""
        async with self._pool.acquire() as conn:
            inserted = await conn.fetchrow(
                f"""INSERT INTO access_records ({_ACCESS_COLUMNS}, recorded_at)
                    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
                    ON CONFLICT DO NOTHING RETURNING seq""",
                *[column[0] for column in _access_columns([row])], now)
            if inserted is not None:
                return row
            existing = await conn.fetchrow(
                f"SELECT seq, {_ACCESS_COLUMNS} FROM access_records WHERE tenant_id = $1 AND device_id = $2"
                " AND nonce = $3", row.tenant_id, row.device_id, row.nonce)
            return _access(existing)

    async def list_access(self, *, tenant_id: uuid.UUID, device_id: uuid.UUID | None, member_id: str,
                          location: str, since: datetime | None, until: datetime | None, before_seq: int | None,
                          limit: int) -> list[AccessRow]:
        """Newest first."""
        rows = await self._pool.fetch(
            f"""SELECT seq, {_ACCESS_COLUMNS} FROM access_records
                WHERE tenant_id = $1
                  AND ($2::uuid IS NULL OR device_id = $2)
                  AND ($3 = '' OR member_id = $3)
                  AND ($4 = '' OR location = $4)
                  AND ($5::timestamptz IS NULL OR event_time >= $5)
                  AND ($6::timestamptz IS NULL OR event_time < $6)
                  AND ($7::bigint IS NULL OR seq < $7)
                ORDER BY seq DESC LIMIT $8""",
            tenant_id, device_id, member_id, location, since, until, before_seq, limit)
        return [_access(r) for r in rows]

    # --- cabinet orders ------------------------------------------------------------------------

    async def cabinet_order(self, *, tenant_id: uuid.UUID, pos_device_id: uuid.UUID,
                            order_id: str) -> CabinetOrderRow | None:
        row = await self._pool.fetchrow(
            "SELECT * FROM cabinet_orders WHERE tenant_id = $1 AND pos_device_id = $2 AND order_id = $3",
            tenant_id, pos_device_id, order_id)
        return _cabinet(row) if row else None

    async def insert_cabinet_order(self, order: CabinetOrderRow, *, now: datetime) -> CabinetOrderRow:
        """Insert the order; if one with the same id exists (a concurrent duplicate) answer it."""
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow(
                """INSERT INTO cabinet_orders (tenant_id, pos_device_id, order_id, cabinet_device_id, request_sha256,
                                               member_id, amount_fen, charged_fen, item, stage, reason, holds,
                                               balances, created_at, updated_at)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12::jsonb, $13::jsonb, $14, $14)
                   ON CONFLICT DO NOTHING RETURNING *""",
                order.tenant_id, order.pos_device_id, order.order_id, order.cabinet_device_id, order.request_sha256,
                order.member_id, order.amount_fen, order.charged_fen, order.item, order.stage, order.reason,
                json.dumps(order.holds), json.dumps(order.balances), now)
            if row is None:
                row = await conn.fetchrow(
                    "SELECT * FROM cabinet_orders WHERE tenant_id = $1 AND pos_device_id = $2 AND order_id = $3",
                    order.tenant_id, order.pos_device_id, order.order_id)
        return _cabinet(row)

    async def settle_cabinet_order(self, *, tenant_id: uuid.UUID, pos_device_id: uuid.UUID, order_id: str,
                                   stage: str, reason: str, balances: list[dict[str, Any]],
                                   now: datetime) -> CabinetOrderRow:
        """Move a held order to its final stage (once; a later call answers the stage it has)."""
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow(
                """UPDATE cabinet_orders SET stage = $4, reason = $5, balances = $6::jsonb, updated_at = $7
                   WHERE tenant_id = $1 AND pos_device_id = $2 AND order_id = $3 AND stage = 'held' RETURNING *""",
                tenant_id, pos_device_id, order_id, stage, reason, json.dumps(balances), now)
            if row is None:
                row = await conn.fetchrow(
                    "SELECT * FROM cabinet_orders WHERE tenant_id = $1 AND pos_device_id = $2 AND order_id = $3",
                    tenant_id, pos_device_id, order_id)
        return _cabinet(row)

    # --- served payments and the dining index --------------------------------------------------

    async def insert_served(self, rows: Sequence[ServedRow]) -> None:
        await insert_served(self._pool, rows)

    async def prune_served(self, *, before: datetime) -> int:
        result = await self._pool.execute("DELETE FROM served_payments WHERE event_time < $1", before)
        return int(result.split()[-1])

    async def dining(self, *, tenant_id: uuid.UUID, since: datetime, until: datetime) -> list[DiningRow]:
        """Per location of the tenant's active canteen POS devices (scene tag "canteen", or no scene
        tag at all): payments served in [since, until), capacity summed, devices online."""
        rows = await self._pool.fetch(
            """WITH places AS (
                   SELECT location, sum(capacity)::int AS capacity, count(*) FILTER (WHERE online)::int AS online
                   FROM devices
                   WHERE tenant_id = $1 AND kind = 'pos' AND status = 'active' AND location <> ''
                     AND ('canteen' = ANY(scene_tags) OR cardinality(scene_tags) = 0)
                   GROUP BY location)
               SELECT p.location, p.capacity, p.online,
                      (SELECT count(*) FROM served_payments s
                       WHERE s.tenant_id = $1 AND s.location = p.location
                         AND s.event_time >= $2 AND s.event_time < $3)::int AS served
               FROM places p ORDER BY p.location""",
            tenant_id, since, until)
        return [DiningRow(location=r["location"], served=r["served"], capacity=r["capacity"],
                          devices_online=r["online"]) for r in rows]
