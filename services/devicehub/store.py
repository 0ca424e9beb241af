"""All of devicehub's registry, fleet, alarm and rollout SQL. Rows in, domain values out; no
protobuf and no rules here. Every statement names the tenant it works in.

Writes that change a device lock its row (``FOR UPDATE``) in one transaction with their outbox
event, so a change and its event exist together or not at all.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import asyncpg

from runtime.events import emit
from services.devicehub.registry import (
    Device,
    DeviceChanges,
    DeviceFilter,
    DeviceKind,
    DeviceStatus,
    NewDevice,
)

# flagged_at: when the device's open DEVICE_FLAGGED alarm was raised (the flag is that alarm).
_DEVICE_COLUMNS = """
    seq, tenant_id, device_id, kind, model, name, location, scene_tags, merchant_account_id,
    parent_device_id, status, firmware_version, config_json, config_version, reported_config_version,
    capacity, public_key, key_fingerprint, online, last_seen_at, queue_depth, oldest_queued_at,
    clock_offset_ms, synced_versions, created_at,
    (SELECT a.opened_at FROM alarms a WHERE a.tenant_id = devices.tenant_id AND a.device_id = devices.device_id
       AND a.kind = 'DEVICE_FLAGGED' AND a.state IN ('open', 'acknowledged')) AS flagged_at
