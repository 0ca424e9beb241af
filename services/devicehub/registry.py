"""The device registry's values and the checks on its requests. Plain computation; no I/O.

A device is registered PENDING with a one-time enrolment token (only its SHA-256 is stored),
becomes ACTIVE when it enrols with its own Ed25519 public key, and DECOMMISSIONED for good.
"""

from __future__ import annotations

import enum
import hashlib
import json
import secrets
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from runtime.errors import InvalidArgument

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
DEFAULT_TOKEN_TTL_S = 24 * 3600
MAX_TOKEN_TTL_S = 30 * 24 * 3600
MAX_MODEL_CHARS = 100
MAX_NAME_CHARS = 200
MAX_LOCATION_CHARS = 200
MAX_SCENE_TAGS = 32
MAX_SCENE_TAG_CHARS = 64
MAX_MERCHANT_CHARS = 100
MAX_FIRMWARE_CHARS = 64
MAX_CONFIG_BYTES = 64 * 1024
MAX_BY_CHARS = 200
PUBLIC_KEY_BYTES = 32
TOKEN_PREFIX = "oce_"

SUBJECT_PREFIX = "devicehub"
SUBJECT_DEVICE_REGISTERED = "devicehub.device.registered"
SUBJECT_DEVICE_ENROLLED = "devicehub.device.enrolled"
SUBJECT_DEVICE_UPDATED = "devicehub.device.updated"
SUBJECT_DEVICE_CONFIG_CHANGED = "devicehub.device.config_changed"
SUBJECT_DEVICE_DECOMMISSIONED = "devicehub.device.decommissioned"
SUBJECT_DEVICE_ONLINE = "devicehub.device.online"
SUBJECT_DEVICE_OFFLINE = "devicehub.device.offline"
SUBJECT_TOKEN_CREATED = "devicehub.enrolment_token.created"


class DeviceKind(enum.Enum):
    POS = "pos"
    GATE = "gate"
    SHUTTLE = "shuttle"
    CABINET = "cabinet"
    KIOSK = "kiosk"


class DeviceStatus(enum.Enum):
    PENDING = "pending"
    ACTIVE = "active"
    DECOMMISSIONED = "decommissioned"


@dataclass(frozen=True)
class Device:
    tenant_id: uuid.UUID
    device_id: uuid.UUID
    kind: DeviceKind
    model: str
    name: str
    location: str
    scene_tags: tuple[str, ...]
    merchant_account_id: str
    parent_device_id: uuid.UUID | None
    status: DeviceStatus
    firmware_version: str
    config_json: str
    config_version: int
    reported_config_version: int
    capacity: int
    public_key: bytes | None
    key_fingerprint: str
    online: bool
    last_seen_at: datetime | None
    queue_depth: int
    oldest_queued_at: datetime | None
    clock_offset_ms: int
    created_at: datetime
    seq: int = 0
    synced_versions: dict[str, int] = field(default_factory=dict)
    # When its open DEVICE_FLAGGED alarm was raised: flagged for review until a person clears it.
    flagged_at: datetime | None = None


@dataclass(frozen=True)
class NewDevice:
    kind: DeviceKind
    model: str
    name: str
    location: str
    scene_tags: tuple[str, ...]
    merchant_account_id: str
    parent_device_id: uuid.UUID | None
    firmware_version: str
    config_json: str
    capacity: int


@dataclass(frozen=True)
class DeviceChanges:
    """What UpdateDevice replaces; None leaves a field as it is. parent_device_id: '' clears."""

    name: str | None = None
    location: str | None = None
    scene_tags: tuple[str, ...] | None = None
    merchant_account_id: str | None = None
    parent_device_id: uuid.UUID | None | str = None  # "" means clear
    config_json: str | None = None
    capacity: int | None = None


@dataclass(frozen=True)
class DeviceFilter:
    kind: DeviceKind | None = None
    location: str | None = None
    status: DeviceStatus | None = None
    online: bool | None = None


@dataclass(frozen=True)
class EnrolmentToken:
    token: str
    sha256: bytes
    expires_at: datetime


# --- parsing and checks ---------------------------------------------------------------------------

def parse_uuid(value: str, *, what: str, reason: str) -> uuid.UUID:
    if not value:
        raise InvalidArgument(f"{what} is required", reason=reason)
    try:
        return uuid.UUID(value)
    except (ValueError, TypeError, AttributeError):
        raise InvalidArgument(f"{what} must be a UUID", reason=reason) from None


