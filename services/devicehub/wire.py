"""A device between the registry and the wire: what the admin API answers of it (``device_pb``),
what its stream acts as (``device_context``), and the kinds and statuses both ways. Shared by the
servicers and the stream, which import it rather than each other."""

from __future__ import annotations

from onecard.devicehub.v1 import devicehub_pb2 as pb
from runtime.errors import InvalidArgument
from runtime.wire import timestamp_pb
from services.devicehub.context import DeviceContext
from services.devicehub.registry import Device, DeviceKind, DeviceStatus

KIND_TO_PB = {
    DeviceKind.POS: pb.DEVICE_KIND_POS,
    DeviceKind.GATE: pb.DEVICE_KIND_GATE,
    DeviceKind.SHUTTLE: pb.DEVICE_KIND_SHUTTLE,
    DeviceKind.CABINET: pb.DEVICE_KIND_CABINET,
    DeviceKind.KIOSK: pb.DEVICE_KIND_KIOSK,
}
KIND_FROM_PB = {v: k for k, v in KIND_TO_PB.items()}
STATUS_TO_PB = {
    DeviceStatus.PENDING: pb.DEVICE_STATUS_PENDING,
    DeviceStatus.ACTIVE: pb.DEVICE_STATUS_ACTIVE,
    DeviceStatus.DECOMMISSIONED: pb.DEVICE_STATUS_DECOMMISSIONED,
}
STATUS_FROM_PB = {v: k for k, v in STATUS_TO_PB.items()}


def device_pb(device: Device, *, last_settled_sequence: int = 0) -> pb.Device:
    return pb.Device(
        tenant_id=str(device.tenant_id),
        device_id=str(device.device_id),
        kind=KIND_TO_PB[device.kind],
        model=device.model,
        name=device.name,
        location=device.location,
        scene_tags=list(device.scene_tags),
        merchant_account_id=device.merchant_account_id,
        parent_device_id=str(device.parent_device_id) if device.parent_device_id else "",
        status=STATUS_TO_PB[device.status],
        firmware_version=device.firmware_version,
        config_version=device.config_version,
        reported_config_version=device.reported_config_version,
        config_json=device.config_json,
        online=device.online,
        last_seen_at=timestamp_pb(device.last_seen_at),
        queue_depth=device.queue_depth,
        clock_offset_ms=device.clock_offset_ms,
        last_settled_sequence=last_settled_sequence,
        capacity=device.capacity,
        created_at=timestamp_pb(device.created_at),
        key_fingerprint=device.key_fingerprint,
        flagged=device.flagged_at is not None,
        flagged_at=timestamp_pb(device.flagged_at),
    )


def device_context(device: Device) -> DeviceContext:
    assert device.public_key is not None
    return DeviceContext(
        tenant_id=str(device.tenant_id),
        device_id=str(device.device_id),
        kind=KIND_TO_PB[device.kind],
        model=device.model,
        location=device.location,
        scene_tags=tuple(device.scene_tags),
        merchant_account_id=device.merchant_account_id,
        parent_device_id=str(device.parent_device_id) if device.parent_device_id else "",
        public_key=device.public_key,
    )


def parse_kind(value: int, *, required: bool) -> DeviceKind | None:
    if value == pb.DEVICE_KIND_UNSPECIFIED and not required:
        return None
    kind = KIND_FROM_PB.get(value)
    if kind is None:
        raise InvalidArgument("kind must be pos, gate, shuttle, cabinet or kiosk", reason="KIND_INVALID")
    return kind