"""


def device_from_row(row: asyncpg.Record) -> Device:
    return Device(
        seq=row["seq"],
        tenant_id=row["tenant_id"],
        device_id=row["device_id"],
        kind=DeviceKind(row["kind"]),
        model=row["model"],
        name=row["name"],
        location=row["location"],
        scene_tags=tuple(row["scene_tags"]),
        merchant_account_id=row["merchant_account_id"],
        parent_device_id=row["parent_device_id"],
        status=DeviceStatus(row["status"]),
        firmware_version=row["firmware_version"],
        config_json=row["config_json"],
        config_version=row["config_version"],
        reported_config_version=row["reported_config_version"],
        capacity=row["capacity"],
        public_key=None if row["public_key"] is None else bytes(row["public_key"]),
        key_fingerprint=row["key_fingerprint"],
        online=row["online"],
        last_seen_at=row["last_seen_at"],
        queue_depth=row["queue_depth"],
        oldest_queued_at=row["oldest_queued_at"],
        clock_offset_ms=row["clock_offset_ms"],
        synced_versions=dict(row["synced_versions"] or {}),
        created_at=row["created_at"],
        flagged_at=row["flagged_at"],
    )


class Tx:
    """One transaction's view of one tenant's devicehub rows."""

    def __init__(self, conn: asyncpg.Connection, *, tenant_id: uuid.UUID):
        self.conn = conn
        self.tenant_id = tenant_id

    async def emit(self, subject: str, data: dict[str, Any]) -> None:
        await emit(self.conn, subject=subject, event_type=subject, tenant_id=str(self.tenant_id), data=data)

    # --- devices ------------------------------------------------------------------------------

    async def insert_device(self, *, device_id: uuid.UUID, new: NewDevice, now: datetime) -> Device:
        row = await self.conn.fetchrow(
            f"INSERT INTO devices (tenant_id, device_id, kind, model, name, location, scene_tags,"
            f" merchant_account_id, parent_device_id, status, firmware_version, config_json, config_version,"
            f" capacity, created_at, updated_at)"
            f" VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 'pending', $10, $11, $12, $13, $14, $14)"
            f" RETURNING {_DEVICE_COLUMNS}",
            self.tenant_id, device_id, new.kind.value, new.model, new.name, new.location, list(new.scene_tags),
            new.merchant_account_id, new.parent_device_id, new.firmware_version, new.config_json,
            0 if new.config_json == "{}" else 1, new.capacity, now,
        )
        return device_from_row(row)

    async def device(self, device_id: uuid.UUID, *, lock: bool = False) -> Device | None:
        row = await self.conn.fetchrow(
            f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE tenant_id = $1 AND device_id = $2"
            + (" FOR UPDATE" if lock else ""),
            self.tenant_id, device_id,
        )
        return None if row is None else device_from_row(row)

    async def update_device(self, device_id: uuid.UUID, changes: DeviceChanges, *, now: datetime,
                            bump_config: bool) -> Device:
        sets: list[str] = ["updated_at = $3"]
        args: list[Any] = [self.tenant_id, device_id, now]

        def put(column: str, value: Any) -> None:
            args.append(value)
            sets.append(f"{column} = ${len(args)}")

        if changes.name is not None:
            put("name", changes.name)
        if changes.location is not None:
            put("location", changes.location)
        if changes.scene_tags is not None:
            put("scene_tags", list(changes.scene_tags))
        if changes.merchant_account_id is not None:
            put("merchant_account_id", changes.merchant_account_id)
        if changes.parent_device_id is not None:
            put("parent_device_id", None if changes.parent_device_id == "" else changes.parent_device_id)
        if changes.capacity is not None:
            put("capacity", changes.capacity)
        if changes.config_json is not None:
            put("config_json", changes.config_json)
        if bump_config:
            sets.append("config_version = config_version + 1")
        row = await self.conn.fetchrow(
            f"UPDATE devices SET {', '.join(sets)} WHERE tenant_id = $1 AND device_id = $2 RETURNING {_DEVICE_COLUMNS}",
            *args,
        )
        return device_from_row(row)

    async def set_config(self, device_id: uuid.UUID, *, config_json: str, now: datetime) -> Device:
        row = await self.conn.fetchrow(
            f"UPDATE devices SET config_json = $3, config_version = config_version + 1, updated_at = $4"
            f" WHERE tenant_id = $1 AND device_id = $2 RETURNING {_DEVICE_COLUMNS}",
            self.tenant_id, device_id, config_json, now,
        )
        return device_from_row(row)

    async def set_firmware(self, device_id: uuid.UUID, *, firmware_version: str, now: datetime) -> None:
        await self.conn.execute(
            "UPDATE devices SET firmware_version = $3, updated_at = $4 WHERE tenant_id = $1 AND device_id = $2",
            self.tenant_id, device_id, firmware_version, now,
        )

    async def enrol(self, device_id: uuid.UUID, *, public_key: bytes, fingerprint: str, firmware_version: str,
                    now: datetime) -> Device:
        row = await self.conn.fetchrow(
            f"UPDATE devices SET status = 'active', public_key = $3, key_fingerprint = $4,"
            f" firmware_version = CASE WHEN $5 = '' THEN firmware_version ELSE $5 END,"
            f" enrolled_at = $6, updated_at = $6"
            f" WHERE tenant_id = $1 AND device_id = $2 RETURNING {_DEVICE_COLUMNS}",
            self.tenant_id, device_id, public_key, fingerprint, firmware_version, now,
        )
        return device_from_row(row)

    async def decommission(self, device_id: uuid.UUID, *, now: datetime) -> Device:
        row = await self.conn.fetchrow(
            f"UPDATE devices SET status = 'decommissioned', public_key = NULL, online = false,"
            f" decommissioned_at = $3, updated_at = $3"
            f" WHERE tenant_id = $1 AND device_id = $2 RETURNING {_DEVICE_COLUMNS}",
            self.tenant_id, device_id, now,
        )
        await self.revoke_tokens(device_id, now=now)
        return device_from_row(row)

    # --- enrolment tokens ---------------------------------------------------------------------

    async def revoke_tokens(self, device_id: uuid.UUID, *, now: datetime) -> None:
        await self.conn.execute(
            "UPDATE enrolment_tokens SET revoked_at = $3 WHERE tenant_id = $1 AND device_id = $2"
            " AND used_at IS NULL AND revoked_at IS NULL",
            self.tenant_id, device_id, now,
        )

    async def insert_token(self, device_id: uuid.UUID, *, sha256: bytes, expires_at: datetime, now: datetime) -> None:
        await self.revoke_tokens(device_id, now=now)
        await self.conn.execute(
            "INSERT INTO enrolment_tokens (token_sha256, tenant_id, device_id, expires_at, created_at)"
            " VALUES ($1, $2, $3, $4, $5)",
            sha256, self.tenant_id, device_id, expires_at, now,
        )

    async def use_token(self, sha256: bytes, *, now: datetime) -> None:
        await self.conn.execute("UPDATE enrolment_tokens SET used_at = $2 WHERE token_sha256 = $1", sha256, now)


class DevicehubStore:
    def __init__(self, pool: asyncpg.Pool):
        self._pool = pool

    @property
    def pool(self) -> asyncpg.Pool:
        return self._pool

    @asynccontextmanager
    async def tx(self, tenant_id: uuid.UUID) -> AsyncIterator[Tx]:
        async with self._pool.acquire() as conn, conn.transaction():
            yield Tx(conn, tenant_id=tenant_id)

    async def device(self, *, tenant_id: uuid.UUID, device_id: uuid.UUID) -> Device | None:
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow(
                f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE tenant_id = $1 AND device_id = $2",
                tenant_id, device_id,
            )
        return None if row is None else device_from_row(row)

    async def devices(self, *, tenant_id: uuid.UUID, where: DeviceFilter, after: int | None, limit: int
                      ) -> list[Device]:
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE tenant_id = $1"
                " AND ($2::bigint IS NULL OR seq > $2)"
                " AND ($3::text IS NULL OR kind = $3)"
                " AND ($4::text IS NULL OR location = $4)"
                " AND ($5::text IS NULL OR status = $5)"
                " AND ($6::boolean IS NULL OR online = $6)"
                " ORDER BY seq LIMIT $7",
                tenant_id, after, where.kind.value if where.kind else None, where.location,
                where.status.value if where.status else None, where.online, limit,
            )
        return [device_from_row(r) for r in rows]

    async def token_owner_any(self, sha256: bytes) -> tuple[uuid.UUID, uuid.UUID] | None:
        """The (tenant, device) a token was made for, usable or not; None for an unknown token."""
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow(
                "SELECT tenant_id, device_id FROM enrolment_tokens WHERE token_sha256 = $1", sha256)
        return None if row is None else (row["tenant_id"], row["device_id"])

    async def token_usable(self, conn: asyncpg.Connection, sha256: bytes, *, now: datetime) -> bool:
        row = await conn.fetchrow(
            "SELECT 1 FROM enrolment_tokens WHERE token_sha256 = $1 AND used_at IS NULL AND revoked_at IS NULL"
            " AND expires_at > $2 FOR UPDATE", sha256, now,
        )
        return row is not None

    # --- fleet state --------------------------------------------------------------------------

    async def mark_online(self, *, tenant_id: uuid.UUID, device_id: uuid.UUID, now: datetime,
                          firmware_version: str, clock_offset_ms: int | None, last_sequence: int,
                          event: dict[str, Any] | None, subject: str, stream_id: uuid.UUID | None = None) -> bool:
        """Online since now, on the stream ``stream_id``, and a mark of the hello (now, the device's
        last issued sequence, the bundle version last sent to it); answers whether it was offline
        before (then the event is emitted). Marks no unsettled record needs any more go: those
        before the newest mark at or below the device's settled watermark."""
        async with self._pool.acquire() as conn, conn.transaction():
            was = await conn.fetchval(
                "SELECT online FROM devices WHERE tenant_id = $1 AND device_id = $2 FOR UPDATE", tenant_id, device_id)
            await conn.execute(
                "UPDATE devices SET online = true, last_seen_at = $3,"
                " firmware_version = CASE WHEN $4 = '' THEN firmware_version ELSE $4 END,"
                " clock_offset_ms = COALESCE($5, clock_offset_ms), stream_id = $6"
                " WHERE tenant_id = $1 AND device_id = $2",
                tenant_id, device_id, now, firmware_version, clock_offset_ms, stream_id,
            )
            await conn.execute(
                "INSERT INTO device_marks (tenant_id, device_id, marked_at, last_sequence, bundle_version)"
                " SELECT tenant_id, device_id, $3, $4, bundle_version_sent FROM devices"
                " WHERE tenant_id = $1 AND device_id = $2",
                tenant_id, device_id, now, last_sequence,
            )
            await conn.execute(
                """WITH settled AS (
                       SELECT CASE WHEN cardinality(missing) > 0 THEN (SELECT min(m) FROM unnest(missing) m) - 1
                                   ELSE highest END AS watermark
                       FROM device_sequences WHERE tenant_id = $1 AND device_id = $2)
                   DELETE FROM device_marks WHERE tenant_id = $1 AND device_id = $2 AND seq < (
                       SELECT max(seq) FROM device_marks WHERE tenant_id = $1 AND device_id = $2
                         AND last_sequence <= COALESCE((SELECT watermark FROM settled), 0))""",
                tenant_id, device_id,
            )
            if not was and event is not None:
                await emit(conn, subject=subject, event_type=subject, tenant_id=str(tenant_id), data=event)
        return not was

    async def record_bundle_sent(self, *, tenant_id: uuid.UUID, device_id: uuid.UUID, version: int) -> None:
        """The hub sent the device this POLICY_BUNDLE version (its next hello's mark remembers it)."""
        async with self._pool.acquire() as conn:
            await conn.execute(
                "UPDATE devices SET bundle_version_sent = $3 WHERE tenant_id = $1 AND device_id = $2",
                tenant_id, device_id, version,
            )

    async def heartbeat(self, *, tenant_id: uuid.UUID, device_id: uuid.UUID, now: datetime, firmware_version: str,
                        config_version: int, queue_depth: int, oldest_queued_at: datetime | None,
                        clock_offset_ms: int | None, health: dict[str, str], subject: str,
                        event: dict[str, Any], stream_id: uuid.UUID | None = None) -> bool:
        """Record a heartbeat on the stream ``stream_id`` (the device's stream from now on); answers
        whether the device was offline before (then the online event is emitted in the same
        transaction)."""
        async with self._pool.acquire() as conn, conn.transaction():
            was = await conn.fetchval(
                "SELECT online FROM devices WHERE tenant_id = $1 AND device_id = $2 AND status = 'active' FOR UPDATE",
                tenant_id, device_id)
            if was is None:
                return False
            await conn.execute(
                "UPDATE devices SET online = true, last_seen_at = $3,"
                " firmware_version = CASE WHEN $4 = '' THEN firmware_version ELSE $4 END,"
                " reported_config_version = $5, queue_depth = $6, oldest_queued_at = $7,"
                " clock_offset_ms = COALESCE($8, clock_offset_ms), health = $9,"
                " stream_id = COALESCE($10, stream_id)"
                " WHERE tenant_id = $1 AND device_id = $2",
                tenant_id, device_id, now, firmware_version, config_version, queue_depth, oldest_queued_at,
                clock_offset_ms, health, stream_id,
            )
            if not was:
                await emit(conn, subject=subject, event_type=subject, tenant_id=str(tenant_id), data=event)
        return not was

    async def mark_offline(self, *, tenant_id: uuid.UUID, device_id: uuid.UUID, subject: str,
                           event: dict[str, Any], only_seen_before: datetime | None = None,
                           stream_id: uuid.UUID | None = None) -> bool:
        """Offline now (when it was online, with ``only_seen_before`` last seen before it, and with
        ``stream_id`` still on that stream: a stream ending on one replica after its device came
        back on another changes nothing); answers whether it changed (then the event is emitted in
        the same transaction)."""
        async with self._pool.acquire() as conn, conn.transaction():
            changed = await conn.fetchval(
                "UPDATE devices SET online = false WHERE tenant_id = $1 AND device_id = $2 AND online"
                " AND ($3::timestamptz IS NULL OR last_seen_at < $3)"
                " AND ($4::uuid IS NULL OR stream_id IS NOT DISTINCT FROM $4) RETURNING true",
                tenant_id, device_id, only_seen_before, stream_id,
            )
            if changed:
                await emit(conn, subject=subject, event_type=subject, tenant_id=str(tenant_id), data=event)
        return bool(changed)

    async def stale_online(self, *, seen_before: datetime, limit: int = 500) -> list[tuple[uuid.UUID, uuid.UUID]]:
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT tenant_id, device_id FROM devices WHERE online AND last_seen_at < $1 LIMIT $2",
                seen_before, limit,
            )
        return [(r["tenant_id"], r["device_id"]) for r in rows]

    async def offline_too_long(self, *, seen_before: datetime, limit: int = 500) -> list[Device]:
        """Active devices offline and unseen since before ``seen_before`` (never-seen ones excluded)."""
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE status = 'active' AND NOT online"
                " AND last_seen_at < $1"
                " AND NOT EXISTS (SELECT 1 FROM alarms a WHERE a.tenant_id = devices.tenant_id"
                "   AND a.device_id = devices.device_id"
                "   AND a.kind = 'OFFLINE_TOO_LONG' AND a.state IN ('open', 'acknowledged'))"
                " ORDER BY last_seen_at LIMIT $2",
                seen_before, limit,
            )
        return [device_from_row(r) for r in rows]

    async def record_sync_ack(self, *, tenant_id: uuid.UUID, device_id: uuid.UUID, kind: str, version: int) -> None:
        async with self._pool.acquire() as conn:
            await conn.execute(
                "UPDATE devices SET synced_versions = synced_versions || jsonb_build_object($3::text, $4::bigint)"
                " WHERE tenant_id = $1 AND device_id = $2",
                tenant_id, device_id, kind, version,
            )

    async def active_devices(self, *, tenant_id: uuid.UUID, device_ids: Sequence[uuid.UUID]) -> list[Device]:
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE tenant_id = $1 AND device_id = ANY($2::uuid[])",
                tenant_id, list(device_ids),
            )
        return [device_from_row(r) for r in rows]


