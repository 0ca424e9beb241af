"""REST for the device hub: ``onecard.devicehub.v1.DeviceAdminService`` as a school's operators and
its partners use it.

- ``devices:admin``: the device registry (register with a one-time enrolment token, list, read,
  update, decommission, new enrolment tokens), alarms (list, acknowledge, clear), the access rules
  of gates and shuttle readers and their pass/deny records, rollouts of firmware and config;
- ``data:read``: the data API, today the real-time dining index (people served per canteen in a
  window, against capacity), as JSON or CSV.

Each handler only translates. Whether a device may be decommissioned, whether a rule document is
valid, how a rollout proceeds is the device hub's to say; its refusals come back as problems
through ``gateway.problems`` (an invalid access rule document: 400 with the hub's ``reason`` and
the ``rule`` at fault). Another tenant's device, alarm or rollout is 404, as one that does not exist.
Devices themselves do not use these routes: they enrol and connect over the hub's gRPC
``DeviceService``.
"""
from __future__ import annotations

import json
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Path, Query, Response
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints

from gateway.auth import AdminDevices, ReadData
from gateway.exports import csv_text
from gateway.models import TenantId, enum_name, enum_value, timestamp
from gateway.problems import ProblemError, problem_responses
from gateway.routes.ledger import IdempotencyKeyHeader, _key
from gateway.state import State
from onecard.devicehub.v1 import devicehub_pb2 as pb
from gateway.models import or_none
from runtime.idempotency import client_scope
from runtime.wire import timestamp_pb

router = APIRouter(responses=problem_responses(400, 401, 403, 404, 422, 429, 501, 503, 504))

# A canonical UUID (any case; sent on in lower case). Anything else is 422 before the hub is asked.
UUID_PATTERN = r"^[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}$"
UUID_OR_EMPTY_PATTERN = r"^$|" + UUID_PATTERN

# The gateway's bounds; the hub checks its own again.
MAX_DEVICE_NAME_CHARS = 200
MAX_MODEL_CHARS = 100
MAX_LOCATION_CHARS = 200
MAX_FIRMWARE_CHARS = 64
MAX_SCENE_TAGS = 32
MAX_SCENE_TAG_CHARS = 64
MAX_CAPACITY = 1_000_000
MAX_CONFIG_BYTES = 64 * 1024
MAX_ACCESS_RULES_BYTES = 1024 * 1024
MAX_ENROLMENT_TOKEN_TTL_S = 30 * 24 * 3600
MAX_PAGE_SIZE = 200
MAX_RECORDS_PAGE_SIZE = 1000
# A rollout carries its devices: shorter pages.
MAX_ROLLOUTS_PAGE_SIZE = 100
MAX_CURSOR_CHARS = 1024
MAX_STAGES = 20
MAX_STAGE_SIZE = 100_000
MAX_ERROR_THRESHOLD = 100_000
DEFAULT_WINDOW_S = 15 * 60
MIN_WINDOW_S = 60
MAX_WINDOW_S = 24 * 3600
DINING_COLUMNS = ["as_of", "window_s", "location", "served", "capacity", "load", "devices_online"]
# Enrolment tokens are shown once: no cache may keep an answer carrying one.
NO_STORE = {"Cache-Control": "no-store"}

DeviceKindName = Literal["pos", "gate", "shuttle", "cabinet", "kiosk"]
DeviceStatusName = Literal["pending", "active", "decommissioned"]
AlarmKindName = Literal["offline_too_long", "clock_drift", "backlog_too_old", "sequence_gap", "code_replay",
                        "shortfall", "rollout_failed", "record_rejected", "device_flagged"]
AlarmSeverityName = Literal["info", "warning", "critical"]
AlarmStateName = Literal["open", "acknowledged", "cleared"]
MethodName = Literal["code", "card", "face"]
RolloutTargetName = Literal["firmware", "config"]
RolloutStateName = Literal["running", "succeeded", "stopped"]
UpdateStepName = Literal["waiting", "pending", "downloading", "installing", "succeeded", "failed"]

UuidOrEmpty = Annotated[str, StringConstraints(pattern=UUID_OR_EMPTY_PATTERN)]
SceneTag = Annotated[str, StringConstraints(min_length=1, max_length=MAX_SCENE_TAG_CHARS)]

DeviceId = Annotated[str, Path(pattern=UUID_PATTERN, description="A device id (UUID).")]
AlarmId = Annotated[str, Path(pattern=UUID_PATTERN, description="An alarm id (UUID).")]
RolloutId = Annotated[str, Path(pattern=UUID_PATTERN, description="A rollout id (UUID).")]
PageSize = Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)]
PageToken = Annotated[str, Query(max_length=MAX_CURSOR_CHARS, description="next_page_token of the page before.")]


def _document(value: str) -> dict[str, Any] | None:
    """A JSON document the hub stored (config, access rules) as an object; null when empty."""
    if not value:
        return None
    try:
        parsed = json.loads(value)
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) else None


def _dump(document: dict[str, Any], *, limit: int, what: str) -> str:
    text = json.dumps(document, ensure_ascii=False, separators=(",", ":"))
    if len(text.encode()) > limit:
        raise ProblemError(status=413, reason="PAYLOAD_TOO_LARGE", detail=f"the {what} is larger than {limit} bytes")
    return text


