"""Watching the fleet: online/offline from streams and heartbeats, and the alarms heartbeats and
silence raise.

- A stream that completes its handshake puts the device online (event devicehub.device.online)
  and marks the hello (time, the device's last issued record sequence: offline settlement dates
  records by it); the stream's end puts it offline (devicehub.device.offline) unless a newer
  stream took over, on this replica or another (the device's row names its current stream).
- A heartbeat records the firmware, reported config version, queue depth, the oldest queued
  record, health and the clock offset; an offset beyond the tenant's ``clock.max_device_skew_s``
  (its rule set) or else the hub's ``clock_drift_alarm_ms`` raises
  CLOCK_DRIFT, an oldest queued record older than ``backlog_alarm_after_s`` BACKLOG_TOO_OLD.
- The watcher marks devices silent for ``offline_after_s`` offline, and raises OFFLINE_TOO_LONG
  for those offline longer than ``offline_alarm_after_s``.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

from onecard.devicehub.v1 import devicehub_pb2 as pb
from runtime.errors import InvalidArgument
from runtime.logs import get_logger
from services.devicehub.alarms import (
    KIND_BACKLOG_TOO_OLD,
    KIND_CLOCK_DRIFT,
    KIND_OFFLINE_TOO_LONG,
    SEVERITY_WARNING,
)
from services.devicehub.backends import Backends
from services.devicehub.registry import SUBJECT_DEVICE_OFFLINE, SUBJECT_DEVICE_ONLINE, Device
from services.devicehub.sessions import Session
from services.devicehub.settings import DevicehubSettings

log = get_logger(__name__)

MAX_HEALTH_ENTRIES = 32
# A hello's last_sequence is stored as BIGINT; records above it are refused anyway (SEQUENCE_INVALID).
MAX_SEQUENCE = 2**63 - 1
MAX_HEALTH_CHARS = 200


def clock_offset_ms(device_time: Any, *, now: datetime) -> int | None:
    """Device clock minus hub clock in ms, or None when the device sent no time."""
    if device_time is None or (device_time.seconds == 0 and device_time.nanos == 0):
        return None
    return int((device_time.ToDatetime(tzinfo=UTC) - now).total_seconds() * 1000)


def _health(values: dict[str, str]) -> dict[str, str]:
    if len(values) > MAX_HEALTH_ENTRIES:
        raise InvalidArgument(f"at most {MAX_HEALTH_ENTRIES} health entries", reason="HEALTH_INVALID")
    for key, value in values.items():
        if len(key) > MAX_HEALTH_CHARS or len(value) > MAX_HEALTH_CHARS:
            raise InvalidArgument("health entries: at most 200 characters", reason="HEALTH_INVALID")
    return dict(values)


class Fleet:
    def __init__(self, *, settings: DevicehubSettings, backends: Backends):
        self._settings = settings
        self._backends = backends

    def _event(self, session_or_device: Session | Device, **extra: Any) -> dict[str, Any]:
        return {"device_id": str(session_or_device.device_id), **extra}

    async def _check_drift(self, *, tenant_id: Any, device_id: Any, offset: int | None) -> None:
        if offset is None:
            return
        limit = self._settings.clock_drift_alarm_ms
        tx = self._backends.tx
        if tx is not None and abs(offset) > min(limit, 1000):
            # The tenant may set its own limit (its rule set's clock.max_device_skew_s).
            limit = await tx.device_skew_limit_ms(str(tenant_id), default_ms=limit)
        if abs(offset) > limit:
            await self._backends.alarms.raise_alarm(
                tenant_id=str(tenant_id), device_id=str(device_id), kind=KIND_CLOCK_DRIFT, severity=SEVERITY_WARNING,
                detail=f"device clock off by {offset} ms (limit {limit} ms)")

    async def connected(self, session: Session, *, device: Device, hello: pb.Hello, now: datetime) -> None:
        offset = clock_offset_ms(hello.device_time if hello.HasField("device_time") else None, now=now)
        firmware = hello.firmware_version[:64]
        await self._backends.store.mark_online(
            tenant_id=session.tenant_id, device_id=session.device_id, now=now, firmware_version=firmware,
            clock_offset_ms=offset, last_sequence=min(hello.last_sequence, MAX_SEQUENCE),
            subject=SUBJECT_DEVICE_ONLINE, event=self._event(session, reason="connected"), stream_id=session.stream_id)
        # Back: an open OFFLINE_TOO_LONG alarm has nothing left to say.
        await self._backends.alarms.condition_ended(tenant_id=session.tenant_id, device_id=session.device_id,
                                                    kind=KIND_OFFLINE_TOO_LONG)
        await self._check_drift(tenant_id=session.tenant_id, device_id=session.device_id, offset=offset)

    async def disconnected(self, session: Session) -> None:
        # Only while this stream is the device's: it may have come back on another replica already.
        await self._backends.store.mark_offline(tenant_id=session.tenant_id, device_id=session.device_id,
                                                subject=SUBJECT_DEVICE_OFFLINE,
                                                event=self._event(session, reason="stream_closed"),
                                                stream_id=session.stream_id)

    async def heartbeat(self, session: Session, heartbeat: pb.Heartbeat) -> None:
        now = datetime.now(UTC)
        settings = self._settings
        if heartbeat.queue_depth < 0:
            raise InvalidArgument("queue_depth must not be negative", reason="QUEUE_DEPTH_INVALID")
        if heartbeat.config_version < 0:
            raise InvalidArgument("config_version must not be negative", reason="CONFIG_VERSION_INVALID")
        if len(heartbeat.firmware_version) > 64:
            raise InvalidArgument("firmware_version: at most 64 characters", reason="FIRMWARE_VERSION_INVALID")
        health = _health(dict(heartbeat.health))
        offset = clock_offset_ms(heartbeat.device_time if heartbeat.HasField("device_time") else None, now=now)
        oldest = heartbeat.oldest_queued_at.ToDatetime(tzinfo=UTC) if heartbeat.HasField("oldest_queued_at") else None
        came_back = await self._backends.store.heartbeat(
            tenant_id=session.tenant_id, device_id=session.device_id, now=now,
            firmware_version=heartbeat.firmware_version, config_version=heartbeat.config_version,
            queue_depth=heartbeat.queue_depth, oldest_queued_at=oldest, clock_offset_ms=offset, health=health,
            subject=SUBJECT_DEVICE_ONLINE, event=self._event(session, reason="heartbeat"), stream_id=session.stream_id)
        if came_back:
            await self._backends.alarms.condition_ended(tenant_id=session.tenant_id,
                                                        device_id=session.device_id, kind=KIND_OFFLINE_TOO_LONG)
        await self._check_drift(tenant_id=session.tenant_id, device_id=session.device_id, offset=offset)
        if oldest is not None and heartbeat.queue_depth > 0:
            # The device's clock wrote the record's time: judge its age on the device's clock.
            age_s = ((now + timedelta(milliseconds=offset or 0)) - oldest).total_seconds()
            if age_s > settings.backlog_alarm_after_s:
                await self._backends.alarms.raise_alarm(
                    tenant_id=str(session.tenant_id), device_id=str(session.device_id), kind=KIND_BACKLOG_TOO_OLD,
                    severity=SEVERITY_WARNING,
                    detail=f"{heartbeat.queue_depth} offline records queued, the oldest {int(age_s)} s old")

    # --- the watcher ------------------------------------------------------------------------------

    async def sweep(self) -> None:
        settings = self._settings
        store = self._backends.store
        now = datetime.now(UTC)
        silent_since = now - timedelta(seconds=settings.offline_after_s)
        for tenant_id, device_id in await store.stale_online(seen_before=silent_since):
            await store.mark_offline(tenant_id=tenant_id, device_id=device_id, subject=SUBJECT_DEVICE_OFFLINE,
                                     event={"device_id": str(device_id), "reason": "silent"},
                                     only_seen_before=silent_since)
        for device in await store.offline_too_long(seen_before=now - timedelta(seconds=settings.offline_alarm_after_s)):
            assert device.last_seen_at is not None
            minutes = int((now - device.last_seen_at).total_seconds() // 60)
            await self._backends.alarms.raise_alarm(
                tenant_id=str(device.tenant_id), device_id=str(device.device_id), kind=KIND_OFFLINE_TOO_LONG,
                severity=SEVERITY_WARNING,
                detail=f"offline for {minutes} min (last seen {device.last_seen_at:%Y-%m-%d %H:%M:%S} UTC)")

    async def watch_forever(self) -> None:
        while True:
            await asyncio.sleep(self._settings.heartbeat_check_interval_s)
            try:
                await self.sweep()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the next round tries again
                log.warning("fleet sweep failed", error=type(exc).__name__)