# --- alarms -----------------------------------------------------------------------------------------

_ALARM_COLUMNS = """
    seq, tenant_id, alarm_id, device_id, kind, severity, state, detail, count, opened_at, last_raised_at,
    acknowledged_at, acknowledged_by, cleared_at, cleared_by
"""


class AlarmStore:
    """The alarms table. ``raise_alarm`` opens one or counts a repeat of the open one, in one
    statement against the partial unique index, so concurrent raisers never make two."""

    def __init__(self, pool: asyncpg.Pool):
        self._pool = pool

    @staticmethod
    async def raise_alarm(conn: asyncpg.Connection, *, tenant_id: uuid.UUID, device_id: uuid.UUID, kind: str,
                          severity: str, detail: str, now: datetime) -> tuple[asyncpg.Record, bool]:
        """The open alarm after raising; True when it was opened now (False: a repeat)."""
        row = await conn.fetchrow(
            f"INSERT INTO alarms (tenant_id, alarm_id, device_id, kind, severity, state, detail, count,"
            f" opened_at, last_raised_at)"
            f" VALUES ($1, $2, $3, $4, $5, 'open', $6, 1, $7, $7)"
            f" ON CONFLICT (tenant_id, device_id, kind) WHERE state IN ('open', 'acknowledged')"
            f" DO UPDATE SET count = alarms.count + 1, last_raised_at = EXCLUDED.last_raised_at,"
            f"   detail = EXCLUDED.detail,"
            f"   severity = CASE WHEN EXCLUDED.severity = 'critical' OR alarms.severity = 'critical' THEN 'critical'"
            f"     WHEN EXCLUDED.severity = 'warning' OR alarms.severity = 'warning' THEN 'warning' ELSE 'info' END"
            f" RETURNING {_ALARM_COLUMNS}, (xmax = 0) AS inserted",
            tenant_id, uuid.uuid4(), device_id, kind, severity, detail, now,
        )
        return row, bool(row["inserted"])

    async def get(self, conn: asyncpg.Connection, *, tenant_id: uuid.UUID, alarm_id: uuid.UUID,
                  lock: bool = False) -> asyncpg.Record | None:
        return await conn.fetchrow(
            f"SELECT {_ALARM_COLUMNS} FROM alarms WHERE tenant_id = $1 AND alarm_id = $2"
            + (" FOR UPDATE" if lock else ""), tenant_id, alarm_id)

    @staticmethod
    async def acknowledge(conn: asyncpg.Connection, *, tenant_id: uuid.UUID, alarm_id: uuid.UUID, by: str,
                          now: datetime) -> asyncpg.Record:
        return await conn.fetchrow(
            f"UPDATE alarms SET state = 'acknowledged', acknowledged_at = $3, acknowledged_by = $4"
            f" WHERE tenant_id = $1 AND alarm_id = $2 RETURNING {_ALARM_COLUMNS}",
            tenant_id, alarm_id, now, by)

    @staticmethod
    async def clear(conn: asyncpg.Connection, *, tenant_id: uuid.UUID, alarm_id: uuid.UUID, by: str,
                    now: datetime) -> asyncpg.Record:
        return await conn.fetchrow(
            f"UPDATE alarms SET state = 'cleared', cleared_at = $3, cleared_by = $4"
            f" WHERE tenant_id = $1 AND alarm_id = $2 RETURNING {_ALARM_COLUMNS}",
            tenant_id, alarm_id, now, by)

    @staticmethod
    async def open_alarm(conn: asyncpg.Connection, *, tenant_id: uuid.UUID, device_id: uuid.UUID, kind: str
                         ) -> asyncpg.Record | None:
        return await conn.fetchrow(
            f"SELECT {_ALARM_COLUMNS} FROM alarms WHERE tenant_id = $1 AND device_id = $2 AND kind = $3"
            f" AND state IN ('open', 'acknowledged') FOR UPDATE", tenant_id, device_id, kind)

    async def list(self, *, tenant_id: uuid.UUID, states: list[str], device_id: uuid.UUID | None,
                   kind: str | None, after: int | None, limit: int) -> list[asyncpg.Record]:
        async with self._pool.acquire() as conn:
            return await conn.fetch(
                f"SELECT {_ALARM_COLUMNS} FROM alarms WHERE tenant_id = $1 AND state = ANY($2::text[])"
                " AND ($3::uuid IS NULL OR device_id = $3) AND ($4::text IS NULL OR kind = $4)"
                " AND ($5::bigint IS NULL OR seq > $5) ORDER BY seq LIMIT $6",
                tenant_id, states, device_id, kind, after, limit)