# --- shapes ------------------------------------------------------------------------------------

_DEVICE_EXAMPLE = {
    "tenant_id": "6f1c7a52-3f3e-4c1b-9a57-1b0f1d7e8a90", "device_id": "3b0d9a51-6a43-4f7e-9d55-2a9f0c1e7b10",
    "kind": "pos", "model": "HX-P300", "name": "North Canteen POS 3", "location": "north-canteen",
    "scene_tags": ["canteen"], "merchant_account_id": "6a0c4d2e-1b3f-4a5c-9d7e-8f9a0b1c2d3e",
    "parent_device_id": None, "status": "active", "firmware_version": "2.4.1", "config_version": 3,
    "reported_config_version": 3, "config": {"offline": {"max_records": 5000}}, "online": True,
    "last_seen_at": "2026-11-26T04:31:07Z", "queue_depth": 0, "clock_offset_ms": -120,
    "last_settled_sequence": 812, "capacity": 120, "created_at": "2026-11-20T02:00:00Z",
    "key_fingerprint": "9f2c1e0a4b7d8c6e", "flagged": False, "flagged_at": None,
}


class DeviceOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [_DEVICE_EXAMPLE]})

    tenant_id: str
    device_id: str
    kind: DeviceKindName
    model: str
    name: str = Field(description="A name a person reads.")
    location: str = Field(description="Where it stands: a canteen, a building entrance, a bus line. Access rules "
                          "match gates by it; the dining index groups POS devices by it.")
    scene_tags: list[str] = Field(description="Scenes of the tenant's rule set (canteen, gym, gate, shuttle, ...).")
    merchant_account_id: str | None = Field(description="The ledger settlement account a POS or cabinet books to.")
    parent_device_id: str | None = Field(description="A cabinet's POS.")
    status: DeviceStatusName = Field(description="pending: registered, waiting for its enrolment; active: enrolled; "
                                     "decommissioned: for good.")
    firmware_version: str | None
    config_version: int = Field(description="The config version the hub wants the device on.")
    reported_config_version: int = Field(description="The config version the device last reported.")
    config: dict[str, Any] | None = Field(description="The device's config, a JSON object ({} when none was set).")
    online: bool
    last_seen_at: datetime | None
    queue_depth: int = Field(description="Offline records waiting for upload, at the last heartbeat.")
    clock_offset_ms: int = Field(description="Device clock minus hub clock at the last heartbeat.")
    last_settled_sequence: int = Field(description="The highest offline record sequence settled.")
    capacity: int = Field(description="Diners its location can serve per window (dining index); 0: not counted.")
    created_at: datetime | None
    key_fingerprint: str | None = Field(description="Hex of the first 8 bytes of SHA-256 of the enrolled public "
                                        "key; null before enrolment.")
    flagged: bool = Field(description="Flagged for review: its uploads held many records offline settlement "
                          "rejected (a device_flagged alarm is open); clearing that alarm clears the flag.")
    flagged_at: datetime | None = Field(description="When the open device_flagged alarm was raised; null when not "
                                        "flagged.")


def _device(d: pb.Device) -> DeviceOut:
    return DeviceOut(
        tenant_id=d.tenant_id, device_id=d.device_id, kind=enum_name(pb.DeviceKind, value=d.kind), model=d.model,
        name=d.name, location=d.location, scene_tags=list(d.scene_tags),
        merchant_account_id=or_none(d.merchant_account_id), parent_device_id=or_none(d.parent_device_id),
        status=enum_name(pb.DeviceStatus, value=d.status), firmware_version=or_none(d.firmware_version),
        config_version=d.config_version, reported_config_version=d.reported_config_version,
        config=_document(d.config_json), online=d.online, last_seen_at=timestamp(d.last_seen_at),
        queue_depth=d.queue_depth, clock_offset_ms=d.clock_offset_ms, last_settled_sequence=d.last_settled_sequence,
        capacity=d.capacity, created_at=timestamp(d.created_at), key_fingerprint=or_none(d.key_fingerprint),
        flagged=d.flagged, flagged_at=timestamp(d.flagged_at),
    )


class DeviceIn(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "kind": "pos", "model": "HX-P300", "name": "North Canteen POS 3", "location": "north-canteen",
        "scene_tags": ["canteen"], "merchant_account_id": "6a0c4d2e-1b3f-4a5c-9d7e-8f9a0b1c2d3e",
        "capacity": 120, "config": {"offline": {"max_records": 5000}}}]})

    kind: DeviceKindName
    model: str = Field(min_length=1, max_length=MAX_MODEL_CHARS)
    name: str = Field(min_length=1, max_length=MAX_DEVICE_NAME_CHARS)
    location: str = Field(default="", max_length=MAX_LOCATION_CHARS)
    scene_tags: list[SceneTag] = Field(default_factory=list, max_length=MAX_SCENE_TAGS)
    merchant_account_id: UuidOrEmpty = Field(default="", description="The ledger settlement account a POS or "
                                             "cabinet books to (POST …/accounts, purse_kind merchant_settlement).")
    parent_device_id: UuidOrEmpty = Field(default="", description="A cabinet's POS.")
    firmware_version: str = Field(default="", max_length=MAX_FIRMWARE_CHARS)
    config: dict[str, Any] | None = Field(default=None, description="The device's config, a JSON object (offline "
                                          "caps, display, anything the model needs).")
    capacity: int = Field(default=0, ge=0, le=MAX_CAPACITY, description="Diners the location can serve per window "
                          "(dining index); 0: not counted.")
    enrolment_token_ttl_s: int = Field(default=0, ge=0, le=MAX_ENROLMENT_TOKEN_TTL_S,
                                       description="How long the enrolment token stays valid; 0: 24 h.")


class RegisteredDeviceOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "device": {**_DEVICE_EXAMPLE, "status": "pending", "online": False, "key_fingerprint": None},
        "enrolment_token": "oce1_5Jx…", "enrolment_token_expires_at": "2026-11-27T02:00:00Z"}]})

    device: DeviceOut
    enrolment_token: str = Field(description="One use, shown once, now: give it to the device (its installer). "
                                 "The hub keeps only a hash.")
    enrolment_token_expires_at: datetime | None


class EnrolmentTokenIn(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"ttl_s": 86400}]})

    ttl_s: int = Field(default=0, ge=0, le=MAX_ENROLMENT_TOKEN_TTL_S, description="0: 24 h.")


class EnrolmentTokenOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "enrolment_token": "oce1_8Qa…", "expires_at": "2026-11-27T02:00:00Z"}]})

    enrolment_token: str = Field(description="One use, shown once, now; the device's earlier token stops working.")
    expires_at: datetime | None


class DeviceUpdate(BaseModel):
    """Fields left out keep their value; ``scene_tags``, when given, replaces all of them."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "location": "south-canteen", "capacity": 80, "config": {"offline": {"max_records": 8000}}}]})

    name: str | None = Field(default=None, min_length=1, max_length=MAX_DEVICE_NAME_CHARS)
    location: str | None = Field(default=None, max_length=MAX_LOCATION_CHARS)
    scene_tags: list[SceneTag] | None = Field(default=None, max_length=MAX_SCENE_TAGS)
    merchant_account_id: UuidOrEmpty | None = Field(default=None, description="\"\" clears it.")
    parent_device_id: UuidOrEmpty | None = Field(default=None, description="\"\" clears it.")
    config: dict[str, Any] | None = Field(default=None, description="Replaces the config: bumps config_version, "
                                          "and the device gets it on its stream.")
    capacity: int | None = Field(default=None, ge=0, le=MAX_CAPACITY)


class DevicePage(BaseModel):
    devices: list[DeviceOut]
    next_page_token: str | None = Field(description="Pass as page_token for the next page; null on the last.")


class AlarmOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "tenant_id": "6f1c7a52-3f3e-4c1b-9a57-1b0f1d7e8a90", "alarm_id": "c1d2e3f4-0a1b-4c2d-8e3f-405162738495",
        "device_id": "3b0d9a51-6a43-4f7e-9d55-2a9f0c1e7b10", "kind": "sequence_gap", "severity": "warning",
        "state": "open", "detail": "sequences 17-19 never arrived", "count": 2,
        "opened_at": "2026-11-26T04:40:00Z", "last_raised_at": "2026-11-26T05:10:00Z", "acknowledged_at": None,
        "acknowledged_by": None, "cleared_at": None, "cleared_by": None}]})

    tenant_id: str
    alarm_id: str
    device_id: str
    kind: AlarmKindName
    severity: AlarmSeverityName
    state: AlarmStateName
    detail: str = Field(description="What happened, for a person.")
    count: int = Field(description="How many times it was raised while open.")
    opened_at: datetime | None
    last_raised_at: datetime | None
    acknowledged_at: datetime | None
    acknowledged_by: str | None
    cleared_at: datetime | None
    cleared_by: str | None


def _alarm(a: pb.Alarm) -> AlarmOut:
    return AlarmOut(
        tenant_id=a.tenant_id, alarm_id=a.alarm_id, device_id=a.device_id, kind=enum_name(pb.AlarmKind, value=a.kind),
        severity=enum_name(pb.AlarmSeverity, value=a.severity), state=enum_name(pb.AlarmState, value=a.state),
        detail=a.detail, count=a.count, opened_at=timestamp(a.opened_at), last_raised_at=timestamp(a.last_raised_at),
        acknowledged_at=timestamp(a.acknowledged_at), acknowledged_by=or_none(a.acknowledged_by),
        cleared_at=timestamp(a.cleared_at), cleared_by=or_none(a.cleared_by),
    )


class AlarmPage(BaseModel):
    alarms: list[AlarmOut]
    next_page_token: str | None = Field(description="null on the last page.")


_ACCESS_RULES_EXAMPLE = {
    "time_zone": "Asia/Shanghai",
    "rules": [{"name": "dorm-7-students", "places": ["dorm-7"], "purposes": ["access"],
               "groups": {"role": ["student"]}, "weekdays": [1, 2, 3, 4, 5, 6, 7], "from": "06:00", "to": "23:30"}],
}


class AccessRulesOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "version": 4, "sha256": "9f2c1e0a4b7d8c6e5f3a2b1c0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e",
        "rules": _ACCESS_RULES_EXAMPLE}]})

    version: int = Field(description="0 when the tenant never set any: every access is denied (NO_RULE).")
    sha256: str | None
    rules: dict[str, Any] | None = Field(description="The rule document; null when none was set.")


class AccessRulesSetOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "version": 5, "sha256": "0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b1c"}]})

    version: int
    sha256: str


class AccessRecordOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "tenant_id": "6f1c7a52-3f3e-4c1b-9a57-1b0f1d7e8a90", "device_id": "3b0d9a51-6a43-4f7e-9d55-2a9f0c1e7b10",
        "member_id": "0b9e4c1e-9d2f-4c55-a0f4-6f6b1b2c3d4e", "location": "dorm-7", "method": "card", "passed": True,
        "reason": "PASS", "nonce": "g7-000913", "event_time": "2026-11-26T14:02:11Z", "offline": False,
        "rule": "dorm-7-students"}]})

    tenant_id: str
    device_id: str
    member_id: str | None = Field(description="null when the presentation named nobody (an unknown card).")
    location: str
    method: MethodName | None
    passed: bool
    reason: str = Field(description="PASS, or why not: NO_RULE, OUTSIDE_WINDOW, GROUP_NOT_ALLOWED, CODE_<reason>, "
                        "CARD_LOST, MEMBER_FROZEN, UNKNOWN_CARD, UNKNOWN_FACE.")
    nonce: str = Field(description="The device's nonce for the pass; unique per device.")
    event_time: datetime | None
    offline: bool = Field(description="Decided by the device offline (uploaded later) rather than by the hub.")
    rule: str | None = Field(description="The access rule that let the member pass; null for a deny.")


def _access_record(r: pb.AccessRecord) -> AccessRecordOut:
    return AccessRecordOut(
        tenant_id=r.tenant_id, device_id=r.device_id, member_id=or_none(r.member_id), location=r.location,
        method=enum_name(pb.Method, value=r.method) if r.method else None, passed=r.passed, reason=r.reason,
        nonce=r.nonce, event_time=timestamp(r.event_time), offline=r.offline, rule=or_none(r.rule),
    )


class AccessRecordPage(BaseModel):
    records: list[AccessRecordOut]
    next_page_token: str | None = Field(description="null on the last page.")


class RolloutIn(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "target": "firmware", "version": "2.5.0", "kind": "pos", "model": "HX-P300", "stage_sizes": [1, 5, 50],
        "success_threshold": 0.9, "error_threshold": 2}]})

    target: RolloutTargetName
    version: str = Field(default="", max_length=MAX_FIRMWARE_CHARS, description="firmware: the version to install.")
    config: dict[str, Any] | None = Field(default=None, description="config: the config every device of the group "
                                          "gets.")
    kind: DeviceKindName = Field(description="The group: active devices of this kind at creation ...")
    model: str = Field(default="", max_length=MAX_MODEL_CHARS, description="... and of this model, when given ...")
    location: str = Field(default="", max_length=MAX_LOCATION_CHARS, description="... and at this location, "
                          "when given.")
    stage_sizes: list[Annotated[int, Field(ge=1, le=MAX_STAGE_SIZE)]] = Field(
        min_length=1, max_length=MAX_STAGES, description="Devices per stage, in order (e.g. [1, 5, 50]); the last "
        "stage takes whoever is left.")
    success_threshold: float = Field(gt=0, le=1, description="The share of the current stage that must succeed "
                                     "before the next starts.")
    error_threshold: int = Field(ge=1, le=MAX_ERROR_THRESHOLD, description="Failed devices (all stages together) "
                                 "that stop the rollout: no further device is told.")


class RolloutDeviceOut(BaseModel):
    device_id: str
    stage: int = Field(description="0 for the first stage.")
    step: UpdateStepName = Field(description="waiting: its stage has not started; pending: told, not reported yet; "
                                 "then what the device reported.")
    reported_version: str | None = Field(description="What the device reports running (the old version after a "
                                         "failed install).")
    detail: str | None
    updated_at: datetime | None


class RolloutOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "tenant_id": "6f1c7a52-3f3e-4c1b-9a57-1b0f1d7e8a90", "rollout_id": "5e6f7a8b-9c0d-4e1f-8a2b-3c4d5e6f7a8b",
        "target": "firmware", "version": "2.5.0", "config": None, "kind": "pos", "model": "HX-P300",
        "location": None, "stage_sizes": [1, 5, 50], "success_threshold": 0.9, "error_threshold": 2,
        "state": "running", "current_stage": 1,
        "devices": [{"device_id": "3b0d9a51-6a43-4f7e-9d55-2a9f0c1e7b10", "stage": 0, "step": "succeeded",
                     "reported_version": "2.5.0", "detail": None, "updated_at": "2026-11-26T03:00:00Z"}],
        "created_at": "2026-11-26T02:55:00Z", "detail": None}]})

    tenant_id: str
    rollout_id: str
    target: RolloutTargetName
    version: str | None
    config: dict[str, Any] | None
    kind: DeviceKindName | None
    model: str | None
    location: str | None
    stage_sizes: list[int]
    success_threshold: float
    error_threshold: int
    state: RolloutStateName = Field(description="running, succeeded, or stopped (the error threshold was reached).")
    current_stage: int = Field(description="0 for the first stage.")
    devices: list[RolloutDeviceOut] = Field(description="Every device of the group with its stage and step; empty "
                                            "in lists (read the rollout for them).")
    created_at: datetime | None
    detail: str | None


def _step(value: int) -> str:
    # A device of a stage not started yet has no step on the wire.
    return "waiting" if value == pb.UPDATE_STEP_UNSPECIFIED else enum_name(pb.UpdateStep, value=value)


def _rollout(r: pb.Rollout) -> RolloutOut:
    return RolloutOut(
        tenant_id=r.tenant_id, rollout_id=r.rollout_id, target=enum_name(pb.RolloutTarget, value=r.target),
        version=or_none(r.version), config=_document(r.config_json),
        kind=enum_name(pb.DeviceKind, value=r.kind) if r.kind else None, model=or_none(r.model),
        location=or_none(r.location), stage_sizes=list(r.stage_sizes), success_threshold=r.success_threshold,
        error_threshold=r.error_threshold, state=enum_name(pb.RolloutState, value=r.state),
        current_stage=r.current_stage,
        devices=[RolloutDeviceOut(device_id=d.device_id, stage=d.stage, step=_step(d.step),
                                  reported_version=or_none(d.reported_version), detail=or_none(d.detail),
                                  updated_at=timestamp(d.updated_at)) for d in r.devices],
        created_at=timestamp(r.created_at), detail=or_none(r.detail),
    )


class CreatedRolloutOut(BaseModel):
    rollout: RolloutOut
    created: bool = Field(description="False when the Idempotency-Key had made this rollout before.")


class RolloutPage(BaseModel):
    rollouts: list[RolloutOut]
    next_page_token: str | None = Field(description="null on the last page.")


class DiningLocationOut(BaseModel):
    location: str
    served: int = Field(description="Payments booked (online and offline, by event time) at the location's POS "
                        "devices in the window.")
    capacity: int = Field(description="The sum of the capacities of the location's devices; 0 when none is set.")
    load: float = Field(description="served / capacity; 0 when capacity is 0.")
    devices_online: int


class DiningIndexOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "as_of": "2026-11-26T04:45:00Z", "window_s": 900,
        "locations": [{"location": "north-canteen", "served": 312, "capacity": 400, "load": 0.78,
                       "devices_online": 6},
                      {"location": "south-canteen", "served": 95, "capacity": 250, "load": 0.38,
                       "devices_online": 4}]}]})

    as_of: datetime | None
    window_s: int
    locations: list[DiningLocationOut]


# --- devices:admin: the registry -----------------------------------------------------------------


@router.post("/v1/tenants/{tenant_id}/devices", response_model=RegisteredDeviceOut, status_code=201,
             tags=["devices"], summary="Register a device; answers its one-time enrolment token, once")
async def register_device(tenant_id: TenantId, body: DeviceIn, response: Response, state: State,
                          _principal: AdminDevices) -> RegisteredDeviceOut:
    """The device is ``pending`` until it enrols over the hub's gRPC ``DeviceService.Enrol`` with
    the token and its own Ed25519 public key; then it is ``active``. The token is in this answer
    only (``Cache-Control: no-store``): lost, make a new one at ``…/enrolment-tokens``."""
    answer = await state.devicehub.RegisterDevice(
        pb.RegisterDeviceRequest(
            tenant_id=tenant_id, kind=enum_value(pb.DeviceKind, name=body.kind), model=body.model, name=body.name,
            location=body.location, scene_tags=body.scene_tags, merchant_account_id=body.merchant_account_id.lower(),
            parent_device_id=body.parent_device_id.lower(), firmware_version=body.firmware_version,
            config_json=_dump(body.config, limit=MAX_CONFIG_BYTES, what="config") if body.config is not None else "",
            capacity=body.capacity, enrolment_token_ttl_s=body.enrolment_token_ttl_s,
        ),
        timeout=state.timeout_s,
    )
    response.headers["Location"] = f"/v1/tenants/{tenant_id}/devices/{answer.device.device_id}"
    response.headers.update(NO_STORE)
    return RegisteredDeviceOut(device=_device(answer.device), enrolment_token=answer.enrolment_token,
                               enrolment_token_expires_at=timestamp(answer.enrolment_token_expires_at))


@router.get("/v1/tenants/{tenant_id}/devices", response_model=DevicePage, tags=["devices"],
            summary="The tenant's devices, with filters, a page at a time")
async def list_devices(
    tenant_id: TenantId,
    state: State,
    _principal: AdminDevices,
    kind: Annotated[DeviceKindName | None, Query()] = None,
    location: Annotated[str | None, Query(max_length=MAX_LOCATION_CHARS)] = None,
    status: Annotated[DeviceStatusName | None, Query()] = None,
    online: Annotated[bool | None, Query(description="true: online only; false: offline only.")] = None,
    page_size: PageSize = 50,
    page_token: PageToken = "",
) -> DevicePage:
    answer = await state.devicehub.ListDevices(
        pb.ListDevicesRequest(
            tenant_id=tenant_id, kind=enum_value(pb.DeviceKind, name=kind) if kind else 0, location=location or "",
            status=enum_value(pb.DeviceStatus, name=status) if status else 0,
            online=0 if online is None else (1 if online else 2), page_size=page_size, page_token=page_token,
        ),
        timeout=state.timeout_s,
    )
    return DevicePage(devices=[_device(d) for d in answer.devices], next_page_token=answer.next_page_token or None)


@router.get("/v1/tenants/{tenant_id}/devices/{device_id}", response_model=DeviceOut, tags=["devices"],
            summary="One device, with its online status and what it last reported")
async def get_device(tenant_id: TenantId, device_id: DeviceId, state: State, _principal: AdminDevices) -> DeviceOut:
    answer = await state.devicehub.GetDevice(pb.GetDeviceRequest(tenant_id=tenant_id, device_id=device_id.lower()),
                                             timeout=state.timeout_s)
    return _device(answer.device)


@router.patch("/v1/tenants/{tenant_id}/devices/{device_id}", response_model=DeviceOut, tags=["devices"],
              summary="Change a device's name, location, scene tags, merchant, parent, capacity or config")
async def update_device(tenant_id: TenantId, device_id: DeviceId, body: DeviceUpdate, state: State,
                        _principal: AdminDevices) -> DeviceOut:
    """A new ``config`` bumps ``config_version``; a connected device gets it on its stream."""
    request = pb.UpdateDeviceRequest(tenant_id=tenant_id, device_id=device_id.lower())
    if body.name is not None:
        request.name = body.name
    if body.location is not None:
        request.location = body.location
    if body.scene_tags is not None:
        request.replace_scene_tags = True
        request.scene_tags.extend(body.scene_tags)
    if body.merchant_account_id is not None:
        request.merchant_account_id = body.merchant_account_id.lower()
    if body.parent_device_id is not None:
        request.parent_device_id = body.parent_device_id.lower()
    if body.config is not None:
        request.config_json = _dump(body.config, limit=MAX_CONFIG_BYTES, what="config")
    if body.capacity is not None:
        request.capacity = body.capacity
    answer = await state.devicehub.UpdateDevice(request, timeout=state.timeout_s)
    return _device(answer.device)


@router.post("/v1/tenants/{tenant_id}/devices/{device_id}/decommission", response_model=DeviceOut,
             tags=["devices"], summary="Take a device out of service for good", responses=problem_responses(409))
async def decommission_device(tenant_id: TenantId, device_id: DeviceId, state: State,
                              _principal: AdminDevices) -> DeviceOut:
    """Its key is forgotten, its stream closed, any reconnect refused. Idempotent."""
    answer = await state.devicehub.DecommissionDevice(
        pb.DecommissionDeviceRequest(tenant_id=tenant_id, device_id=device_id.lower()), timeout=state.timeout_s)
    return _device(answer.device)


@router.post("/v1/tenants/{tenant_id}/devices/{device_id}/enrolment-tokens", response_model=EnrolmentTokenOut,
             status_code=201, tags=["devices"], summary="A new one-time enrolment token for a device, once",
             responses=problem_responses(409))
async def create_enrolment_token(
    tenant_id: TenantId,
    device_id: DeviceId,
    response: Response,
    state: State,
    _principal: AdminDevices,
    body: Annotated[EnrolmentTokenIn | None, Body()] = None,
) -> EnrolmentTokenOut:
    """For a pending device whose token was lost or expired (the old one stops working), or to
    re-enrol an active device with a new key (a replaced board). A decommissioned device is 409."""
    answer = await state.devicehub.CreateEnrolmentToken(
        pb.CreateEnrolmentTokenRequest(tenant_id=tenant_id, device_id=device_id.lower(),
                                       ttl_s=body.ttl_s if body else 0),
        timeout=state.timeout_s,
    )
    response.headers.update(NO_STORE)
    return EnrolmentTokenOut(enrolment_token=answer.enrolment_token, expires_at=timestamp(answer.expires_at))


# --- devices:admin: alarms -----------------------------------------------------------------------


@router.get("/v1/tenants/{tenant_id}/alarms", response_model=AlarmPage, tags=["alarms"],
            summary="The fleet's alarms (by default the open and acknowledged ones), a page at a time")
async def list_alarms(
    tenant_id: TenantId,
    state: State,
    _principal: AdminDevices,
    alarm_state: Annotated[AlarmStateName | None, Query(alias="state", description="Absent: open and "
                                                        "acknowledged.")] = None,
    device: Annotated[str | None, Query(pattern=UUID_PATTERN, description="One device's.")] = None,
    kind: Annotated[AlarmKindName | None, Query()] = None,
    page_size: PageSize = 50,
    page_token: PageToken = "",
) -> AlarmPage:
    answer = await state.devicehub.ListAlarms(
        pb.ListAlarmsRequest(
            tenant_id=tenant_id, state=enum_value(pb.AlarmState, name=alarm_state) if alarm_state else 0,
            device_id=(device or "").lower(), kind=enum_value(pb.AlarmKind, name=kind) if kind else 0,
            page_size=page_size, page_token=page_token,
        ),
        timeout=state.timeout_s,
    )
    return AlarmPage(alarms=[_alarm(a) for a in answer.alarms], next_page_token=answer.next_page_token or None)


@router.post("/v1/tenants/{tenant_id}/alarms/{alarm_id}/acknowledge", response_model=AlarmOut, tags=["alarms"],
             summary="Acknowledge an alarm: someone is on it", responses=problem_responses(409))
async def acknowledge_alarm(tenant_id: TenantId, alarm_id: AlarmId, state: State,
                            principal: AdminDevices) -> AlarmOut:
    """``acknowledged_by`` is the calling client's id. The alarm stays open for repeats (its count
    goes on) until cleared."""
    answer = await state.devicehub.AcknowledgeAlarm(
        pb.AcknowledgeAlarmRequest(tenant_id=tenant_id, alarm_id=alarm_id.lower(), by=principal.client_id),
        timeout=state.timeout_s,
    )
    return _alarm(answer.alarm)


@router.post("/v1/tenants/{tenant_id}/alarms/{alarm_id}/clear", response_model=AlarmOut, tags=["alarms"],
             summary="Clear an alarm: the next occurrence opens a new one", responses=problem_responses(409))
async def clear_alarm(tenant_id: TenantId, alarm_id: AlarmId, state: State, principal: AdminDevices) -> AlarmOut:
    """``cleared_by`` is the calling client's id."""
    answer = await state.devicehub.ClearAlarm(
        pb.ClearAlarmRequest(tenant_id=tenant_id, alarm_id=alarm_id.lower(), by=principal.client_id),
        timeout=state.timeout_s,
    )
    return _alarm(answer.alarm)


