"""The device stream: the handshake and its refusals (without harming other devices' streams),
heartbeats, malformed messages, a second stream replacing the first, decommissioning."""

from __future__ import annotations

import asyncio
import uuid

import grpc
import nacl.signing

from onecard.devicehub.v1 import devicehub_pb2 as pb
from tests.devicehub.support import (
    DeviceConnection,
    EnrolledDevice,
    body_is,
    challenge_message,
    connect,
    enrol_device,
    eventually,
    hello,
    now_pb,
    register_device,
)


async def _device(devicehub, tenant_id, device_id):
    return (await devicehub.stub.GetDevice(pb.GetDeviceRequest(tenant_id=tenant_id, device_id=device_id))).device


async def test_connect_welcomes_and_tracks_online(devicehub, device_stub, tenant_id):
    device = await enrol_device(devicehub.stub, device_stub, tenant_id, location="north")
    connection = await connect(device_stub, device, firmware_version="1.0.1")
    try:
        welcome = connection.welcome
        assert welcome.device.device_id == device.device_id
        assert welcome.device.status == pb.DEVICE_STATUS_ACTIVE
        assert welcome.hub_time.seconds > 0
        got = await _device(devicehub, tenant_id, device.device_id)
        assert got.online and got.firmware_version == "1.0.1" and got.last_seen_at.seconds > 0
    finally:
        await connection.close()

    async def offline():
        return not (await _device(devicehub, tenant_id, device.device_id)).online

    await eventually(offline)


async def _handshake_refusal(device_stub, first: pb.ConnectRequest, *, signature_by=None, device=None):
    connection = DeviceConnection.start(device_stub)
    try:
        await connection.send(first)
        if signature_by is not None:
            challenge = await connection.recv()
            assert challenge.WhichOneof("body") == "challenge"
            assert len(challenge.challenge.nonce) == 32
            signature = signature_by.sign(challenge_message(
                tenant_id=device.tenant_id, device_id=device.device_id, nonce=challenge.challenge.nonce)).signature
            await connection.send(challenge_response=pb.ChallengeResponse(signature=signature))
        closed = await connection.closed()
        return closed.code, closed.reason
    finally:
        await connection.close()


async def test_refusals_leave_other_streams_alone(devicehub, device_stub, tenant_id):
    good = await enrol_device(devicehub.stub, device_stub, tenant_id)
    connection = await connect(device_stub, good)
    try:
        pending = (await register_device(devicehub.stub, tenant_id)).device
        retired = await enrol_device(devicehub.stub, device_stub, tenant_id)
        await devicehub.stub.DecommissionDevice(pb.DecommissionDeviceRequest(tenant_id=tenant_id,
                                                                             device_id=retired.device_id))
        unknown = EnrolledDevice(tenant_id=tenant_id, device_id=str(uuid.uuid4()),
                                 signing_key=nacl.signing.SigningKey.generate(), device=pb.Device())
        pending_device = EnrolledDevice(tenant_id=tenant_id, device_id=pending.device_id,
                                        signing_key=nacl.signing.SigningKey.generate(), device=pending)

        assert await _handshake_refusal(device_stub, hello(unknown)) == (grpc.StatusCode.UNAUTHENTICATED,
                                                                         "DEVICE_UNKNOWN")
        assert await _handshake_refusal(device_stub, hello(retired)) == (grpc.StatusCode.PERMISSION_DENIED,
                                                                         "DEVICE_DECOMMISSIONED")
        assert await _handshake_refusal(device_stub, hello(pending_device)) == (
            grpc.StatusCode.FAILED_PRECONDITION, "DEVICE_NOT_ENROLLED")
        assert await _handshake_refusal(device_stub, pb.ConnectRequest(heartbeat=pb.Heartbeat())) == (
            grpc.StatusCode.UNAUTHENTICATED, "HELLO_REQUIRED")
        # Another tenant's id with this device's id: unknown there.
        elsewhere = EnrolledDevice(tenant_id=str(uuid.uuid4()), device_id=good.device_id,
                                   signing_key=good.signing_key, device=good.device)
        assert await _handshake_refusal(device_stub, hello(elsewhere)) == (grpc.StatusCode.UNAUTHENTICATED,
                                                                           "DEVICE_UNKNOWN")
        # The right device, the wrong key.
        assert await _handshake_refusal(device_stub, hello(good), signature_by=nacl.signing.SigningKey.generate(),
                                        device=good) == (grpc.StatusCode.UNAUTHENTICATED, "CHALLENGE_FAILED")

        # The good stream still works: a malformed message gets an error and the stream goes on.
        await connection.send(pb.ConnectRequest())
        error = await connection.recv_until(body_is("error"))
        assert error.error.reason == "MALFORMED_MESSAGE"
        await connection.send(heartbeat=pb.Heartbeat(queue_depth=3, firmware_version="1.0.0"))

        async def recorded():
            return (await _device(devicehub, tenant_id, good.device_id)).queue_depth == 3

        await eventually(recorded)
        assert (await _device(devicehub, tenant_id, good.device_id)).online
    finally:
        await connection.close()


