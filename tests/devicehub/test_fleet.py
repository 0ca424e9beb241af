"""Watching the fleet: silent devices go offline and raise OFFLINE_TOO_LONG, heartbeats bring them
back, a drifting clock raises CLOCK_DRIFT, an old offline backlog BACKLOG_TOO_OLD; events for all."""

from __future__ import annotations

import json

import asyncpg

from onecard.devicehub.v1 import devicehub_pb2 as pb
from onecard.devicehub.v1 import devicehub_pb2_grpc
from tests.devicehub.support import connect, enrol_device, eventually, now_pb


async def _alarms(stub, tenant_id, device_id, kind):
    return (await stub.ListAlarms(pb.ListAlarmsRequest(tenant_id=tenant_id, device_id=device_id, kind=kind))).alarms


async def _device(stub, tenant_id, device_id):
    return (await stub.GetDevice(pb.GetDeviceRequest(tenant_id=tenant_id, device_id=device_id))).device


async def test_silent_devices_go_offline_and_raise_offline_too_long(start_devicehub, tenant_id, database_url):
    hub = await start_devicehub(offline_after_s=0.5, offline_alarm_after_s=1.5, heartbeat_check_interval_s=0.1)
    stub = hub.stub
    device_stub = devicehub_pb2_grpc.DeviceServiceStub(hub.device_channel)
    device = await enrol_device(stub, device_stub, tenant_id)
    never_seen = await enrol_device(stub, device_stub, tenant_id)
    connection = await connect(device_stub, device)
    try:
        assert (await _device(stub, tenant_id, device.device_id)).online

        async def offline():
            return not (await _device(stub, tenant_id, device.device_id)).online

        await eventually(offline, timeout=5)
        alarm = (await eventually(lambda: _alarms(stub, tenant_id, device.device_id, pb.ALARM_KIND_OFFLINE_TOO_LONG),
                                  timeout=5))[0]
        assert alarm.state == pb.ALARM_STATE_OPEN and alarm.severity == pb.ALARM_SEVERITY_WARNING
        assert "offline for" in alarm.detail
        # Raised once while it stays open, not on every sweep.
        await eventually(offline, timeout=1)
        assert (await _alarms(stub, tenant_id, device.device_id, pb.ALARM_KIND_OFFLINE_TOO_LONG))[0].count == 1
        # A device never seen (enrolled, never connected) raises nothing.
        assert not await _alarms(stub, tenant_id, never_seen.device_id, pb.ALARM_KIND_OFFLINE_TOO_LONG)

        # A heartbeat brings it back.
        await connection.send(heartbeat=pb.Heartbeat(queue_depth=0))

        async def online():
            return (await _device(stub, tenant_id, device.device_id)).online

        await eventually(online, timeout=5)
        # Back: its OFFLINE_TOO_LONG alarm cleared itself (and a new stream finds none open).
        assert not await _alarms(stub, tenant_id, device.device_id, pb.ALARM_KIND_OFFLINE_TOO_LONG)
    finally:
        await connection.close()
    connection = await connect(device_stub, device)
    try:
        assert not await _alarms(stub, tenant_id, device.device_id, pb.ALARM_KIND_OFFLINE_TOO_LONG)
        cleared = await stub.ListAlarms(pb.ListAlarmsRequest(tenant_id=tenant_id, device_id=device.device_id,
                                                             state=pb.ALARM_STATE_CLEARED))
        assert [(a.kind, a.cleared_by) for a in cleared.alarms] == [(pb.ALARM_KIND_OFFLINE_TOO_LONG, "devicehub")]
    finally:
        await connection.close()

    conn = await asyncpg.connect(database_url, server_settings={"search_path": "devicehub"})
    try:
        rows = await conn.fetch("SELECT subject, payload FROM outbox WHERE subject LIKE 'devicehub.device.o%'"
                                " ORDER BY id")
    finally:
        await conn.close()
    reasons = [(r["subject"], json.loads(bytes(r["payload"]))["data"]["reason"]) for r in rows
               if json.loads(bytes(r["payload"]))["data"]["device_id"] == device.device_id]
    assert reasons[:3] == [("devicehub.device.online", "connected"), ("devicehub.device.offline", "silent"),
                           ("devicehub.device.online", "heartbeat")]