# --- devices:admin: access -----------------------------------------------------------------------


@router.get("/v1/tenants/{tenant_id}/access-rules", response_model=AccessRulesOut, tags=["access"],
            summary="The access rules in force for gates and shuttle readers")
async def get_access_rules(tenant_id: TenantId, state: State, _principal: AdminDevices) -> AccessRulesOut:
    answer = await state.devicehub.GetAccessRules(pb.GetAccessRulesRequest(tenant_id=tenant_id),
                                                  timeout=state.timeout_s)
    return AccessRulesOut(version=answer.version, sha256=or_none(answer.sha256), rules=_document(answer.rules_json))


@router.put("/v1/tenants/{tenant_id}/access-rules", response_model=AccessRulesSetOut, tags=["access"],
            summary="Replace the access rules: a new version, synced to every connected gate and reader")
async def set_access_rules(
    tenant_id: TenantId,
    document: Annotated[dict[str, Any], Body(description="The rule document (docs/devicehub.md): time zone and "
                                                         "rules of places x groups x weekdays x time windows.",
                                             examples=[_ACCESS_RULES_EXAMPLE])],
    state: State,
    _principal: AdminDevices,
) -> AccessRulesSetOut:
    """A document the hub refuses is 400 ``ACCESS_RULES_INVALID`` with the ``rule`` at fault, and
    nothing changes. A body that is not a JSON object is 422."""
    answer = await state.devicehub.SetAccessRules(
        pb.SetAccessRulesRequest(tenant_id=tenant_id,
                                 rules_json=_dump(document, limit=MAX_ACCESS_RULES_BYTES, what="rule document")),
        timeout=state.timeout_s,
    )
    return AccessRulesSetOut(version=answer.version, sha256=answer.sha256)


