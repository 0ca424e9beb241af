"""Alarms: one open alarm per device and kind (a repeat counts), acknowledge, clear, list filters,
events, tenant scoping. Raised here through ``Alarms`` (the AlarmSink the other parts use)."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest

from onecard.devicehub.v1 import devicehub_pb2 as pb
from runtime.db import create_pool
from services.devicehub.alarms import Alarms
from tests.devicehub.support import enrol_device, eventually, make_tenant, refused


@pytest.fixture
async def alarms(devicehub, database_url):
    pool = await create_pool(database_url, schema="devicehub")
    yield Alarms(pool)
    await pool.close()


async def test_one_open_alarm_per_device_and_kind(devicehub, device_stub, tenant_id, alarms, devicehub_db):
    device = await enrol_device(devicehub.stub, device_stub, tenant_id)
    other = await enrol_device(devicehub.stub, device_stub, tenant_id)
    await asyncio.gather(*(alarms.raise_alarm(tenant_id=tenant_id, device_id=device.device_id,
                                              kind=pb.ALARM_KIND_SEQUENCE_GAP, severity=pb.ALARM_SEVERITY_WARNING,
                                              detail=f"missing {i}") for i in range(5)))
    await alarms.raise_alarm(tenant_id=tenant_id, device_id=device.device_id, kind=pb.ALARM_KIND_CODE_REPLAY,
                             severity=pb.ALARM_SEVERITY_CRITICAL, detail="replay")
    await alarms.raise_alarm(tenant_id=tenant_id, device_id=other.device_id, kind=pb.ALARM_KIND_SEQUENCE_GAP,
                             severity=pb.ALARM_SEVERITY_WARNING, detail="gap")
    stub = devicehub.stub
    listed = (await stub.ListAlarms(pb.ListAlarmsRequest(tenant_id=tenant_id, device_id=device.device_id))).alarms
    assert sorted((a.kind, a.count) for a in listed) == [(pb.ALARM_KIND_SEQUENCE_GAP, 5),
                                                          (pb.ALARM_KIND_CODE_REPLAY, 1)]
    gap = next(a for a in listed if a.kind == pb.ALARM_KIND_SEQUENCE_GAP)
    assert gap.state == pb.ALARM_STATE_OPEN and gap.severity == pb.ALARM_SEVERITY_WARNING
    assert gap.opened_at.seconds > 0 and gap.last_raised_at.ToNanoseconds() >= gap.opened_at.ToNanoseconds()

    acked = (await stub.AcknowledgeAlarm(pb.AcknowledgeAlarmRequest(tenant_id=tenant_id, alarm_id=gap.alarm_id,
                                                                    by="ops@campus"))).alarm
    assert acked.state == pb.ALARM_STATE_ACKNOWLEDGED and acked.acknowledged_by == "ops@campus"
    # Still the open one: a repeat counts on it.
    await alarms.raise_alarm(tenant_id=tenant_id, device_id=device.device_id, kind=pb.ALARM_KIND_SEQUENCE_GAP,
                             severity=pb.ALARM_SEVERITY_WARNING, detail="again")
    by_kind = (await stub.ListAlarms(pb.ListAlarmsRequest(tenant_id=tenant_id, kind=pb.ALARM_KIND_SEQUENCE_GAP,
                                                          device_id=device.device_id))).alarms
    assert [(a.alarm_id, a.count, a.state) for a in by_kind] == [(gap.alarm_id, 6, pb.ALARM_STATE_ACKNOWLEDGED)]

    cleared = (await stub.ClearAlarm(pb.ClearAlarmRequest(tenant_id=tenant_id, alarm_id=gap.alarm_id,
                                                          by="ops@campus"))).alarm
    assert cleared.state == pb.ALARM_STATE_CLEARED and cleared.cleared_at.seconds > 0
    assert (await stub.ClearAlarm(pb.ClearAlarmRequest(tenant_id=tenant_id, alarm_id=gap.alarm_id))).alarm.state \
        == pb.ALARM_STATE_CLEARED
    assert await refused(stub.AcknowledgeAlarm(pb.AcknowledgeAlarmRequest(tenant_id=tenant_id,
                                                                          alarm_id=gap.alarm_id))) == (
        grpc.StatusCode.FAILED_PRECONDITION, "ALARM_CLEARED")
    # After clearing, a new raise opens a new alarm.
    await alarms.raise_alarm(tenant_id=tenant_id, device_id=device.device_id, kind=pb.ALARM_KIND_SEQUENCE_GAP,
                             severity=pb.ALARM_SEVERITY_WARNING, detail="new gap")
    open_now = (await stub.ListAlarms(pb.ListAlarmsRequest(tenant_id=tenant_id, kind=pb.ALARM_KIND_SEQUENCE_GAP,
                                                           device_id=device.device_id))).alarms
    assert len(open_now) == 1 and open_now[0].alarm_id != gap.alarm_id and open_now[0].count == 1
    history = (await stub.ListAlarms(pb.ListAlarmsRequest(tenant_id=tenant_id,
                                                          state=pb.ALARM_STATE_CLEARED))).alarms
    assert [a.alarm_id for a in history] == [gap.alarm_id]

    rows = await devicehub_db.fetch("SELECT subject, payload FROM outbox WHERE subject LIKE 'devicehub.alarm.%'")
    subjects = [r["subject"] for r in rows]
    assert subjects.count("devicehub.alarm.raised") == 9
    assert subjects.count("devicehub.alarm.acknowledged") == 1 and subjects.count("devicehub.alarm.cleared") == 1
    assert all(json.loads(bytes(r["payload"]))["tenant_id"] == tenant_id for r in rows)


async def test_alarms_are_tenant_scoped_and_paged(devicehub, identity, device_stub, tenant_id, alarms):
    other = await make_tenant(identity.stub, name="Other")
    device = await enrol_device(devicehub.stub, device_stub, tenant_id)
    for kind in (pb.ALARM_KIND_SEQUENCE_GAP, pb.ALARM_KIND_CODE_REPLAY, pb.ALARM_KIND_SHORTFALL):
        await alarms.raise_alarm(tenant_id=tenant_id, device_id=device.device_id, kind=kind,
                                 severity=pb.ALARM_SEVERITY_INFO, detail="x")
    stub = devicehub.stub
    first = await stub.ListAlarms(pb.ListAlarmsRequest(tenant_id=tenant_id, page_size=2))
    assert len(first.alarms) == 2 and first.next_page_token
    second = await stub.ListAlarms(pb.ListAlarmsRequest(tenant_id=tenant_id, page_size=2,
                                                        page_token=first.next_page_token))
    assert len(second.alarms) == 1 and not second.next_page_token
    alarm_id = first.alarms[0].alarm_id
    assert not (await stub.ListAlarms(pb.ListAlarmsRequest(tenant_id=other))).alarms
    not_found = (grpc.StatusCode.NOT_FOUND, "ALARM_NOT_FOUND")
    assert await refused(stub.AcknowledgeAlarm(pb.AcknowledgeAlarmRequest(tenant_id=other,
                                                                          alarm_id=alarm_id))) == not_found
    assert await refused(stub.ClearAlarm(pb.ClearAlarmRequest(tenant_id=other, alarm_id=alarm_id))) == not_found
    assert await refused(stub.ListAlarms(pb.ListAlarmsRequest(tenant_id=tenant_id, kind=42))) == (
        grpc.StatusCode.INVALID_ARGUMENT, "ALARM_KIND_INVALID")
    assert await refused(stub.AcknowledgeAlarm(pb.AcknowledgeAlarmRequest(tenant_id=tenant_id,
                                                                          alarm_id="x"))) == (
        grpc.StatusCode.INVALID_ARGUMENT, "ALARM_ID_INVALID")

    async def still_open():
        alarms_now = (await stub.ListAlarms(pb.ListAlarmsRequest(tenant_id=tenant_id))).alarms
        return len(alarms_now) == 3

    await eventually(still_open)
