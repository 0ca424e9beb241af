"""Rollouts: stages by size, the next stage at the success threshold, a stop at the error
threshold that tells no further device, config applied on success, idempotency, refusals."""

from __future__ import annotations

import asyncio
import json
import uuid

import grpc

from onecard.devicehub.v1 import devicehub_pb2 as pb
from tests.devicehub.support import body_is, connect, enrol_device, eventually, is_sync, make_tenant, refused


def _rollout_request(tenant_id: str, **fields) -> pb.CreateRolloutRequest:
    values = {"tenant_id": tenant_id, "idempotency_key": str(uuid.uuid4()), "target": pb.ROLLOUT_TARGET_FIRMWARE,
              "version": "2.0.0", "kind": pb.DEVICE_KIND_POS, "stage_sizes": [1], "success_threshold": 1.0,
              "error_threshold": 1}
    values.update(fields)
    return pb.CreateRolloutRequest(**values)


async def _get(stub, tenant_id, rollout_id) -> pb.Rollout:
    return (await stub.GetRollout(pb.GetRolloutRequest(tenant_id=tenant_id, rollout_id=rollout_id))).rollout


async def test_the_error_threshold_stops_the_rollout_and_tells_no_further_device(devicehub, device_stub, tenant_id):
    stub = devicehub.stub
    devices = [await enrol_device(stub, device_stub, tenant_id, model="R1") for _ in range(6)]
    other_model = await enrol_device(stub, device_stub, tenant_id, model="R2")
    connections = [await connect(device_stub, d) for d in [*devices, other_model]]
    try:
        for connection in connections:
            await connection.drain(0.2)
        created = await stub.CreateRollout(_rollout_request(tenant_id, model="R1", stage_sizes=[2, 4],
                                                            success_threshold=1.0, error_threshold=2))
        rollout = created.rollout
        assert created.created and rollout.state == pb.ROLLOUT_STATE_RUNNING and rollout.current_stage == 0
        stages = {d.device_id: (d.stage, d.step) for d in rollout.devices}
        assert stages == {**{d.device_id: (0, pb.UPDATE_STEP_PENDING) for d in devices[:2]},
                          **{d.device_id: (1, pb.UPDATE_STEP_UNSPECIFIED) for d in devices[2:]}}

        for connection in connections[:2]:
            command = (await connection.recv_until(body_is("update_command"))).update_command
            assert (command.rollout_id, command.target, command.version) == (
                rollout.rollout_id, pb.ROLLOUT_TARGET_FIRMWARE, "2.0.0")
            await connection.send(update_report=pb.UpdateReport(rollout_id=rollout.rollout_id,
                                                                step=pb.UPDATE_STEP_DOWNLOADING,
                                                                running_version="1.0.0"))
        await connections[0].send(update_report=pb.UpdateReport(
            rollout_id=rollout.rollout_id, step=pb.UPDATE_STEP_FAILED, running_version="1.0.0", detail="flash error"))
        await asyncio.sleep(0.2)
        assert (await _get(stub, tenant_id, rollout.rollout_id)).state == pb.ROLLOUT_STATE_RUNNING
        await connections[1].send(update_report=pb.UpdateReport(
            rollout_id=rollout.rollout_id, step=pb.UPDATE_STEP_FAILED, running_version="1.0.0", detail="no space"))

        async def stopped():
            got = await _get(stub, tenant_id, rollout.rollout_id)
            return got if got.state == pb.ROLLOUT_STATE_STOPPED else None

        final = await eventually(stopped)
        assert final.current_stage == 0 and "2 devices failed" in final.detail
        steps = {d.device_id: (d.step, d.reported_version, d.detail) for d in final.devices}
        assert steps[devices[0].device_id] == (pb.UPDATE_STEP_FAILED, "1.0.0", "flash error")
        assert all(steps[d.device_id][0] == pb.UPDATE_STEP_UNSPECIFIED for d in devices[2:])
        alarms = (await stub.ListAlarms(pb.ListAlarmsRequest(tenant_id=tenant_id,
                                                             kind=pb.ALARM_KIND_ROLLOUT_FAILED))).alarms
        assert len(alarms) == 1 and alarms[0].severity == pb.ALARM_SEVERITY_CRITICAL

        # No further device is told: not the connected ones, not on reconnect.
        await asyncio.sleep(0.5)
        for connection in connections[2:]:
            await connection.drain(0.2)
            assert not [m for m in connection.history if m.WhichOneof("body") == "update_command"]
        again = await connect(device_stub, devices[3])
        try:
            assert not [m for m in await again.drain(0.5) if m.WhichOneof("body") == "update_command"]
        finally:
            await again.close()
        # Firmware stays what the devices run.
        got = (await stub.GetDevice(pb.GetDeviceRequest(tenant_id=tenant_id, device_id=devices[0].device_id))).device
        assert got.firmware_version == "1.0.0"
    finally:
        for connection in connections:
            await connection.close()