@router.get("/v1/tenants/{tenant_id}/access-records", response_model=AccessRecordPage, tags=["access"],
            summary="Pass and deny records of gates and shuttle readers (attendance, check-in), a page at a time")
async def list_access_records(
    tenant_id: TenantId,
    state: State,
    _principal: AdminDevices,
    device: Annotated[str | None, Query(pattern=UUID_PATTERN, description="One device's.")] = None,
    member: Annotated[str | None, Query(pattern=UUID_PATTERN, description="One member's.")] = None,
    location: Annotated[str | None, Query(max_length=MAX_LOCATION_CHARS)] = None,
    since: Annotated[AwareDatetime | None, Query(description="Event time from (inclusive), RFC 3339 with a "
                                                 "zone.")] = None,
    until: Annotated[AwareDatetime | None, Query(description="Event time until (exclusive).")] = None,
    page_size: Annotated[int, Query(ge=1, le=MAX_RECORDS_PAGE_SIZE)] = 100,
    page_token: PageToken = "",
) -> AccessRecordPage:
    answer = await state.devicehub.ListAccessRecords(
        pb.ListAccessRecordsRequest(
            tenant_id=tenant_id, device_id=(device or "").lower(), member_id=(member or "").lower(),
            location=location or "", since=timestamp_pb(since), until=timestamp_pb(until), page_size=page_size, page_token=page_token,
        ),
        timeout=state.timeout_s,
    )
    return AccessRecordPage(records=[_access_record(r) for r in answer.records],
                            next_page_token=answer.next_page_token or None)


