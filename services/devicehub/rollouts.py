"""Rollouts of firmware or config to a device group in stages.

A rollout takes the ACTIVE devices of a kind (and model, and location, when set) at creation, in
registration order, and cuts them into stages by ``stage_sizes`` (the last stage takes whoever is
left). Devices of the started stages are told (an UpdateCommand on their stream, once; again on a
reconnect while still pending) and report their steps. The next stage starts when the share of
the current stage that succeeded reaches ``success_threshold``; the rollout SUCCEEDS when the last
stage does. ``error_threshold`` failed devices (all stages together) STOP it: alarm
ROLLOUT_FAILED, and no further device is told (telling claims a device under a share lock of the
rollout row, which a stop holds exclusively).

A device that succeeds gets the rollout's config (config rollouts: its config version bumps and
the CONFIG sync follows) or has its firmware version recorded (firmware rollouts).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg

from onecard.devicehub.v1 import devicehub_pb2 as pb
from runtime import paging
from runtime.idempotency import scoped_key
from runtime.errors import Conflict, FailedPrecondition, InvalidArgument, NotFound
from runtime.events import Event
from runtime.logs import get_logger
from services.devicehub.alarms import KIND_ROLLOUT_FAILED, SEVERITY_CRITICAL
from services.devicehub.backends import Backends
from services.devicehub.registry import (
    SUBJECT_DEVICE_CONFIG_CHANGED,
    DeviceKind,
    check_config,
    check_firmware,
    check_location,
    check_model,
    parse_uuid,
)
from services.devicehub.sessions import Session, Sessions
from services.devicehub.store import RolloutStore, RolloutTx, Tx
from services.devicehub.sync import Sync

log = get_logger(__name__)

MAX_STAGES = 20
MAX_KEY_CHARS = 128
MAX_DETAIL_CHARS = 500
DEFAULT_PAGE_SIZE = 20
MAX_PAGE_SIZE = 100

SUBJECT_CREATED = "devicehub.rollout.created"
SUBJECT_STAGE_STARTED = "devicehub.rollout.stage_started"
SUBJECT_DEVICE_REPORTED = "devicehub.rollout.device_reported"
SUBJECT_SUCCEEDED = "devicehub.rollout.succeeded"
SUBJECT_STOPPED = "devicehub.rollout.stopped"

TARGETS = {"firmware", "config"}
REPORTED_STEPS = {"downloading", "installing", "succeeded", "failed"}
FINAL_STEPS = {"succeeded", "failed"}


@dataclass(frozen=True)
class RolloutSpec:
    idempotency_key: str
    target: str
    version: str
    config_json: str
    kind: DeviceKind
    model: str
    location: str
    stage_sizes: tuple[int, ...]
    success_threshold: float
    error_threshold: int

    def sha256(self) -> bytes:
        body = {
            "target": self.target, "version": self.version, "config_json": self.config_json,
            "kind": self.kind.value, "model": self.model, "location": self.location,
            "stage_sizes": list(self.stage_sizes), "success_threshold": self.success_threshold,
            "error_threshold": self.error_threshold,
        }
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).digest()


@dataclass(frozen=True)
class RolloutDevice:
    device_id: uuid.UUID
    stage: int
    step: str  # waiting, pending, downloading, installing, succeeded, failed
    reported_version: str
    detail: str
    updated_at: datetime


@dataclass(frozen=True)
class Rollout:
    tenant_id: uuid.UUID
    rollout_id: uuid.UUID
    target: str
    version: str
    config_json: str
    kind: DeviceKind
    model: str
    location: str
    stage_sizes: tuple[int, ...]
    success_threshold: float
    error_threshold: int
    state: str  # running, succeeded, stopped
    current_stage: int
    created_at: datetime
    detail: str
    devices: tuple[RolloutDevice, ...] = ()
    seq: int = 0


def _rollout(row: asyncpg.Record, devices: list[asyncpg.Record] | None = None) -> Rollout:
    return Rollout(
        seq=row["seq"], tenant_id=row["tenant_id"], rollout_id=row["rollout_id"], target=row["target"],
        version=row["version"], config_json=row["config_json"], kind=DeviceKind(row["kind"]), model=row["model"],
        location=row["location"], stage_sizes=tuple(row["stage_sizes"]),
        success_threshold=row["success_threshold"], error_threshold=row["error_threshold"], state=row["state"],
        current_stage=row["current_stage"], created_at=row["created_at"], detail=row["detail"],
        devices=tuple(RolloutDevice(device_id=d["device_id"], stage=d["stage"], step=d["step"],
                                    reported_version=d["reported_version"], detail=d["detail"],
                                    updated_at=d["updated_at"]) for d in devices or []),
    )


# --- checks ---------------------------------------------------------------------------------------

def check_idempotency_key(value: str) -> str:
    if not 1 <= len(value) <= MAX_KEY_CHARS or not all(33 <= ord(c) <= 126 or c == " " for c in value):
        raise InvalidArgument("idempotency_key: 1 to 128 printable ASCII characters",
                              reason="IDEMPOTENCY_KEY_INVALID")
    return value


def make_spec(*, idempotency_key: str, key_scope: str, target: str | None, version: str, config_json: str,
              kind: DeviceKind | None,
              model: str, location: str, stage_sizes: list[int], success_threshold: float,
              error_threshold: int) -> RolloutSpec:
    # Filed under the caller's scope: another client's key of the same text is another rollout.
    key = scoped_key(key_scope, check_idempotency_key(idempotency_key))
    if target not in TARGETS:
        raise InvalidArgument("target must be firmware or config", reason="TARGET_INVALID")
    if kind is None:
        raise InvalidArgument("kind names the device group", reason="KIND_INVALID")
    if target == "firmware":
        version = check_firmware(version)
        if not version:
            raise InvalidArgument("a firmware rollout needs its version", reason="VERSION_INVALID")
        if config_json:
            raise InvalidArgument("a firmware rollout carries no config", reason="CONFIG_INVALID")
        config = ""
    else:
        if not config_json.strip():
            raise InvalidArgument("a config rollout needs its config_json", reason="CONFIG_INVALID")
        config = check_config(config_json)
        version = check_firmware(version)
    if not stage_sizes or len(stage_sizes) > MAX_STAGES or any(size < 1 for size in stage_sizes):
        raise InvalidArgument(f"stage_sizes: 1 to {MAX_STAGES} stages of at least one device",
                              reason="STAGE_SIZES_INVALID")
    if not 0 < success_threshold <= 1:
        raise InvalidArgument("success_threshold must be in (0, 1]", reason="SUCCESS_THRESHOLD_INVALID")
    if error_threshold < 1:
        raise InvalidArgument("error_threshold must be at least 1", reason="ERROR_THRESHOLD_INVALID")
    return RolloutSpec(
        idempotency_key=key, target=target, version=version, config_json=config, kind=kind,
        model=check_model(model) if model.strip() else "", location=check_location(location),
        stage_sizes=tuple(stage_sizes), success_threshold=success_threshold, error_threshold=error_threshold,
    )


def cut_stages(devices: list[uuid.UUID], stage_sizes: tuple[int, ...]) -> list[list[uuid.UUID]]:
    """Devices in order, cut by stage sizes; the last stage takes whoever is left; no empty stage."""
    stages: list[list[uuid.UUID]] = []
    at = 0
    for index, size in enumerate(stage_sizes):
        last = index == len(stage_sizes) - 1
        chunk = devices[at:] if last else devices[at:at + size]
        at += len(chunk)
        if chunk:
            stages.append(chunk)
    return stages


def stage_succeeded(devices: list[RolloutDevice], *, stage: int, threshold: float) -> bool:
    members = [d for d in devices if d.stage == stage]
    if not members:
        return True
    succeeded = sum(1 for d in members if d.step == "succeeded")
    # A small epsilon: 2/3 of a stage against a threshold of 0.6666666666666666.
    return succeeded / len(members) + 1e-9 >= threshold


def update_command(rollout: Rollout | asyncpg.Record) -> pb.ConnectResponse:
    get = (lambda k: rollout[k]) if isinstance(rollout, asyncpg.Record) else (lambda k: getattr(rollout, k))
    return pb.ConnectResponse(update_command=pb.UpdateCommand(
        rollout_id=str(get("rollout_id")),
        target=pb.ROLLOUT_TARGET_FIRMWARE if get("target") == "firmware" else pb.ROLLOUT_TARGET_CONFIG,
        version=get("version"), config_json=get("config_json")))


_STEP_FROM_PB = {
    pb.UPDATE_STEP_DOWNLOADING: "downloading",
    pb.UPDATE_STEP_INSTALLING: "installing",
    pb.UPDATE_STEP_SUCCEEDED: "succeeded",
    pb.UPDATE_STEP_FAILED: "failed",
}


class Rollouts:
    def __init__(self, *, backends: Backends, sessions: Sessions, sync: Sync):
        self._backends = backends
        self._sessions = sessions
        self._sync = sync

    @property
    def _store(self) -> RolloutStore:
        return RolloutStore(self._backends.store.pool)

    # --- admin ------------------------------------------------------------------------------------

    async def create(self, tenant_id: uuid.UUID, spec: RolloutSpec) -> tuple[Rollout, bool]:
        now = datetime.now(UTC)
        digest = spec.sha256()
        async with self._store.tx(tenant_id) as tx:
            await tx.lock_key(spec.idempotency_key)
            existing = await tx.by_key(spec.idempotency_key)
            if existing is not None:
                if bytes(existing["request_sha256"]) != digest:
                    raise Conflict("the idempotency key made a different rollout", reason="IDEMPOTENCY_KEY_REUSED")
                return _rollout(existing, await tx.devices(existing["rollout_id"])), False
            group = await tx.group(kind=spec.kind.value, model=spec.model, location=spec.location)
            if not group:
                raise FailedPrecondition("no active device in the group", reason="ROLLOUT_GROUP_EMPTY")
            stages = cut_stages(group, spec.stage_sizes)
            rollout_id = uuid.uuid4()
            await tx.insert(rollout_id=rollout_id, idempotency_key=spec.idempotency_key, request_sha256=digest,
                            target=spec.target, version=spec.version, config_json=spec.config_json,
                            kind=spec.kind.value, model=spec.model, location=spec.location,
                            stage_sizes=list(spec.stage_sizes), success_threshold=spec.success_threshold,
                            error_threshold=spec.error_threshold, stages=stages, now=now)
            data = {"rollout_id": str(rollout_id), "target": spec.target, "version": spec.version,
                    "devices": len(group), "stages": len(stages)}
            await tx.emit(SUBJECT_CREATED, data)
            await tx.emit(SUBJECT_STAGE_STARTED, {"rollout_id": str(rollout_id), "stage": 0})
            row = await tx.rollout(rollout_id)
            assert row is not None
            rollout = _rollout(row, await tx.devices(rollout_id))
        log.info("rollout created", tenant_id=str(tenant_id), rollout_id=str(rollout_id), devices=len(group))
        await self.tell_connected(tenant_id, rollout_id)
        return rollout, True

    async def get(self, tenant_id: uuid.UUID, rollout_id: str) -> Rollout:
        rid = parse_uuid(rollout_id, what="rollout_id", reason="ROLLOUT_ID_INVALID")
        async with self._store.tx(tenant_id) as tx:
            row = await tx.rollout(rid)
            if row is None:
                raise NotFound("no such rollout", reason="ROLLOUT_NOT_FOUND")
            return _rollout(row, await tx.devices(rid))

    async def list(self, tenant_id: uuid.UUID, *, page_size: int, page_token: str) -> tuple[list[Rollout], str]:
        limit = paging.page_size(page_size, default=DEFAULT_PAGE_SIZE, maximum=MAX_PAGE_SIZE)
        before = paging.parse_page_token(page_token)
        async with self._store.tx(tenant_id) as tx:
            rows = await tx.list(after=before, limit=limit + 1)
        rollouts = [_rollout(r) for r in rows[:limit]]
        return rollouts, paging.page_token(rollouts[-1].seq) if len(rows) > limit else ""

    # --- telling devices --------------------------------------------------------------------------

    async def tell_connected(self, tenant_id: uuid.UUID, rollout_id: uuid.UUID) -> None:
        """Send the UpdateCommand to this replica's connected devices of the started stages that
        were not told yet, each device once, whichever replica claims it (also after the rollout
        succeeded: its stragglers; never once it stopped)."""
        sessions = {s.device_id: s for s in self._sessions.of_tenant(tenant_id)}
        if not sessions:
            return
        async with self._store.tx(tenant_id) as tx:
            told = await tx.claim_untold(rollout_id, list(sessions), now=datetime.now(UTC))
            row = await tx.rollout(rollout_id) if told else None
        if row is None:
            return
        command = update_command(row)
        for device_id in told:
            sessions[device_id].send(command)

    async def on_connect(self, session: Session) -> None:
        """A (re)connected device gets the commands of running rollouts it has not acted on."""
        async with self._store.tx(session.tenant_id) as tx:
            rows = await tx.pending_for_device(session.device_id)
            now = datetime.now(UTC)
            for row in rows:
                await tx.mark_told(row["rollout_id"], session.device_id, now=now)
        for row in rows:
            session.send(update_command(row))

    async def on_event(self, event: Event, tenant_id: uuid.UUID) -> None:
        if event.subject == SUBJECT_STAGE_STARTED:
            try:
                rollout_id = uuid.UUID(str(event.data.get("rollout_id")))
            except ValueError:
                return
            await self.tell_connected(tenant_id, rollout_id)

    # --- reports ----------------------------------------------------------------------------------

    async def on_report(self, session: Session, report: pb.UpdateReport) -> None:
        rollout_id = parse_uuid(report.rollout_id, what="rollout_id", reason="ROLLOUT_ID_INVALID")
        step = _STEP_FROM_PB.get(report.step)
        if step is None:
            raise InvalidArgument("step must be downloading, installing, succeeded or failed", reason="STEP_INVALID")
        running_version = check_firmware(report.running_version)
        detail = report.detail[:MAX_DETAIL_CHARS]
        tenant_id, device_id = session.tenant_id, session.device_id
        now = datetime.now(UTC)
        started_stage: int | None = None
        config_changed = False
        async with self._store.tx(tenant_id) as tx:
            rollout = await tx.rollout(rollout_id, lock=True)
            if rollout is None:
                raise NotFound("no such rollout", reason="ROLLOUT_NOT_FOUND")
            mine = await tx.device(rollout_id, device_id)
            if mine is None:
                raise NotFound("the device is not in the rollout", reason="ROLLOUT_DEVICE_NOT_FOUND")
            if mine["step"] == "waiting":
                raise FailedPrecondition("the device's stage has not started", reason="ROLLOUT_STAGE_NOT_STARTED")
            if mine["step"] in FINAL_STEPS:
                return  # a repeat of a final report changes nothing
            await tx.set_step(rollout_id, device_id, step=step, reported_version=running_version, detail=detail,
                              now=now)
            await tx.emit(SUBJECT_DEVICE_REPORTED, {"rollout_id": str(rollout_id), "device_id": str(device_id),
                                                    "step": step, "running_version": running_version})
            if step == "succeeded":
                config_changed = await self._apply(tx, rollout, device_id, running_version, now=now)
            if rollout["state"] == "running" and step in FINAL_STEPS:
                started_stage = await self._advance(tx, rollout, device_id, now=now)
        if config_changed:
            await self._sync.push_config(tenant_id=tenant_id, device_id=device_id)
        if started_stage is not None:
            await self.tell_connected(tenant_id, rollout_id)

    async def _apply(self, tx: RolloutTx, rollout: asyncpg.Record, device_id: uuid.UUID, running_version: str, *,
                     now: datetime) -> bool:
        devices = Tx(tx.conn, tenant_id=tx.tenant_id)
        if rollout["target"] == "config":
            current = await devices.device(device_id, lock=True)
            if current is None or current.config_json == rollout["config_json"]:
                return False
            updated = await devices.set_config(device_id, config_json=rollout["config_json"], now=now)
            await devices.emit(SUBJECT_DEVICE_CONFIG_CHANGED,
                               {"device_id": str(device_id), "config_version": updated.config_version,
                                "rollout_id": str(rollout["rollout_id"])})
            return True
        await devices.set_firmware(device_id, firmware_version=running_version or rollout["version"], now=now)
        return False

    async def _advance(self, tx: RolloutTx, rollout: asyncpg.Record, device_id: uuid.UUID, *, now: datetime
                       ) -> int | None:
        """Stop at the error threshold, else start the next stage (or succeed) when the current
        stage reached its success threshold. Answers the stage started, if any."""
        rollout_id = rollout["rollout_id"]
        current = _rollout(rollout, await tx.devices(rollout_id))
        failed = sum(1 for d in current.devices if d.step == "failed")
        if failed >= current.error_threshold:
            detail = f"{failed} devices failed (error threshold {current.error_threshold}): stopped"
            await tx.finish(rollout_id, state="stopped", detail=detail, now=now)
            await tx.emit(SUBJECT_STOPPED, {"rollout_id": str(rollout_id), "failed": failed,
                                            "stage": current.current_stage})
            alarms = self._backends.alarms
            await alarms.raise_in(tx.conn, tenant_id=tx.tenant_id, device_id=device_id, kind=KIND_ROLLOUT_FAILED,
                                  severity=SEVERITY_CRITICAL,
                                  detail=f"rollout {rollout_id} stopped: {failed} devices failed")
            log.info("rollout stopped", tenant_id=str(tx.tenant_id), rollout_id=str(rollout_id), failed=failed)
            return None
        stage = current.current_stage
        last_stage = max(d.stage for d in current.devices)
        if not stage_succeeded(list(current.devices), stage=stage, threshold=current.success_threshold):
            return None
        if stage >= last_stage:
            await tx.finish(rollout_id, state="succeeded", detail="", now=now)
            await tx.emit(SUBJECT_SUCCEEDED, {"rollout_id": str(rollout_id)})
            return None
        await tx.start_stage(rollout_id, stage=stage + 1, now=now)
        await tx.emit(SUBJECT_STAGE_STARTED, {"rollout_id": str(rollout_id), "stage": stage + 1})
        return stage + 1
