"""Fleet alarms: at most one open (open or acknowledged) alarm per device and kind; a repeat
raises its count. ``Alarms`` is the AlarmSink every part of devicehub raises through.

Kinds and severities are the proto enum values (onecard.devicehub.v1.AlarmKind / AlarmSeverity)
at the edge and their names without prefix in the table ('SEQUENCE_GAP', 'critical').
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg

from runtime import paging
from runtime.errors import FailedPrecondition, InvalidArgument, NotFound
from runtime.events import emit
from runtime.logs import get_logger
from services.devicehub.registry import check_by, parse_uuid
from services.devicehub.store import AlarmStore

log = get_logger(__name__)

# onecard.devicehub.v1.AlarmKind values and names (without the ALARM_KIND_ prefix).
KIND_NAMES: dict[int, str] = {
    1: "OFFLINE_TOO_LONG",
    2: "CLOCK_DRIFT",
    3: "BACKLOG_TOO_OLD",
    4: "SEQUENCE_GAP",
    5: "CODE_REPLAY",
    6: "SHORTFALL",
    7: "ROLLOUT_FAILED",
    8: "RECORD_REJECTED",
    9: "DEVICE_FLAGGED",
}
KIND_VALUES = {name: value for value, name in KIND_NAMES.items()}
# onecard.devicehub.v1.AlarmSeverity values.
SEVERITY_NAMES: dict[int, str] = {1: "info", 2: "warning", 3: "critical"}
SEVERITY_VALUES = {name: value for value, name in SEVERITY_NAMES.items()}
# onecard.devicehub.v1.AlarmState values.
STATE_NAMES: dict[int, str] = {1: "open", 2: "acknowledged", 3: "cleared"}
STATE_VALUES = {name: value for value, name in STATE_NAMES.items()}

KIND_OFFLINE_TOO_LONG = 1
KIND_CLOCK_DRIFT = 2
KIND_BACKLOG_TOO_OLD = 3
KIND_ROLLOUT_FAILED = 7
SEVERITY_INFO = 1
SEVERITY_WARNING = 2
SEVERITY_CRITICAL = 3

SUBJECT_RAISED = "devicehub.alarm.raised"
SUBJECT_ACKNOWLEDGED = "devicehub.alarm.acknowledged"
SUBJECT_CLEARED = "devicehub.alarm.cleared"

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
MAX_DETAIL_CHARS = 1000


@dataclass(frozen=True)
class Alarm:
    tenant_id: uuid.UUID
    alarm_id: uuid.UUID
    device_id: uuid.UUID
    kind: str
    severity: str
    state: str
    detail: str
    count: int
    opened_at: datetime
    last_raised_at: datetime
    acknowledged_at: datetime | None
    acknowledged_by: str
    cleared_at: datetime | None
    cleared_by: str
    seq: int = 0


def alarm_from_row(row: asyncpg.Record) -> Alarm:
    return Alarm(
        seq=row["seq"], tenant_id=row["tenant_id"], alarm_id=row["alarm_id"], device_id=row["device_id"],
        kind=row["kind"], severity=row["severity"], state=row["state"], detail=row["detail"], count=row["count"],
        opened_at=row["opened_at"], last_raised_at=row["last_raised_at"], acknowledged_at=row["acknowledged_at"],
        acknowledged_by=row["acknowledged_by"], cleared_at=row["cleared_at"], cleared_by=row["cleared_by"],
    )


def _event_data(alarm: Alarm) -> dict[str, Any]:
    return {
        "alarm_id": str(alarm.alarm_id),
        "device_id": str(alarm.device_id),
        "kind": alarm.kind,
        "severity": alarm.severity,
        "state": alarm.state,
        "count": alarm.count,
        "detail": alarm.detail,
    }


def _kind_name(kind: int) -> str:
    name = KIND_NAMES.get(kind)
    if name is None:
        raise InvalidArgument("unknown alarm kind", reason="ALARM_KIND_INVALID")
    return name


def _severity_name(severity: int) -> str:
    name = SEVERITY_NAMES.get(severity)
    if name is None:
        raise InvalidArgument("unknown alarm severity", reason="ALARM_SEVERITY_INVALID")
    return name


# Who clears an alarm whose condition went away by itself.
CLEARED_BY_HUB = "devicehub"


class Alarms:
    """The AlarmSink of devicehub, and the alarm RPCs' domain."""

    def __init__(self, pool: asyncpg.Pool):
        self._pool = pool
        self._store = AlarmStore(pool)

    async def raise_alarm(self, *, tenant_id: str, device_id: str, kind: int, severity: int, detail: str) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            await self.raise_in(conn, tenant_id=tenant_id, device_id=device_id, kind=kind, severity=severity,
                                detail=detail)

    async def raise_in(self, conn: asyncpg.Connection, *, tenant_id: str | uuid.UUID, device_id: str | uuid.UUID,
                       kind: int, severity: int, detail: str) -> Alarm:
        """Raise inside the caller's transaction (with the change that caused it)."""
        tenant = tenant_id if isinstance(tenant_id, uuid.UUID) else uuid.UUID(tenant_id)
        device = device_id if isinstance(device_id, uuid.UUID) else uuid.UUID(device_id)
        row, opened = await AlarmStore.raise_alarm(
            conn, tenant_id=tenant, device_id=device, kind=_kind_name(kind), severity=_severity_name(severity),
            detail=detail[:MAX_DETAIL_CHARS], now=datetime.now(UTC))
        alarm = alarm_from_row(row)
        await emit(conn, subject=SUBJECT_RAISED, event_type=SUBJECT_RAISED, tenant_id=str(tenant),
                   data={**_event_data(alarm), "opened": opened})
        if opened:
            log.info("alarm opened", tenant_id=str(tenant), device_id=str(device), kind=alarm.kind)
        return alarm

    async def condition_ended(self, *, tenant_id: str | uuid.UUID, device_id: str | uuid.UUID, kind: int) -> Alarm | None:
        """The condition behind an alarm kind went away (the gap was filled, the device is back):
        its open alarm, if any, is cleared by ``devicehub``."""
        tenant = tenant_id if isinstance(tenant_id, uuid.UUID) else uuid.UUID(tenant_id)
        device = device_id if isinstance(device_id, uuid.UUID) else uuid.UUID(device_id)
        async with self._pool.acquire() as conn, conn.transaction():
            return await self.clear_open(conn, tenant_id=tenant, device_id=device, kind=kind, by=CLEARED_BY_HUB)

    async def clear_open(self, conn: asyncpg.Connection, *, tenant_id: uuid.UUID, device_id: uuid.UUID, kind: int,
                         by: str) -> Alarm | None:
        """Clear the device's open alarm of this kind, if any (the condition went away)."""
        row = await AlarmStore.open_alarm(conn, tenant_id=tenant_id, device_id=device_id, kind=_kind_name(kind))
        if row is None:
            return None
        cleared = alarm_from_row(await AlarmStore.clear(conn, tenant_id=tenant_id, alarm_id=row["alarm_id"], by=by,
                                                        now=datetime.now(UTC)))
        await emit(conn, subject=SUBJECT_CLEARED, event_type=SUBJECT_CLEARED, tenant_id=str(tenant_id),
                   data={**_event_data(cleared), "by": by})
        return cleared

    async def acknowledge(self, *, tenant_id: uuid.UUID, alarm_id: str, by: str) -> Alarm:
        return await self._change(tenant_id=tenant_id, alarm_id=alarm_id, by=by, to="acknowledged")

    async def clear(self, *, tenant_id: uuid.UUID, alarm_id: str, by: str) -> Alarm:
        return await self._change(tenant_id=tenant_id, alarm_id=alarm_id, by=by, to="cleared")

    async def _change(self, *, tenant_id: uuid.UUID, alarm_id: str, by: str, to: str) -> Alarm:
        """open -> acknowledged -> cleared, by a person. Asking for the state the alarm is in
        answers it unchanged; acknowledging a cleared alarm is refused."""
        alarm_uuid = parse_uuid(alarm_id, what="alarm_id", reason="ALARM_ID_INVALID")
        by = check_by(by)
        async with self._pool.acquire() as conn, conn.transaction():
            row = await self._store.get(conn, tenant_id=tenant_id, alarm_id=alarm_uuid, lock=True)
            if row is None:
                raise NotFound("no such alarm", reason="ALARM_NOT_FOUND")
            if row["state"] == to:
                return alarm_from_row(row)
            if row["state"] == "cleared":
                raise FailedPrecondition("the alarm was cleared", reason="ALARM_CLEARED")
            write, subject = ((AlarmStore.acknowledge, SUBJECT_ACKNOWLEDGED) if to == "acknowledged"
                              else (AlarmStore.clear, SUBJECT_CLEARED))
            alarm = alarm_from_row(await write(conn, tenant_id=tenant_id, alarm_id=alarm_uuid, by=by,
                                               now=datetime.now(UTC)))
            await emit(conn, subject=subject, event_type=subject, tenant_id=str(tenant_id),
                       data={**_event_data(alarm), "by": by})
        return alarm

    async def list(self, *, tenant_id: uuid.UUID, state: int, device_id: str, kind: int, page_size: int,
                   page_token: str) -> tuple[list[Alarm], str]:
        if state == 0:
            states = ["open", "acknowledged"]
        elif state in STATE_NAMES:
            states = [STATE_NAMES[state]]
        else:
            raise InvalidArgument("unknown alarm state", reason="ALARM_STATE_INVALID")
        device = parse_uuid(device_id, what="device_id", reason="DEVICE_ID_INVALID") if device_id else None
        kind_name = _kind_name(kind) if kind else None
        limit = paging.page_size(page_size, default=DEFAULT_PAGE_SIZE, maximum=MAX_PAGE_SIZE)
        after = paging.parse_page_token(page_token)
        rows = await self._store.list(tenant_id=tenant_id, states=states, device_id=device, kind=kind_name,
                                      after=after, limit=limit + 1)
        alarms = [alarm_from_row(r) for r in rows[:limit]]
        token = paging.page_token(alarms[-1].seq) if len(rows) > limit else ""
        return alarms, token