async def test_malformed_messages_get_stream_errors(devicehub, device_stub, tenant_id):
    device = await enrol_device(devicehub.stub, device_stub, tenant_id)
    connection = await connect(device_stub, device)
    try:
        await connection.drain(0.3)
        await connection.send(pb.ConnectRequest())
        await connection.send(hello(device))
        await connection.send(authorize=pb.Authorize(purpose=pb.PURPOSE_PAY, amount_fen=100))
        await connection.send(sync_ack=pb.SyncAck(kind=99, version=1))
        await connection.send(heartbeat=pb.Heartbeat(queue_depth=-1))
        errors = [await connection.recv_until(body_is("error")) for _ in range(5)]
        reasons = [e.error.reason for e in errors]
        assert reasons == ["MALFORMED_MESSAGE", "MALFORMED_MESSAGE", "MALFORMED_MESSAGE", "SYNC_KIND_INVALID",
                           "QUEUE_DEPTH_INVALID"]
        # Still open and served.
        await connection.send(sync_ack=pb.SyncAck(kind=pb.SYNC_KIND_CONFIG, version=0))
        await connection.send(pb.ConnectRequest())
        assert (await connection.recv_until(body_is("error"))).error.reason == "MALFORMED_MESSAGE"
    finally:
        await connection.close()


async def test_heartbeat_records_fleet_state(devicehub, device_stub, tenant_id):
    device = await enrol_device(devicehub.stub, device_stub, tenant_id)
    connection = await connect(device_stub, device)
    try:
        await connection.send(heartbeat=pb.Heartbeat(
            device_time=now_pb(2.0), firmware_version="1.1.0", config_version=0, queue_depth=7,
            oldest_queued_at=now_pb(-60), health={"printer": "ok"}))

        async def recorded():
            got = await _device(devicehub, tenant_id, device.device_id)
            return got if got.queue_depth == 7 else None

        got = await eventually(recorded)
        assert got.firmware_version == "1.1.0"
        assert 1000 <= got.clock_offset_ms <= 3000
        assert got.online
    finally:
        await connection.close()


async def test_a_second_stream_replaces_the_first(devicehub, device_stub, tenant_id):
    device = await enrol_device(devicehub.stub, device_stub, tenant_id)
    first = await connect(device_stub, device)
    second = await connect(device_stub, device)
    try:
        closed = await first.closed()
        assert (closed.code, closed.reason) == (grpc.StatusCode.ABORTED, "STREAM_REPLACED")
        await asyncio.sleep(0.2)
        assert (await _device(devicehub, tenant_id, device.device_id)).online
        await second.send(pb.ConnectRequest())
        assert (await second.recv_until(body_is("error"))).error.reason == "MALFORMED_MESSAGE"
    finally:
        await first.close()
        await second.close()


async def test_decommissioning_closes_the_stream_and_refuses_reconnects(devicehub, device_stub, tenant_id):
    device = await enrol_device(devicehub.stub, device_stub, tenant_id)
    connection = await connect(device_stub, device)
    try:
        await devicehub.stub.DecommissionDevice(pb.DecommissionDeviceRequest(tenant_id=tenant_id,
                                                                             device_id=device.device_id))
        closed = await connection.closed()
        assert (closed.code, closed.reason) == (grpc.StatusCode.PERMISSION_DENIED, "DEVICE_DECOMMISSIONED")
    finally:
        await connection.close()
    assert await _handshake_refusal(device_stub, hello(device)) == (grpc.StatusCode.PERMISSION_DENIED,
                                                                    "DEVICE_DECOMMISSIONED")
    got = await _device(devicehub, tenant_id, device.device_id)
    assert not got.online and got.key_fingerprint


