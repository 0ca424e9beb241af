"""The gRPC faces of the hub: DeviceAdminService (the mesh, for admins and partners) and
DeviceService (the devices: Enrol, Connect). Protobuf in, registry / alarms / rollouts /
transactions calls, protobuf out.

Every admin call parses its tenant id first and reaches rows only through that tenant: another
tenant's device, alarm or rollout is NOT_FOUND.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import grpc

from onecard.devicehub.v1 import devicehub_pb2 as pb
from onecard.devicehub.v1 import devicehub_pb2_grpc
from runtime import paging
from runtime.idempotency import key_scope
from runtime.mesh import peer_name
from runtime.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied, Unauthenticated
from runtime.logs import get_logger
from runtime.wire import timestamp_pb
from services.devicehub import registry
from services.devicehub.alarms import KIND_VALUES, SEVERITY_VALUES, STATE_VALUES, Alarm
from services.devicehub.backends import Backends
from services.devicehub.registry import (
    Device,
    DeviceChanges,
    DeviceFilter,
    DeviceKind,
    DeviceStatus,
    NewDevice,
)
from services.devicehub.rollouts import Rollout, Rollouts, make_spec
from services.devicehub.sessions import Sessions
from services.devicehub.store import Tx
from services.devicehub.stream import DeviceStream
from services.devicehub.sync import Sync
from services.devicehub.wire import KIND_TO_PB, STATUS_FROM_PB, device_pb, parse_kind

log = get_logger(__name__)


def _now() -> datetime:
    return datetime.now(UTC)


def alarm_pb(alarm: Alarm) -> pb.Alarm:
    return pb.Alarm(
        tenant_id=str(alarm.tenant_id),
        alarm_id=str(alarm.alarm_id),
        device_id=str(alarm.device_id),
        kind=KIND_VALUES.get(alarm.kind, 0),
        severity=SEVERITY_VALUES.get(alarm.severity, 0),
        state=STATE_VALUES.get(alarm.state, 0),
        detail=alarm.detail,
        count=alarm.count,
        opened_at=timestamp_pb(alarm.opened_at),
        last_raised_at=timestamp_pb(alarm.last_raised_at),
        acknowledged_at=timestamp_pb(alarm.acknowledged_at),
        acknowledged_by=alarm.acknowledged_by,
        cleared_at=timestamp_pb(alarm.cleared_at),
        cleared_by=alarm.cleared_by,
    )


TARGET_FROM_PB = {pb.ROLLOUT_TARGET_FIRMWARE: "firmware", pb.ROLLOUT_TARGET_CONFIG: "config"}
TARGET_TO_PB = {v: k for k, v in TARGET_FROM_PB.items()}
ROLLOUT_STATE_TO_PB = {"running": pb.ROLLOUT_STATE_RUNNING, "succeeded": pb.ROLLOUT_STATE_SUCCEEDED,
                       "stopped": pb.ROLLOUT_STATE_STOPPED}
STEP_TO_PB = {"waiting": pb.UPDATE_STEP_UNSPECIFIED, "pending": pb.UPDATE_STEP_PENDING,
              "downloading": pb.UPDATE_STEP_DOWNLOADING, "installing": pb.UPDATE_STEP_INSTALLING,
              "succeeded": pb.UPDATE_STEP_SUCCEEDED, "failed": pb.UPDATE_STEP_FAILED}


def rollout_pb(rollout: Rollout) -> pb.Rollout:
    """A rollout; its devices are listed when it was read alone (GetRollout, CreateRollout)."""
    return pb.Rollout(
        tenant_id=str(rollout.tenant_id), rollout_id=str(rollout.rollout_id), target=TARGET_TO_PB[rollout.target],
        version=rollout.version, config_json=rollout.config_json, kind=KIND_TO_PB[rollout.kind],
        model=rollout.model, location=rollout.location, stage_sizes=list(rollout.stage_sizes),
        success_threshold=rollout.success_threshold, error_threshold=rollout.error_threshold,
        state=ROLLOUT_STATE_TO_PB[rollout.state], current_stage=rollout.current_stage,
        devices=[pb.RolloutDevice(device_id=str(d.device_id), stage=d.stage, step=STEP_TO_PB[d.step],
                                  reported_version=d.reported_version, detail=d.detail,
                                  updated_at=timestamp_pb(d.updated_at)) for d in rollout.devices],
        created_at=timestamp_pb(rollout.created_at), detail=rollout.detail,
    )


def device_not_found() -> NotFound:
    return NotFound("no such device", reason="DEVICE_NOT_FOUND")


async def _check_parent(tx: Tx, *, kind: DeviceKind, parent: uuid.UUID | None) -> None:
    if parent is None:
        return
    if kind != DeviceKind.CABINET:
        raise InvalidArgument("only a cabinet has a parent POS", reason="PARENT_NOT_ALLOWED")
    found = await tx.device(parent)
    if found is None:
        raise NotFound("no such parent device", reason="PARENT_DEVICE_NOT_FOUND")
    if found.kind != DeviceKind.POS:
        raise FailedPrecondition("a cabinet's parent must be a POS", reason="PARENT_NOT_A_POS")
    if found.status == DeviceStatus.DECOMMISSIONED:
        raise FailedPrecondition("the parent POS is decommissioned", reason="PARENT_DECOMMISSIONED")


class DeviceAdminServicer(devicehub_pb2_grpc.DeviceAdminServiceServicer):
    def __init__(self, *, backends: Backends, sessions: Sessions, sync: Sync, rollouts: Rollouts):
        self._backends = backends
        self._sessions = sessions
        self._sync = sync
        self._rollouts = rollouts

    # --- registry -----------------------------------------------------------------------------

    async def RegisterDevice(self, request: pb.RegisterDeviceRequest, context: grpc.aio.ServicerContext
                             ) -> pb.RegisterDeviceResponse:
        tenant_id = registry.parse_tenant_id(request.tenant_id)
        kind = parse_kind(request.kind, required=True)
        assert kind is not None
        new = NewDevice(
            kind=kind,
            model=registry.check_model(request.model),
            name=registry.check_name(request.name),
            location=registry.check_location(request.location),
            scene_tags=registry.check_scene_tags(list(request.scene_tags)),
            merchant_account_id=registry.check_merchant(request.merchant_account_id),
            parent_device_id=registry.check_parent(request.parent_device_id),
            firmware_version=registry.check_firmware(request.firmware_version),
            config_json=registry.check_config(request.config_json),
            capacity=registry.check_capacity(request.capacity),
        )
        ttl_s = registry.check_ttl(request.enrolment_token_ttl_s)
        now = _now()
        token = registry.new_token(now=now, ttl_s=ttl_s)
        async with self._backends.store.tx(tenant_id) as tx:
            await _check_parent(tx, kind=kind, parent=new.parent_device_id)
            device = await tx.insert_device(device_id=uuid.uuid4(), new=new, now=now)
            await tx.insert_token(device.device_id, sha256=token.sha256, expires_at=token.expires_at, now=now)
            await tx.emit(registry.SUBJECT_DEVICE_REGISTERED, registry.device_event_data(device))
        return pb.RegisterDeviceResponse(device=device_pb(device), enrolment_token=token.token,
                                         enrolment_token_expires_at=timestamp_pb(token.expires_at),
                                         hub_ca_pem=self._backends.device_ca_pem)

    async def _device(self, tenant_id: uuid.UUID, device_id: uuid.UUID) -> Device:
        device = await self._backends.store.device(tenant_id=tenant_id, device_id=device_id)
        if device is None:
            raise device_not_found()
        return device

    async def _settled(self, device: Device) -> int:
        tx = self._backends.tx
        if tx is None or device.status == DeviceStatus.PENDING:
            return 0
        return int(await tx.last_settled_sequence(str(device.tenant_id), str(device.device_id)))

    async def _settled_page(self, tenant_id: uuid.UUID, devices: list[Device]) -> dict[str, int]:
        """``_settled`` of a page of devices, in one query."""
        ids = [str(d.device_id) for d in devices if d.status != DeviceStatus.PENDING]
        tx = self._backends.tx
        if tx is None or not ids:
            return {}
        return {k: int(v) for k, v in (await tx.last_settled_sequences(str(tenant_id), ids)).items()}

    async def GetDevice(self, request: pb.GetDeviceRequest, context: grpc.aio.ServicerContext
                        ) -> pb.GetDeviceResponse:
        tenant_id = registry.parse_tenant_id(request.tenant_id)
        device = await self._device(tenant_id, registry.parse_device_id(request.device_id))
        return pb.GetDeviceResponse(device=device_pb(device, last_settled_sequence=await self._settled(device)))

    async def ListDevices(self, request: pb.ListDevicesRequest, context: grpc.aio.ServicerContext
                          ) -> pb.ListDevicesResponse:
        tenant_id = registry.parse_tenant_id(request.tenant_id)
        if request.status and request.status not in STATUS_FROM_PB:
            raise InvalidArgument("unknown status", reason="STATUS_INVALID")
        if request.online not in (0, 1, 2):
            raise InvalidArgument("online: 0 any, 1 online, 2 offline", reason="ONLINE_FILTER_INVALID")
        where = DeviceFilter(
            kind=parse_kind(request.kind, required=False),
            location=registry.check_location(request.location) or None,
            status=STATUS_FROM_PB.get(request.status),
            online={0: None, 1: True, 2: False}[request.online],
        )
        limit = paging.page_size(request.page_size, default=registry.DEFAULT_PAGE_SIZE,
                                 maximum=registry.MAX_PAGE_SIZE)
        after = paging.parse_page_token(request.page_token)
        devices = await self._backends.store.devices(tenant_id=tenant_id, where=where, after=after, limit=limit + 1)
        page = devices[:limit]
        settled = await self._settled_page(tenant_id, page)
        return pb.ListDevicesResponse(
            devices=[device_pb(d, last_settled_sequence=settled.get(str(d.device_id), 0)) for d in page],
            next_page_token=paging.page_token(page[-1].seq) if len(devices) > limit else "",
        )

    async def UpdateDevice(self, request: pb.UpdateDeviceRequest, context: grpc.aio.ServicerContext
                           ) -> pb.UpdateDeviceResponse:
        tenant_id = registry.parse_tenant_id(request.tenant_id)
        device_id = registry.parse_device_id(request.device_id)
        parent: uuid.UUID | str | None = None
        if request.HasField("parent_device_id"):
            parent = registry.check_parent(request.parent_device_id) or ""
        changes = DeviceChanges(
            name=registry.check_name(request.name) if request.HasField("name") else None,
            location=registry.check_location(request.location) if request.HasField("location") else None,
            scene_tags=registry.check_scene_tags(list(request.scene_tags)) if request.replace_scene_tags else None,
            merchant_account_id=(registry.check_merchant(request.merchant_account_id)
                                 if request.HasField("merchant_account_id") else None),
            parent_device_id=parent,
            config_json=registry.check_config(request.config_json) if request.HasField("config_json") else None,
            capacity=registry.check_capacity(request.capacity) if request.HasField("capacity") else None,
        )
        async with self._backends.store.tx(tenant_id) as tx:
            current = await tx.device(device_id, lock=True)
            if current is None:
                raise device_not_found()
            if current.status == DeviceStatus.DECOMMISSIONED:
                raise FailedPrecondition("the device is decommissioned", reason="DEVICE_DECOMMISSIONED")
            if isinstance(parent, uuid.UUID):
                if parent == device_id:
                    raise InvalidArgument("a device is not its own parent", reason="PARENT_DEVICE_INVALID")
                await _check_parent(tx, kind=current.kind, parent=parent)
            bump = changes.config_json is not None and changes.config_json != current.config_json
            device = await tx.update_device(device_id, changes, now=_now(), bump_config=bump)
            await tx.emit(registry.SUBJECT_DEVICE_UPDATED, registry.device_event_data(device))
            if bump:
                await tx.emit(registry.SUBJECT_DEVICE_CONFIG_CHANGED,
                              {"device_id": str(device_id), "config_version": device.config_version})
        # This replica's stream of the device hears it at once; others through the events.
        await self._sync.refresh_context(tenant_id=tenant_id, device_id=device_id)
        if bump:
            await self._sync.push_config(tenant_id=tenant_id, device_id=device_id)
        return pb.UpdateDeviceResponse(device=device_pb(device))

    async def DecommissionDevice(self, request: pb.DecommissionDeviceRequest, context: grpc.aio.ServicerContext
                                 ) -> pb.DecommissionDeviceResponse:
        tenant_id = registry.parse_tenant_id(request.tenant_id)
        device_id = registry.parse_device_id(request.device_id)
        async with self._backends.store.tx(tenant_id) as tx:
            current = await tx.device(device_id, lock=True)
            if current is None:
                raise device_not_found()
            if current.status == DeviceStatus.DECOMMISSIONED:
                return pb.DecommissionDeviceResponse(device=device_pb(current))
            device = await tx.decommission(device_id, now=_now())
            await tx.emit(registry.SUBJECT_DEVICE_DECOMMISSIONED, registry.device_event_data(device))
        self._sessions.close(device_id, decommissioned())
        log.info("device decommissioned", tenant_id=str(tenant_id), device_id=str(device_id))
        return pb.DecommissionDeviceResponse(device=device_pb(device))

    async def CreateEnrolmentToken(self, request: pb.CreateEnrolmentTokenRequest, context: grpc.aio.ServicerContext
                                   ) -> pb.CreateEnrolmentTokenResponse:
        tenant_id = registry.parse_tenant_id(request.tenant_id)
        device_id = registry.parse_device_id(request.device_id)
        ttl_s = registry.check_ttl(request.ttl_s)
        now = _now()
        token = registry.new_token(now=now, ttl_s=ttl_s)
        async with self._backends.store.tx(tenant_id) as tx:
            current = await tx.device(device_id, lock=True)
            if current is None:
                raise device_not_found()
            if current.status == DeviceStatus.DECOMMISSIONED:
                raise FailedPrecondition("the device is decommissioned", reason="DEVICE_DECOMMISSIONED")
            await tx.insert_token(device_id, sha256=token.sha256, expires_at=token.expires_at, now=now)
            await tx.emit(registry.SUBJECT_TOKEN_CREATED,
                          {"device_id": str(device_id), "expires_at": token.expires_at.isoformat()})
        return pb.CreateEnrolmentTokenResponse(enrolment_token=token.token, expires_at=timestamp_pb(token.expires_at),
                                               hub_ca_pem=self._backends.device_ca_pem)

    # --- alarms -------------------------------------------------------------------------------

    async def ListAlarms(self, request: pb.ListAlarmsRequest, context: grpc.aio.ServicerContext
                         ) -> pb.ListAlarmsResponse:
        tenant_id = registry.parse_tenant_id(request.tenant_id)
        alarms, token = await self._backends.alarms.list(
            tenant_id=tenant_id, state=request.state, device_id=request.device_id, kind=request.kind,
            page_size=request.page_size, page_token=request.page_token)
        return pb.ListAlarmsResponse(alarms=[alarm_pb(a) for a in alarms], next_page_token=token)

    async def AcknowledgeAlarm(self, request: pb.AcknowledgeAlarmRequest, context: grpc.aio.ServicerContext
                               ) -> pb.AcknowledgeAlarmResponse:
        tenant_id = registry.parse_tenant_id(request.tenant_id)
        alarm = await self._backends.alarms.acknowledge(tenant_id=tenant_id, alarm_id=request.alarm_id, by=request.by)
        return pb.AcknowledgeAlarmResponse(alarm=alarm_pb(alarm))

    async def ClearAlarm(self, request: pb.ClearAlarmRequest, context: grpc.aio.ServicerContext
                         ) -> pb.ClearAlarmResponse:
        tenant_id = registry.parse_tenant_id(request.tenant_id)
        alarm = await self._backends.alarms.clear(tenant_id=tenant_id, alarm_id=request.alarm_id, by=request.by)
        return pb.ClearAlarmResponse(alarm=alarm_pb(alarm))

    # --- access and dining (the transactions part) --------------------------------------------

    async def SetAccessRules(self, request: pb.SetAccessRulesRequest, context: grpc.aio.ServicerContext
                             ) -> pb.SetAccessRulesResponse:
        registry.parse_tenant_id(request.tenant_id)
        return await self._backends.transactions().set_access_rules(request)

    async def GetAccessRules(self, request: pb.GetAccessRulesRequest, context: grpc.aio.ServicerContext
                             ) -> pb.GetAccessRulesResponse:
        registry.parse_tenant_id(request.tenant_id)
        return await self._backends.transactions().get_access_rules(request)

    async def ListAccessRecords(self, request: pb.ListAccessRecordsRequest, context: grpc.aio.ServicerContext
                                ) -> pb.ListAccessRecordsResponse:
        registry.parse_tenant_id(request.tenant_id)
        return await self._backends.transactions().list_access_records(request)

    async def GetDiningIndex(self, request: pb.GetDiningIndexRequest, context: grpc.aio.ServicerContext
                             ) -> pb.GetDiningIndexResponse:
        registry.parse_tenant_id(request.tenant_id)
        return await self._backends.transactions().get_dining_index(request)

    # --- rollouts -----------------------------------------------------------------------------

    async def CreateRollout(self, request: pb.CreateRolloutRequest, context: grpc.aio.ServicerContext
                            ) -> pb.CreateRolloutResponse:
        tenant_id = registry.parse_tenant_id(request.tenant_id)
        scope = key_scope(request.key_scope, caller=peer_name(context))
        spec = make_spec(
            idempotency_key=request.idempotency_key, key_scope=scope, target=TARGET_FROM_PB.get(request.target),
            version=request.version, config_json=request.config_json,
            kind=parse_kind(request.kind, required=False), model=request.model, location=request.location,
            stage_sizes=list(request.stage_sizes), success_threshold=request.success_threshold,
            error_threshold=request.error_threshold)
        rollout, created = await self._rollouts.create(tenant_id, spec)
        return pb.CreateRolloutResponse(rollout=rollout_pb(rollout), created=created)

    async def GetRollout(self, request: pb.GetRolloutRequest, context: grpc.aio.ServicerContext
                         ) -> pb.GetRolloutResponse:
        tenant_id = registry.parse_tenant_id(request.tenant_id)
        return pb.GetRolloutResponse(rollout=rollout_pb(await self._rollouts.get(tenant_id, request.rollout_id)))

    async def ListRollouts(self, request: pb.ListRolloutsRequest, context: grpc.aio.ServicerContext
                           ) -> pb.ListRolloutsResponse:
        tenant_id = registry.parse_tenant_id(request.tenant_id)
        rollouts, token = await self._rollouts.list(tenant_id, page_size=request.page_size,
                                                    page_token=request.page_token)
        return pb.ListRolloutsResponse(rollouts=[rollout_pb(r) for r in rollouts], next_page_token=token)


def decommissioned() -> PermissionDenied:
    return PermissionDenied("the device is decommissioned", reason="DEVICE_DECOMMISSIONED")


def token_invalid() -> Unauthenticated:
    return Unauthenticated("unknown, used or expired enrolment token", reason="ENROLMENT_TOKEN_INVALID")


class DeviceServicer(devicehub_pb2_grpc.DeviceServiceServicer):
    def __init__(self, *, backends: Backends, sessions: Sessions, stream: DeviceStream):
        self._backends = backends
        self._sessions = sessions
        self._stream = stream

    async def Enrol(self, request: pb.EnrolRequest, context: grpc.aio.ServicerContext) -> pb.EnrolResponse:
        public_key = registry.check_public_key(request.public_key)
        firmware = registry.check_firmware(request.firmware_version)
        if not request.enrolment_token or len(request.enrolment_token) > 200:
            raise token_invalid()
        sha256 = registry.token_sha256(request.enrolment_token)
        now = _now()
        owner = await self._backends.store.token_owner_any(sha256)
        if owner is None:
            raise token_invalid()
        tenant_id, device_id = owner
        async with self._backends.store.tx(tenant_id) as tx:
            current = await tx.device(device_id, lock=True)
            if current is None:
                raise token_invalid()
            if current.status == DeviceStatus.DECOMMISSIONED:
                raise decommissioned()
            if not await self._backends.store.token_usable(tx.conn, sha256, now=now):
                raise token_invalid()
            await tx.use_token(sha256, now=now)
            await tx.revoke_tokens(device_id, now=now)
            device = await tx.enrol(device_id, public_key=public_key, fingerprint=registry.key_fingerprint(public_key),
                                    firmware_version=firmware, now=now)
            await tx.emit(registry.SUBJECT_DEVICE_ENROLLED, registry.device_event_data(device))
        # A stream still open with the old key (a replaced board) ends.
        session = self._sessions.get(device_id)
        if session is not None and session.context.public_key != public_key:
            session.end(Unauthenticated("the device enrolled a new key", reason="DEVICE_KEY_REPLACED"))
        log.info("device enrolled", tenant_id=str(tenant_id), device_id=str(device_id),
                 key_fingerprint=device.key_fingerprint)
        return pb.EnrolResponse(device=device_pb(device), hub_ca_pem=self._backends.device_ca_pem)

    async def Connect(self, request_iterator: AsyncIterator[pb.ConnectRequest], context: grpc.aio.ServicerContext
                      ) -> AsyncIterator[pb.ConnectResponse]:
        async for message in self._stream.run(request_iterator):
            yield message