# --- rollouts ---------------------------------------------------------------------------------------

_ROLLOUT_COLUMNS = """
    seq, tenant_id, rollout_id, idempotency_key, request_sha256, target, version, config_json, kind, model,
    location, stage_sizes, success_threshold, error_threshold, state, current_stage, detail, created_at, updated_at
"""
_ROLLOUT_DEVICE_COLUMNS = "device_id, stage, step, reported_version, detail, told_at, updated_at"


class RolloutTx:
    """One transaction's view of one tenant's rollouts."""

    def __init__(self, conn: asyncpg.Connection, *, tenant_id: uuid.UUID):
        self.conn = conn
        self.tenant_id = tenant_id

    async def emit(self, subject: str, data: dict[str, Any]) -> None:
        await emit(self.conn, subject=subject, event_type=subject, tenant_id=str(self.tenant_id), data=data)

    async def by_key(self, idempotency_key: str) -> asyncpg.Record | None:
        return await self.conn.fetchrow(
            f"SELECT {_ROLLOUT_COLUMNS} FROM rollouts WHERE tenant_id = $1 AND idempotency_key = $2",
            self.tenant_id, idempotency_key)

    async def lock_key(self, idempotency_key: str) -> None:
        """Serialises creations under one key (the second waits, then finds the first)."""
        await self.conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))",
                                f"devicehub.rollout.{self.tenant_id}.{idempotency_key}")

    async def group(self, *, kind: str, model: str, location: str) -> list[uuid.UUID]:
        rows = await self.conn.fetch(
            "SELECT device_id FROM devices WHERE tenant_id = $1 AND status = 'active' AND kind = $2"
            " AND ($3 = '' OR model = $3) AND ($4 = '' OR location = $4) ORDER BY seq FOR SHARE",
            self.tenant_id, kind, model, location)
        return [r["device_id"] for r in rows]

    async def insert(self, *, rollout_id: uuid.UUID, idempotency_key: str, request_sha256: bytes, target: str,
                     version: str, config_json: str, kind: str, model: str, location: str, stage_sizes: list[int],
                     success_threshold: float, error_threshold: int, stages: list[list[uuid.UUID]],
                     now: datetime) -> None:
        await self.conn.execute(
            "INSERT INTO rollouts (tenant_id, rollout_id, idempotency_key, request_sha256, target, version,"
            " config_json, kind, model, location, stage_sizes, success_threshold, error_threshold, state,"
            " current_stage, created_at, updated_at)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, 'running', 0, $14, $14)",
            self.tenant_id, rollout_id, idempotency_key, request_sha256, target, version, config_json, kind, model,
            location, stage_sizes, success_threshold, error_threshold, now)
        await self.conn.executemany(
            "INSERT INTO rollout_devices (tenant_id, rollout_id, device_id, stage, step, updated_at)"
            " VALUES ($1, $2, $3, $4, $5, $6)",
            [(self.tenant_id, rollout_id, device_id, stage, "pending" if stage == 0 else "waiting", now)
             for stage, devices in enumerate(stages) for device_id in devices])

    async def rollout(self, rollout_id: uuid.UUID, *, lock: bool = False) -> asyncpg.Record | None:
        return await self.conn.fetchrow(
            f"SELECT {_ROLLOUT_COLUMNS} FROM rollouts WHERE tenant_id = $1 AND rollout_id = $2"
            + (" FOR UPDATE" if lock else ""), self.tenant_id, rollout_id)

    async def devices(self, rollout_id: uuid.UUID) -> list[asyncpg.Record]:
        return await self.conn.fetch(
            f"SELECT {_ROLLOUT_DEVICE_COLUMNS} FROM rollout_devices WHERE tenant_id = $1 AND rollout_id = $2"
            " ORDER BY stage, device_id", self.tenant_id, rollout_id)

    async def device(self, rollout_id: uuid.UUID, device_id: uuid.UUID) -> asyncpg.Record | None:
        return await self.conn.fetchrow(
            f"SELECT {_ROLLOUT_DEVICE_COLUMNS} FROM rollout_devices WHERE tenant_id = $1 AND rollout_id = $2"
            " AND device_id = $3 FOR UPDATE", self.tenant_id, rollout_id, device_id)

    async def set_step(self, rollout_id: uuid.UUID, device_id: uuid.UUID, *, step: str, reported_version: str,
                       detail: str, now: datetime) -> None:
        await self.conn.execute(
            "UPDATE rollout_devices SET step = $4, reported_version = $5, detail = $6, updated_at = $7"
            " WHERE tenant_id = $1 AND rollout_id = $2 AND device_id = $3",
            self.tenant_id, rollout_id, device_id, step, reported_version, detail, now)

    async def start_stage(self, rollout_id: uuid.UUID, *, stage: int, now: datetime) -> None:
        await self.conn.execute(
            "UPDATE rollouts SET current_stage = $3, updated_at = $4 WHERE tenant_id = $1 AND rollout_id = $2",
            self.tenant_id, rollout_id, stage, now)
        await self.conn.execute(
            "UPDATE rollout_devices SET step = 'pending', updated_at = $4"
            " WHERE tenant_id = $1 AND rollout_id = $2 AND stage = $3 AND step = 'waiting'",
            self.tenant_id, rollout_id, stage, now)

    async def finish(self, rollout_id: uuid.UUID, *, state: str, detail: str, now: datetime) -> None:
        await self.conn.execute(
            "UPDATE rollouts SET state = $3, detail = $4, updated_at = $5 WHERE tenant_id = $1 AND rollout_id = $2",
            self.tenant_id, rollout_id, state, detail, now)

    async def claim_untold(self, rollout_id: uuid.UUID, device_ids: Sequence[uuid.UUID], *, now: datetime
                           ) -> list[uuid.UUID]:
        """Mark as told (once) the given devices of the rollout's started stages, only while it
        runs; answers those marked now. The rollout row is share-locked, so a stop that commits
        first is seen and one that comes later waits for this."""
        state = await self.conn.fetchrow(
            "SELECT state, current_stage FROM rollouts WHERE tenant_id = $1 AND rollout_id = $2 FOR SHARE",
            self.tenant_id, rollout_id)
        if state is None or state["state"] == "stopped":
            return []
        rows = await self.conn.fetch(
            "UPDATE rollout_devices SET told_at = $5 WHERE tenant_id = $1 AND rollout_id = $2"
            " AND stage <= $3 AND step = 'pending' AND told_at IS NULL AND device_id = ANY($4::uuid[])"
            " RETURNING device_id",
            self.tenant_id, rollout_id, state["current_stage"], list(device_ids), now)
        return [r["device_id"] for r in rows]

    async def pending_for_device(self, device_id: uuid.UUID) -> list[asyncpg.Record]:
        """Running rollouts whose started stage holds the device, still pending (told or not)."""
        return await self.conn.fetch(
            f"SELECT {', '.join('r.' + c.strip() for c in _ROLLOUT_COLUMNS.split(','))}"
            " FROM rollouts r JOIN rollout_devices d ON d.rollout_id = r.rollout_id"
            " WHERE r.tenant_id = $1 AND d.device_id = $2 AND r.state <> 'stopped' AND d.stage <= r.current_stage"
            " AND d.step = 'pending' ORDER BY r.seq FOR SHARE OF r",
            self.tenant_id, device_id)

    async def mark_told(self, rollout_id: uuid.UUID, device_id: uuid.UUID, *, now: datetime) -> None:
        await self.conn.execute(
            "UPDATE rollout_devices SET told_at = COALESCE(told_at, $4) WHERE tenant_id = $1 AND rollout_id = $2"
            " AND device_id = $3", self.tenant_id, rollout_id, device_id, now)

    async def list(self, *, after: int | None, limit: int) -> list[asyncpg.Record]:
        return await self.conn.fetch(
            f"SELECT {_ROLLOUT_COLUMNS} FROM rollouts WHERE tenant_id = $1 AND ($2::bigint IS NULL OR seq < $2)"
            " ORDER BY seq DESC LIMIT $3", self.tenant_id, after, limit)


class RolloutStore:
    def __init__(self, pool: asyncpg.Pool):
        self._pool = pool

    @asynccontextmanager
    async def tx(self, tenant_id: uuid.UUID) -> AsyncIterator[RolloutTx]:
        async with self._pool.acquire() as conn, conn.transaction():
            yield RolloutTx(conn, tenant_id=tenant_id)