# --- devices:admin: rollouts ---------------------------------------------------------------------


@router.post("/v1/tenants/{tenant_id}/rollouts", response_model=CreatedRolloutOut, status_code=201,
             tags=["rollouts"], summary="Roll firmware or config out to a device group in stages",
             responses={200: {"description": "The Idempotency-Key had made this rollout before (created false)",
                              "model": CreatedRolloutOut}, **problem_responses(409)})
async def create_rollout(
    tenant_id: TenantId,
    body: RolloutIn,
    response: Response,
    state: State,
    principal: AdminDevices,
    idempotency_key: IdempotencyKeyHeader = None,
) -> CreatedRolloutOut:
    """201 with the rollout and its Location; the same key and request again answer 200 with the
    first rollout (``created`` false); the same key with another request is 409."""
    key = _key(idempotency_key)
    answer = await state.devicehub.CreateRollout(
        pb.CreateRolloutRequest(
            tenant_id=tenant_id, idempotency_key=key, key_scope=client_scope(principal.client_id),
            target=enum_value(pb.RolloutTarget, name=body.target),
            version=body.version,
            config_json=_dump(body.config, limit=MAX_CONFIG_BYTES, what="config") if body.config is not None else "",
            kind=enum_value(pb.DeviceKind, name=body.kind), model=body.model, location=body.location,
            stage_sizes=body.stage_sizes, success_threshold=body.success_threshold,
            error_threshold=body.error_threshold,
        ),
        timeout=state.timeout_s,
    )
    response.status_code = 201 if answer.created else 200
    response.headers["Location"] = f"/v1/tenants/{tenant_id}/rollouts/{answer.rollout.rollout_id}"
    return CreatedRolloutOut(rollout=_rollout(answer.rollout), created=answer.created)