async def test_re_enrolment_ends_the_old_keys_stream(devicehub, device_stub, tenant_id):
    device = await enrol_device(devicehub.stub, device_stub, tenant_id)
    connection = await connect(device_stub, device)
    try:
        token = await devicehub.stub.CreateEnrolmentToken(pb.CreateEnrolmentTokenRequest(
            tenant_id=tenant_id, device_id=device.device_id))
        new_key = nacl.signing.SigningKey.generate()
        await device_stub.Enrol(pb.EnrolRequest(enrolment_token=token.enrolment_token,
                                                public_key=bytes(new_key.verify_key)))
        closed = await connection.closed()
        assert (closed.code, closed.reason) == (grpc.StatusCode.UNAUTHENTICATED, "DEVICE_KEY_REPLACED")
    finally:
        await connection.close()
    assert await _handshake_refusal(device_stub, hello(device), signature_by=device.signing_key,
                                    device=device) == (grpc.StatusCode.UNAUTHENTICATED, "CHALLENGE_FAILED")
    device.signing_key = new_key
    again = await connect(device_stub, device)
    await again.close()


async def test_authorisations_run_concurrently_and_answer_by_request_id(devicehub, device_stub, tenant_id):
    """Each authorisation runs in its own task: a slow one does not hold up a quick one, and a
    refusal is a StreamError naming its request (the transactions part is stubbed here)."""
    from runtime.errors import InvalidArgument

    backends = devicehub.app.hub.backends
    seen_devices = []

    async def authorize(device, msg):
        seen_devices.append(device.device_id)
        if msg.request_id == "bad":
            raise InvalidArgument("no presentation", reason="PRESENTATION_INVALID")
        await asyncio.sleep(1.0 if msg.request_id == "slow" else 0.0)
        return pb.AuthorizeResult(request_id=msg.request_id, approved=True, reason="APPROVED")

    original = backends.tx.authorize if backends.tx is not None else None

    class Stub:
        pass

    if backends.tx is None:
        backends.tx = Stub()
    backends.tx.authorize = authorize
    device = await enrol_device(devicehub.stub, device_stub, tenant_id)
    connection = await connect(device_stub, device)
    try:
        for request_id in ("slow", "quick", "bad"):
            await connection.send(authorize=pb.Authorize(request_id=request_id, purpose=pb.PURPOSE_PAY,
                                                         amount_fen=100))
        answers = []
        while len(answers) < 3:
            message = await connection.recv()
            if message.WhichOneof("body") == "authorize_result":
                answers.append(message.authorize_result.request_id)
            elif message.WhichOneof("body") == "error":
                assert (message.error.ref, message.error.reason) == ("bad", "PRESENTATION_INVALID")
                answers.append("bad")
        assert answers[-1] == "slow" and set(answers) == {"slow", "quick", "bad"}
        assert set(seen_devices) == {device.device_id}
    finally:
        await connection.close()
        if original is not None:
            backends.tx.authorize = original


async def test_a_device_change_reaches_its_open_stream(devicehub, device_stub, tenant_id):
    """Payments book to the merchant the registry names now, not the one at connect time."""
    device = await enrol_device(devicehub.stub, device_stub, tenant_id, location="north", scene_tags=["canteen"])
    connection = await connect(device_stub, device)
    try:
        merchant = str(uuid.uuid4())
        await devicehub.stub.UpdateDevice(pb.UpdateDeviceRequest(
            tenant_id=tenant_id, device_id=device.device_id, merchant_account_id=merchant, location="south",
            replace_scene_tags=True, scene_tags=["gym"]))
        session = devicehub.app.hub.sessions.get(uuid.UUID(device.device_id))
        assert session.context.merchant_account_id == merchant
        assert session.context.location == "south" and session.context.scene_tags == ("gym",)
    finally:
        await connection.close()


async def test_shutdown_ends_open_streams_at_once(start_devicehub, tenant_id):
    """SIGTERM: open streams end (UNAVAILABLE, the device reconnects elsewhere) instead of holding
    the drain for the whole grace period."""
    import time

    from onecard.devicehub.v1 import devicehub_pb2_grpc

    hub = await start_devicehub(shutdown_grace_s=10.0)
    device_stub = devicehub_pb2_grpc.DeviceServiceStub(hub.device_channel)
    device = await enrol_device(hub.stub, device_stub, tenant_id)
    connection = await connect(device_stub, device)
    try:
        started = time.monotonic()
        await hub.app.stop()
        assert time.monotonic() - started < 5.0
        closed = await connection.closed()
        assert (closed.code, closed.reason) == (grpc.StatusCode.UNAVAILABLE, "HUB_SHUTTING_DOWN")
    finally:
        await connection.close()