def parse_tenant_id(value: str) -> uuid.UUID:
    return parse_uuid(value, what="tenant_id", reason="TENANT_ID_INVALID")


def parse_device_id(value: str) -> uuid.UUID:
    return parse_uuid(value, what="device_id", reason="DEVICE_ID_INVALID")


def _text(value: str, *, what: str, max_chars: int, reason: str, required: bool = False) -> str:
    value = value.strip()
    if required and not value:
        raise InvalidArgument(f"{what} is required", reason=reason)
    if len(value) > max_chars or any(ord(c) < 32 for c in value):
        raise InvalidArgument(f"{what}: at most {max_chars} printable characters", reason=reason)
    return value


def check_model(value: str) -> str:
    return _text(value, what="model", max_chars=MAX_MODEL_CHARS, reason="MODEL_INVALID", required=True)


def check_name(value: str) -> str:
    return _text(value, what="name", max_chars=MAX_NAME_CHARS, reason="NAME_INVALID", required=True)


def check_location(value: str) -> str:
    return _text(value, what="location", max_chars=MAX_LOCATION_CHARS, reason="LOCATION_INVALID")


def check_firmware(value: str) -> str:
    return _text(value, what="firmware_version", max_chars=MAX_FIRMWARE_CHARS, reason="FIRMWARE_VERSION_INVALID")


def check_scene_tags(values: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    if len(values) > MAX_SCENE_TAGS:
        raise InvalidArgument(f"at most {MAX_SCENE_TAGS} scene tags", reason="SCENE_TAGS_INVALID")
    tags: list[str] = []
    for raw in values:
        tag = _text(raw, what="scene tag", max_chars=MAX_SCENE_TAG_CHARS, reason="SCENE_TAGS_INVALID", required=True)
        if tag not in tags:
            tags.append(tag)
    return tuple(tags)


def check_merchant(value: str) -> str:
    value = value.strip()
    if not value:
        return ""
    return str(parse_uuid(value, what="merchant_account_id", reason="MERCHANT_ACCOUNT_INVALID"))


def check_parent(value: str) -> uuid.UUID | None:
    if not value:
        return None
    return parse_uuid(value, what="parent_device_id", reason="PARENT_DEVICE_INVALID")


def check_capacity(value: int) -> int:
    if value < 0:
        raise InvalidArgument("capacity must not be negative", reason="CAPACITY_INVALID")
    return value


def check_config(value: str) -> str:
    """A JSON object, kept as its canonical text; '' is the empty object."""
    if not value.strip():
        return "{}"
    if len(value.encode()) > MAX_CONFIG_BYTES:
        raise InvalidArgument(f"config_json: at most {MAX_CONFIG_BYTES} bytes", reason="CONFIG_INVALID")
    try:
        document: Any = json.loads(value)
    except ValueError:
        raise InvalidArgument("config_json is not JSON", reason="CONFIG_INVALID") from None
    if not isinstance(document, dict):
        raise InvalidArgument("config_json must be a JSON object", reason="CONFIG_INVALID")
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def check_ttl(value: int) -> int:
    if value == 0:
        return DEFAULT_TOKEN_TTL_S
    if value < 0 or value > MAX_TOKEN_TTL_S:
        raise InvalidArgument(f"ttl: 1 to {MAX_TOKEN_TTL_S} seconds (0: 24 h)", reason="TTL_INVALID")
    return value


def check_by(value: str) -> str:
    return _text(value, what="by", max_chars=MAX_BY_CHARS, reason="BY_INVALID")


def check_public_key(value: bytes) -> bytes:
    if len(value) != PUBLIC_KEY_BYTES:
        raise InvalidArgument("public_key must be a 32-byte Ed25519 key", reason="PUBLIC_KEY_INVALID")
    return bytes(value)


# --- tokens and keys ------------------------------------------------------------------------------

def token_sha256(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def new_token(*, now: datetime, ttl_s: int) -> EnrolmentToken:
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    return EnrolmentToken(token=token, sha256=token_sha256(token), expires_at=now + timedelta(seconds=ttl_s))


def key_fingerprint(public_key: bytes) -> str:
    return hashlib.sha256(public_key).digest()[:8].hex()


def device_event_data(device: Device) -> dict[str, Any]:
    """What a device event says: never the key, never a token."""
    return {
        "device_id": str(device.device_id),
        "kind": device.kind.value,
        "model": device.model,
        "name": device.name,
        "location": device.location,
        "status": device.status.value,
        "firmware_version": device.firmware_version,
        "config_version": device.config_version,
        "key_fingerprint": device.key_fingerprint,
    }