@router.get("/v1/tenants/{tenant_id}/rollouts", response_model=RolloutPage, tags=["rollouts"],
            summary="The tenant's rollouts, newest first, a page at a time")
async def list_rollouts(
    tenant_id: TenantId,
    state: State,
    _principal: AdminDevices,
    page_size: Annotated[int, Query(ge=1, le=MAX_ROLLOUTS_PAGE_SIZE)] = 20,
    page_token: PageToken = "",
) -> RolloutPage:
    answer = await state.devicehub.ListRollouts(
        pb.ListRolloutsRequest(tenant_id=tenant_id, page_size=page_size, page_token=page_token),
        timeout=state.timeout_s,
    )
    return RolloutPage(rollouts=[_rollout(r) for r in answer.rollouts], next_page_token=answer.next_page_token or None)


@router.get("/v1/tenants/{tenant_id}/rollouts/{rollout_id}", response_model=RolloutOut, tags=["rollouts"],
            summary="One rollout, with every device's stage and update step")
async def get_rollout(tenant_id: TenantId, rollout_id: RolloutId, state: State,
                      _principal: AdminDevices) -> RolloutOut:
    answer = await state.devicehub.GetRollout(pb.GetRolloutRequest(tenant_id=tenant_id, rollout_id=rollout_id.lower()),
                                              timeout=state.timeout_s)
    return _rollout(answer.rollout)


