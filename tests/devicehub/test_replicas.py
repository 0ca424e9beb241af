"""Two device hubs on one database and one NATS, as two replicas behind one address are: every
place where a hub must reach a device another replica holds, or act on what another replica did.

- sync pushes (a member frozen) reach the devices of both replicas (plain NATS subscriptions);
- a rollout created through one replica tells a device connected to the other;
- a decommission through one replica ends the device's stream on the other;
- a device that came back on the other replica stays online when its old stream ends;
- one device's uploads through both replicas at once settle each record once;
- the device client, given both hubs, turns to the other when its hub stops.

The whole mesh twice over, in processes, with a lunch rush: tests/replicas.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
from onecard_device.client import DeviceClient

from onecard.devicehub.v1 import devicehub_pb2 as pb
from onecard.devicehub.v1 import devicehub_pb2_grpc
from onecard.identity.v1 import identity_pb2 as ipb
from tests.devicehub.test_device_client import FUNDED_FEN, _cash_fen, _Campus, _eventually
from tests.devicehub.support import body_is, connect, enrol_device, eventually, is_sync
from tests.devicehub.test_offline import upload
from tests.devicehub.tx_support import add_member, campus, payment_record

PUSH_WITHIN_S = 5.0


def terminals(hub) -> devicehub_pb2_grpc.DeviceServiceStub:  # noqa: ANN001
    return devicehub_pb2_grpc.DeviceServiceStub(hub.device_channel)


async def online(hub, tenant_id: str, device_id: str) -> bool:  # noqa: ANN001
    got = await hub.stub.GetDevice(pb.GetDeviceRequest(tenant_id=tenant_id, device_id=device_id))
    return got.device.online


async def test_a_freeze_reaches_the_devices_of_both_replicas(start_devicehub, identity, tenant_id):
    hub_a, hub_b = await start_devicehub(), await start_devicehub()
    member = (await identity.stub.CreateMember(ipb.CreateMemberRequest(
        tenant_id=tenant_id, external_number="R1", name="Replica Rui"))).member.member_id
    device_a = await enrol_device(hub_a.stub, terminals(hub_a), tenant_id)
    device_b = await enrol_device(hub_a.stub, terminals(hub_a), tenant_id)
    on_a, on_b = await connect(terminals(hub_a), device_a), await connect(terminals(hub_b), device_b)
    try:
        for connection in (on_a, on_b):
            await connection.drain(0.3)
        await identity.stub.FreezeMember(ipb.FreezeMemberRequest(tenant_id=tenant_id, member_id=member, reason="x"))
        for connection in (on_a, on_b):
            pushed = (await connection.recv_until(
                lambda m: is_sync(pb.SYNC_KIND_MEMBER_BLOCKS)(m) and bool(m.sync.member_blocks), PUSH_WITHIN_S)).sync
            assert [(b.member_id, b.status) for b in pushed.member_blocks] == [(member, "frozen")]
    finally:
        await on_a.close()
        await on_b.close()


async def test_a_rollout_made_through_one_replica_tells_a_device_on_the_other(start_devicehub, tenant_id):
    hub_a, hub_b = await start_devicehub(), await start_devicehub()
    device = await enrol_device(hub_a.stub, terminals(hub_a), tenant_id, model="RR-1")
    connection = await connect(terminals(hub_b), device)
    try:
        await connection.drain(0.3)
        rollout = (await hub_a.stub.CreateRollout(pb.CreateRolloutRequest(
            tenant_id=tenant_id, idempotency_key=f"fw-{uuid.uuid4()}", target=pb.ROLLOUT_TARGET_FIRMWARE,
            version="2.0.0", kind=pb.DEVICE_KIND_POS, model="RR-1", stage_sizes=[1], success_threshold=1.0,
            error_threshold=1))).rollout
        command = (await connection.recv_until(body_is("update_command"), PUSH_WITHIN_S)).update_command
        assert (command.rollout_id, command.version) == (rollout.rollout_id, "2.0.0")
        # Told once, whichever replica told it.
        await connection.drain(0.5)
        assert sum(m.WhichOneof("body") == "update_command" for m in connection.history) == 1
    finally:
        await connection.close()


async def test_a_decommission_through_one_replica_ends_the_stream_on_the_other(start_devicehub, tenant_id):
    hub_a, hub_b = await start_devicehub(), await start_devicehub()
    device = await enrol_device(hub_a.stub, terminals(hub_a), tenant_id)
    connection = await connect(terminals(hub_b), device)
    try:
        await hub_a.stub.DecommissionDevice(pb.DecommissionDeviceRequest(
            tenant_id=tenant_id, device_id=device.device_id))
        ended = await connection.closed(PUSH_WITHIN_S)
        assert ended.reason == "DEVICE_DECOMMISSIONED"
    finally:
        await connection.close()


async def test_a_device_back_on_the_other_replica_stays_online_when_its_old_stream_ends(start_devicehub, tenant_id):
    hub_a, hub_b = await start_devicehub(), await start_devicehub()
    device = await enrol_device(hub_a.stub, terminals(hub_a), tenant_id)
    old = await connect(terminals(hub_a), device)
    new = None
    try:
        assert await online(hub_a, tenant_id, device.device_id)
        # The device gave up on replica A (a network break it noticed first) and came back on B;
        # A's stream ends afterwards.
        new = await connect(terminals(hub_b), device)
        await old.close()

        async def a_forgot_it() -> bool:
            return device.device_id not in {str(d) for d in (s.device_id for s in hub_a.app.hub.sessions.all())}

        await eventually(a_forgot_it)
        await asyncio.sleep(0.3)  # A's end of stream has run (offline would be written by now)
        assert await online(hub_a, tenant_id, device.device_id)
        assert await online(hub_b, tenant_id, device.device_id)
        # Its stream on B ending is the device's real end: offline.
        await new.close()

        async def offline() -> bool:
            return not await online(hub_b, tenant_id, device.device_id)

        await eventually(offline)
    finally:
        await old.close()
        if new is not None:
            await new.close()


async def test_one_devices_uploads_through_both_replicas_at_once_settle_each_record_once(
        start_devicehub, identity, codegen, ledger, policy, tenant_id):
    hub_a, hub_b = await start_devicehub(), await start_devicehub()
    c = await campus(identity=identity, ledger=ledger, policy=policy, tenant_id=tenant_id, any_hour=True)
    members = [await add_member(c, identity=identity, ledger=ledger, number=f"U{i}", codegen=codegen,
                                card_uid=f"0A{i:06d}") for i in range(5)]
    pos = await enrol_device(hub_a.stub, terminals(hub_a), tenant_id, merchant_account_id=c.merchant_id,
                             location="north-canteen", scene_tags=["canteen"])
    on_a = await connect(terminals(hub_a), pos)
    records = [payment_record(pos, sequence=s, member=members[s % 5], amount_fen=500 + s, by_card=s % 2 == 0)
               for s in range(1, 41)]
    # A device whose first stream looked dead to it while the hub still had it: the same upload on
    # both (a device never does this on purpose; a half-open connection and a retry come close).
    on_b = await connect(terminals(hub_b), pos, last_sequence=40)
    try:
        first, second = await asyncio.gather(upload(on_a, records), upload(on_b, list(reversed(records))))
        outcomes: dict[int, list[int]] = {}
        for result in (*first.results, *second.results):
            outcomes.setdefault(result.sequence, []).append(result.outcome)
        assert set(outcomes) == set(range(1, 41))
        for sequence, seen in outcomes.items():
            assert sorted(seen) == sorted([pb.RECORD_OUTCOME_BOOKED, pb.RECORD_OUTCOME_DUPLICATE]), (
                sequence, [(r.outcome, r.reason) for r in (*first.results, *second.results) if r.sequence == sequence])
    finally:
        await on_a.close()
        await on_b.close()


async def test_a_device_client_with_two_hubs_turns_to_the_other_when_its_hub_stops(
        start_devicehub, identity, codegen, ledger, policy, tenant_id, tmp_path):
    hub_a, hub_b = await start_devicehub(), await start_devicehub()
    campus = _Campus()
    await campus.seed(identity=identity, codegen=codegen, ledger=ledger, policy=policy, devicehub=hub_a,
                      tenant_id=tenant_id)
    settings = {"heartbeat_interval_s": 0.5, "reconnect_min_s": 0.05, "reconnect_max_s": 0.5, "durable": False}
    client = DeviceClient(target=[hub_a.device_target, hub_b.device_target], data_dir=tmp_path,
                          ca_pem=campus.registered.hub_ca_pem, **settings)
    await client.enrol(campus.registered.enrolment_token)
    await client.start()
    try:
        assert await client.wait_connected(10) and client.target == hub_a.device_target
        first = await client.pay(campus.code(), 300)
        assert first.approved and first.online
        # Hub A stops (SIGTERM's path: its streams end with HUB_SHUTTING_DOWN): the client dials B.
        await hub_a.app.stop()
        await _eventually(lambda: client.connected and client.target == hub_b.device_target,
                          what="the client on hub B")
        assert client.stats.failovers >= 1
        second = await client.pay(campus.code(), 400)
        assert second.approved and second.online
        assert await _cash_fen(ledger, tenant_id, campus.member_id) == FUNDED_FEN - 700
        got = await hub_b.stub.GetDevice(pb.GetDeviceRequest(tenant_id=tenant_id, device_id=client.device_id))
        assert got.device.online
    finally:
        await client.close()


def test_one_hub_or_a_list_names_the_hubs_to_dial(tmp_path):
    one = DeviceClient(target="127.0.0.1:50056", data_dir=tmp_path / "one", insecure=True)
    assert (one.targets, one.target) == (("127.0.0.1:50056",), "127.0.0.1:50056")
    listed = DeviceClient(target="10.0.0.5:50056, 10.0.0.6:50056", data_dir=tmp_path / "two", insecure=True)
    assert listed.targets == ("10.0.0.5:50056", "10.0.0.6:50056") and listed.target == "10.0.0.5:50056"
    with pytest.raises(ValueError):
        DeviceClient(target=" , ", data_dir=tmp_path / "none", insecure=True)