async def test_stages_advance_at_the_success_threshold_and_config_is_applied(devicehub, device_stub, tenant_id):
    stub = devicehub.stub
    devices = [await enrol_device(stub, device_stub, tenant_id, kind=pb.DEVICE_KIND_GATE, location="east")
               for _ in range(3)]
    first, second = await connect(device_stub, devices[0]), await connect(device_stub, devices[1])
    third = None
    try:
        config = '{"beep": false, "open_ms": 1500}'
        rollout = (await stub.CreateRollout(_rollout_request(
            tenant_id, target=pb.ROLLOUT_TARGET_CONFIG, version="", config_json=config, kind=pb.DEVICE_KIND_GATE,
            location="east", stage_sizes=[1, 1], success_threshold=0.5, error_threshold=1))).rollout
        assert [d.stage for d in rollout.devices] == [0, 1, 1]
        command = (await first.recv_until(body_is("update_command"))).update_command
        assert command.target == pb.ROLLOUT_TARGET_CONFIG and json.loads(command.config_json) == json.loads(config)
        await first.send(update_report=pb.UpdateReport(rollout_id=rollout.rollout_id, step=pb.UPDATE_STEP_SUCCEEDED))
        # The config reaches it as its own CONFIG too, with the version it now holds.
        synced = (await first.recv_until(is_sync(pb.SYNC_KIND_CONFIG))).sync
        assert synced.version == 1 and json.loads(synced.document) == json.loads(config)

        # Stage 1 started: the connected device is told now, the other one when it connects.
        await second.recv_until(body_is("update_command"))
        third = await connect(device_stub, devices[2])
        await third.recv_until(body_is("update_command"))
        await second.send(update_report=pb.UpdateReport(rollout_id=rollout.rollout_id,
                                                        step=pb.UPDATE_STEP_SUCCEEDED))

        async def succeeded():
            got = await _get(stub, tenant_id, rollout.rollout_id)
            return got if got.state == pb.ROLLOUT_STATE_SUCCEEDED else None

        final = await eventually(succeeded)
        assert final.current_stage == 1
        # A straggler of the last stage still reports and gets its config.
        await third.send(update_report=pb.UpdateReport(rollout_id=rollout.rollout_id, step=pb.UPDATE_STEP_SUCCEEDED))
        await third.recv_until(is_sync(pb.SYNC_KIND_CONFIG))
        for device in devices:
            got = (await stub.GetDevice(pb.GetDeviceRequest(tenant_id=tenant_id, device_id=device.device_id))).device
            assert json.loads(got.config_json) == json.loads(config) and got.config_version == 1
    finally:
        for connection in (first, second, third):
            if connection is not None:
                await connection.close()


async def test_firmware_success_records_the_version(devicehub, device_stub, tenant_id):
    stub = devicehub.stub
    device = await enrol_device(stub, device_stub, tenant_id)
    connection = await connect(device_stub, device)
    try:
        rollout = (await stub.CreateRollout(_rollout_request(tenant_id, version="3.1.0"))).rollout
        await connection.recv_until(body_is("update_command"))
        # Repeats of the command on reconnect while still pending.
        await connection.close()
        connection = await connect(device_stub, device)
        await connection.recv_until(body_is("update_command"))
        await connection.send(update_report=pb.UpdateReport(rollout_id=rollout.rollout_id,
                                                            step=pb.UPDATE_STEP_SUCCEEDED, running_version="3.1.0"))

        async def done():
            got = await _get(stub, tenant_id, rollout.rollout_id)
            return got.state == pb.ROLLOUT_STATE_SUCCEEDED

        await eventually(done)
        got = (await stub.GetDevice(pb.GetDeviceRequest(tenant_id=tenant_id, device_id=device.device_id))).device
        assert got.firmware_version == "3.1.0"
        # Done: not told again.
        await connection.close()
        connection = await connect(device_stub, device)
        assert not [m for m in await connection.drain(0.4) if m.WhichOneof("body") == "update_command"]
    finally:
        await connection.close()