# --- data:read: the dining index -----------------------------------------------------------------


def _dining_csv(index: DiningIndexOut) -> str:
    # The location is what an admin typed for its devices: csv_text makes it inert; the load is a
    # number (four decimals), not text.
    as_of = index.as_of.isoformat().replace("+00:00", "Z") if index.as_of else ""
    return csv_text(([as_of, index.window_s, loc.location, loc.served, loc.capacity, Decimal(f"{loc.load:.4f}"),
                      loc.devices_online] for loc in index.locations), header=DINING_COLUMNS)


_DINING_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "The index per canteen location (JSON; text/csv with format=csv)",
          "content": {"text/csv": {"schema": {"type": "string"}, "example": (
              ",".join(DINING_COLUMNS) + "\n\"2026-11-26T04:45:00Z\",900,\"north-canteen\",312,400,0.7800,6\n")}}},
}


@router.get("/v1/tenants/{tenant_id}/dining-index", response_model=DiningIndexOut, tags=["data"],
            summary="People served per canteen in the last window, against capacity", responses=_DINING_RESPONSES)
async def get_dining_index(
    tenant_id: TenantId,
    state: State,
    _principal: ReadData,
    window_s: Annotated[int, Query(ge=MIN_WINDOW_S, le=MAX_WINDOW_S, description="The window, seconds back from "
                                   "now.")] = DEFAULT_WINDOW_S,
    format: Annotated[Literal["json", "csv"], Query(description="json (default) or csv.")] = "json",  # noqa: A002
) -> Any:
    """A canteen is a location of active POS devices in scene ``canteen`` (or with no scene tag).
    ``served`` counts the payments booked there (online and offline, by event time) in the window;
    ``capacity`` sums the capacities set on its devices; ``load`` = served / capacity (0 without a
    capacity)."""
    answer = await state.devicehub.GetDiningIndex(pb.GetDiningIndexRequest(tenant_id=tenant_id, window_s=window_s),
                                                  timeout=state.timeout_s)
    index = DiningIndexOut(
        as_of=timestamp(answer.as_of), window_s=answer.window_s or window_s,
        locations=[DiningLocationOut(location=loc.location, served=loc.served, capacity=loc.capacity, load=loc.load,
                                     devices_online=loc.devices_online) for loc in answer.locations],
    )
    if format == "csv":
        return Response(content=_dining_csv(index), media_type="text/csv; charset=utf-8",
                        headers={"Content-Disposition": 'attachment; filename="dining-index.csv"',
                                 "Cache-Control": "no-cache"})
    return index