async def test_clock_drift_and_an_old_backlog_raise_alarms(devicehub, device_stub, tenant_id):
    stub = devicehub.stub
    device = await enrol_device(stub, device_stub, tenant_id)
    steady = await enrol_device(stub, device_stub, tenant_id)
    connection = await connect(device_stub, device, clock_offset_s=120)
    calm = await connect(device_stub, steady)
    try:
        drift = (await eventually(lambda: _alarms(stub, tenant_id, device.device_id, pb.ALARM_KIND_CLOCK_DRIFT)))[0]
        assert drift.count == 1 and "ms" in drift.detail
        await connection.send(heartbeat=pb.Heartbeat(device_time=now_pb(120), queue_depth=5,
                                                     oldest_queued_at=now_pb(120 - 2 * 3600)))

        async def repeated():
            alarms = await _alarms(stub, tenant_id, device.device_id, pb.ALARM_KIND_CLOCK_DRIFT)
            return alarms[0].count == 2

        await eventually(repeated)
        backlog = (await eventually(lambda: _alarms(stub, tenant_id, device.device_id,
                                                    pb.ALARM_KIND_BACKLOG_TOO_OLD)))[0]
        assert "5 offline records" in backlog.detail
        # Within limits: nothing.
        await calm.send(heartbeat=pb.Heartbeat(device_time=now_pb(1), queue_depth=3, oldest_queued_at=now_pb(-60)))

        async def recorded():
            return (await _device(stub, tenant_id, steady.device_id)).queue_depth == 3

        await eventually(recorded)
        assert not (await stub.ListAlarms(pb.ListAlarmsRequest(tenant_id=tenant_id,
                                                               device_id=steady.device_id))).alarms
        got = await _device(stub, tenant_id, device.device_id)
        assert 119_000 <= got.clock_offset_ms <= 121_000 and got.queue_depth == 5
    finally:
        await connection.close()
        await calm.close()


async def test_a_tenant_sets_how_far_its_terminals_clocks_may_drift(devicehub, device_stub, policy, tenant_id):
    """The tenant's rule set says 5 s (the hub's default is 30 s): 10 s off raises CLOCK_DRIFT,
    3 s off does not."""
    from onecard.policy.v1 import policy_pb2 as ppb

    document = {"format": 1, "time_zone": "Asia/Shanghai", "scenes": ["store"], "funding_order": ["cash"],
                "clock": {"max_device_skew_s": 5}}
    created = await policy.stub.CreateRuleSetVersion(ppb.CreateRuleSetVersionRequest(
        tenant_id=tenant_id, document=json.dumps(document)))
    await policy.stub.PublishRuleSetVersion(ppb.PublishRuleSetVersionRequest(
        tenant_id=tenant_id, version=created.version.version, published_by="test"))
    stub = devicehub.stub
    off = await enrol_device(stub, device_stub, tenant_id)
    close = await enrol_device(stub, device_stub, tenant_id)
    drifting = await connect(device_stub, off, clock_offset_s=10)
    near = await connect(device_stub, close, clock_offset_s=3)
    try:
        drift = (await eventually(lambda: _alarms(stub, tenant_id, off.device_id, pb.ALARM_KIND_CLOCK_DRIFT)))[0]
        assert "limit 5000 ms" in drift.detail
        await near.send(heartbeat=pb.Heartbeat(device_time=now_pb(3), queue_depth=0))

        async def beat_seen() -> bool:
            return 2_000 <= (await _device(stub, tenant_id, close.device_id)).clock_offset_ms <= 4_000

        await eventually(beat_seen)
        assert not await _alarms(stub, tenant_id, close.device_id, pb.ALARM_KIND_CLOCK_DRIFT)
    finally:
        await drifting.close()
        await near.close()