async def test_create_is_idempotent_validated_and_tenant_scoped(devicehub, device_stub, identity, tenant_id):
    stub = devicehub.stub
    device = await enrol_device(stub, device_stub, tenant_id)
    request = _rollout_request(tenant_id, idempotency_key="fw-2.0.0-wave-1")
    first = await stub.CreateRollout(request)
    again = await stub.CreateRollout(request)
    assert first.created and not again.created and again.rollout.rollout_id == first.rollout.rollout_id
    changed = _rollout_request(tenant_id, idempotency_key="fw-2.0.0-wave-1", version="2.0.1")
    assert await refused(stub.CreateRollout(changed)) == (grpc.StatusCode.ABORTED, "IDEMPOTENCY_KEY_REUSED")

    bad = grpc.StatusCode.INVALID_ARGUMENT
    cases = [
        ({"idempotency_key": ""}, "IDEMPOTENCY_KEY_INVALID"),
        ({"target": pb.ROLLOUT_TARGET_UNSPECIFIED}, "TARGET_INVALID"),
        ({"kind": pb.DEVICE_KIND_UNSPECIFIED}, "KIND_INVALID"),
        ({"version": ""}, "VERSION_INVALID"),
        ({"target": pb.ROLLOUT_TARGET_CONFIG, "config_json": "[]"}, "CONFIG_INVALID"),
        ({"target": pb.ROLLOUT_TARGET_CONFIG, "config_json": ""}, "CONFIG_INVALID"),
        ({"stage_sizes": []}, "STAGE_SIZES_INVALID"),
        ({"stage_sizes": [2, 0]}, "STAGE_SIZES_INVALID"),
        ({"success_threshold": 0.0}, "SUCCESS_THRESHOLD_INVALID"),
        ({"success_threshold": 1.5}, "SUCCESS_THRESHOLD_INVALID"),
        ({"error_threshold": 0}, "ERROR_THRESHOLD_INVALID"),
    ]
    for fields, reason in cases:
        assert await refused(stub.CreateRollout(_rollout_request(tenant_id, **fields))) == (bad, reason), fields
    assert await refused(stub.CreateRollout(_rollout_request(tenant_id, kind=pb.DEVICE_KIND_KIOSK))) == (
        grpc.StatusCode.FAILED_PRECONDITION, "ROLLOUT_GROUP_EMPTY")

    other = await make_tenant(identity.stub, name="Other")
    assert await refused(stub.GetRollout(pb.GetRolloutRequest(tenant_id=other,
                                                              rollout_id=first.rollout.rollout_id))) == (
        grpc.StatusCode.NOT_FOUND, "ROLLOUT_NOT_FOUND")
    assert not (await stub.ListRollouts(pb.ListRolloutsRequest(tenant_id=other))).rollouts
    # The other tenant's same key makes its own (here: no devices).
    assert await refused(stub.CreateRollout(_rollout_request(other, idempotency_key="fw-2.0.0-wave-1"))) == (
        grpc.StatusCode.FAILED_PRECONDITION, "ROLLOUT_GROUP_EMPTY")

    second = await stub.CreateRollout(_rollout_request(tenant_id, version="2.1.0"))
    page = await stub.ListRollouts(pb.ListRolloutsRequest(tenant_id=tenant_id, page_size=1))
    assert [r.rollout_id for r in page.rollouts] == [second.rollout.rollout_id] and page.next_page_token
    rest = await stub.ListRollouts(pb.ListRolloutsRequest(tenant_id=tenant_id, page_size=1,
                                                          page_token=page.next_page_token))
    assert [r.rollout_id for r in rest.rollouts] == [first.rollout.rollout_id] and not rest.next_page_token

    # Reports the hub cannot take get a StreamError; the stream goes on.
    connection = await connect(device_stub, device)
    stranger = await enrol_device(stub, device_stub, tenant_id, model="late")
    late = await connect(device_stub, stranger)
    try:
        await connection.send(update_report=pb.UpdateReport(rollout_id=str(uuid.uuid4()),
                                                            step=pb.UPDATE_STEP_SUCCEEDED))
        assert (await connection.recv_until(body_is("error"))).error.reason == "ROLLOUT_NOT_FOUND"
        await connection.send(update_report=pb.UpdateReport(rollout_id=first.rollout.rollout_id,
                                                            step=pb.UPDATE_STEP_PENDING))
        assert (await connection.recv_until(body_is("error"))).error.reason == "STEP_INVALID"
        await late.send(update_report=pb.UpdateReport(rollout_id=first.rollout.rollout_id,
                                                      step=pb.UPDATE_STEP_SUCCEEDED))
        error = (await late.recv_until(body_is("error"))).error
        assert (error.reason, error.ref) == ("ROLLOUT_DEVICE_NOT_FOUND", first.rollout.rollout_id)
    finally:
        await connection.close()
        await late.close()
