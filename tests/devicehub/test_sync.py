"""Sync to devices: what a connected device hears within seconds of the event (a lost card, a
frozen member, a revoked credential, a published rule set, its own config), and what a
reconnecting device gets given the versions it holds (only what changed)."""

from __future__ import annotations

import json
import time

import nacl.signing
from onecard_policy.bundle import open_bundle

from onecard.codegen.v1 import codegen_pb2 as cpb
from onecard.devicehub.v1 import devicehub_pb2 as pb
from onecard.identity.v1 import identity_pb2 as ipb
from tests.devicehub.support import connect, enrol_device, is_sync
from tests.policy_service.support import publish, university

PUSH_WITHIN_S = 3.0


async def _member(identity, tenant_id: str, number: str) -> str:
    created = await identity.stub.CreateMember(ipb.CreateMemberRequest(tenant_id=tenant_id, external_number=number,
                                                                       name=f"Member {number}"))
    return created.member.member_id


async def _credential(codegen, tenant_id: str, member_id: str) -> cpb.IssueCredentialResponse:
    key = nacl.signing.SigningKey.generate()
    return await codegen.stub.IssueCredential(cpb.IssueCredentialRequest(
        tenant_id=tenant_id, member_id=member_id, holder_public_key=bytes(key.verify_key),
        purposes=[cpb.PURPOSE_PAY]))


def _versions(updates: list[pb.ConnectResponse]) -> dict[int, int]:
    return {m.sync.kind: m.sync.version for m in updates if m.WhichOneof("body") == "sync"}


async def test_changes_reach_a_connected_device_within_seconds(devicehub, device_stub, identity, codegen, tenant_id):
    alice = await _member(identity, tenant_id, "S1001")
    bob = await _member(identity, tenant_id, "S1002")
    await identity.stub.BindCard(ipb.BindCardRequest(tenant_id=tenant_id, member_id=alice, card_uid="04A1B2C3D4"))
    first = await _credential(codegen, tenant_id, bob)
    device = await enrol_device(devicehub.stub, device_stub, tenant_id)
    connection = await connect(device_stub, device)
    try:
        initial = await connection.drain(0.5)
        kinds = {m.sync.kind: m.sync for m in initial if m.WhichOneof("body") == "sync"}
        trust = kinds[pb.SYNC_KIND_TRUST_LIST]
        assert trust.full and trust.from_version == 0 and len(trust.trust_keys) == 1
        assert trust.trust_keys[0].status == "signing" and len(trust.trust_keys[0].public_key) == 32
        blocks = kinds[pb.SYNC_KIND_MEMBER_BLOCKS]
        assert blocks.full and blocks.version > 0 and not blocks.member_blocks
        assert pb.SYNC_KIND_CARD_BLACKLIST not in kinds and pb.SYNC_KIND_REVOCATIONS not in kinds
        assert pb.SYNC_KIND_POLICY_BUNDLE not in kinds and pb.SYNC_KIND_CONFIG not in kinds

        started = time.monotonic()
        await identity.stub.ReportCardLost(ipb.ReportCardLostRequest(tenant_id=tenant_id, member_id=alice,
                                                                     card_uid="04A1B2C3D4"))
        lost = (await connection.recv_until(is_sync(pb.SYNC_KIND_CARD_BLACKLIST), PUSH_WITHIN_S)).sync
        assert [(c.card_uid, c.member_id) for c in lost.cards] == [("04A1B2C3D4", alice)]
        assert lost.full and lost.version > 0
        assert time.monotonic() - started < PUSH_WITHIN_S

        started = time.monotonic()
        await identity.stub.FreezeMember(ipb.FreezeMemberRequest(tenant_id=tenant_id, member_id=bob, reason="test"))
        # The block and (codegen revokes a frozen member's credentials) the revocation, in any order.
        seen: dict[int, pb.SyncUpdate] = {}

        def wanted(m: pb.ConnectResponse) -> bool:
            if is_sync(pb.SYNC_KIND_MEMBER_BLOCKS)(m) and m.sync.member_blocks:
                seen[m.sync.kind] = m.sync
            elif is_sync(pb.SYNC_KIND_REVOCATIONS)(m):
                seen[m.sync.kind] = m.sync
            return len(seen) == 2

        await connection.recv_until(wanted, PUSH_WITHIN_S)
        frozen, revoked = seen[pb.SYNC_KIND_MEMBER_BLOCKS], seen[pb.SYNC_KIND_REVOCATIONS]
        assert not frozen.full and frozen.from_version == blocks.version and frozen.version > blocks.version
        assert [(b.member_id, b.status) for b in frozen.member_blocks] == [(bob, "frozen")]
        assert revoked.full and first.credential.credential_id in {r.credential_id for r in revoked.revocations}
        assert time.monotonic() - started < PUSH_WITHIN_S

        await identity.stub.UnfreezeMember(ipb.UnfreezeMemberRequest(tenant_id=tenant_id, member_id=bob))
        unfrozen = (await connection.recv_until(
            lambda m: is_sync(pb.SYNC_KIND_MEMBER_BLOCKS)(m) and bool(m.sync.member_blocks), PUSH_WITHIN_S)).sync
        assert [(b.member_id, b.status) for b in unfrozen.member_blocks] == [(bob, "active")]
        assert unfrozen.from_version == frozen.version

        await codegen.stub.RotateIssuerKey(cpb.RotateIssuerKeyRequest(tenant_id=tenant_id))
        rotated = (await connection.recv_until(is_sync(pb.SYNC_KIND_TRUST_LIST), PUSH_WITHIN_S)).sync
        assert not rotated.full and rotated.from_version == trust.version
        assert {k.status for k in rotated.trust_keys} == {"signing", "verifying"}
    finally:
        await connection.close()


async def test_a_published_rule_set_and_a_config_change_reach_the_device(devicehub, device_stub, policy, tenant_id):
    device = await enrol_device(devicehub.stub, device_stub, tenant_id)
    connection = await connect(device_stub, device)
    try:
        await connection.drain(0.3)
        version = await publish(policy.stub, tenant_id, university())
        bundle = (await connection.recv_until(is_sync(pb.SYNC_KIND_POLICY_BUNDLE), PUSH_WITHIN_S)).sync
        assert bundle.version == version and bundle.full
        # The welcome carried the keys that open it (made before the first bundle).
        keys = {k.key_id: nacl.signing.VerifyKey(k.public_key) for k in connection.welcome.bundle_keys}
        assert keys
        _rules, opened_version = open_bundle(bundle.document, trusted_keys=keys, tenant_id=tenant_id)
        assert opened_version == version

        await devicehub.stub.UpdateDevice(pb.UpdateDeviceRequest(tenant_id=tenant_id, device_id=device.device_id,
                                                                 config_json='{"offline_cap_fen": 5000}'))
        config = (await connection.recv_until(is_sync(pb.SYNC_KIND_CONFIG), PUSH_WITHIN_S)).sync
        assert config.version == 1 and config.full and config.document == b'{"offline_cap_fen":5000}'
        await connection.send(sync_ack=pb.SyncAck(kind=pb.SYNC_KIND_CONFIG, version=1))
        await connection.send(heartbeat=pb.Heartbeat(config_version=1))
    finally:
        await connection.close()


async def test_a_reconnect_gets_only_what_changed(devicehub, device_stub, identity, codegen, policy, tenant_id):
    alice = await _member(identity, tenant_id, "S2001")
    await identity.stub.BindCard(ipb.BindCardRequest(tenant_id=tenant_id, member_id=alice, card_uid="04FF000001"))
    await identity.stub.ReportCardLost(ipb.ReportCardLostRequest(tenant_id=tenant_id, member_id=alice,
                                                                 card_uid="04FF000001"))
    await _credential(codegen, tenant_id, alice)
    await publish(policy.stub, tenant_id, university())
    device = await enrol_device(devicehub.stub, device_stub, tenant_id, config_json='{"a": 1}')
    connection = await connect(device_stub, device)
    initial = await connection.drain(0.5)
    await connection.close()
    held = _versions(initial)
    assert set(held) == {pb.SYNC_KIND_TRUST_LIST, pb.SYNC_KIND_CARD_BLACKLIST, pb.SYNC_KIND_MEMBER_BLOCKS,
                         pb.SYNC_KIND_POLICY_BUNDLE, pb.SYNC_KIND_CONFIG}

    # Nothing changed: nothing sent.
    same = await connect(device_stub, device, versions=held)
    assert [m for m in await same.drain(0.5) if m.WhichOneof("body") == "sync"] == []
    await same.close()

    # One card lost while the device was away: only that.
    await identity.stub.BindCard(ipb.BindCardRequest(tenant_id=tenant_id, member_id=alice, card_uid="04FF000002"))
    await identity.stub.ReportCardLost(ipb.ReportCardLostRequest(tenant_id=tenant_id, member_id=alice,
                                                                 card_uid="04FF000002"))
    back = await connect(device_stub, device, versions=held)
    try:
        # The loss reaches the hub as an event: on a busy machine it may land after the reconnect, and
        # is pushed then. Wait for the first update, then for anything more.
        first = (await back.recv_until(lambda m: m.WhichOneof("body") == "sync")).sync
        updates = [first, *(m.sync for m in await back.drain(0.5) if m.WhichOneof("body") == "sync")]
        assert [u.kind for u in updates] == [pb.SYNC_KIND_CARD_BLACKLIST]
        assert not updates[0].full and updates[0].from_version == held[pb.SYNC_KIND_CARD_BLACKLIST]
        assert [c.card_uid for c in updates[0].cards] == ["04FF000002"]
    finally:
        await back.close()


async def test_blocked_members_and_access_rules_reach_gates(devicehub, device_stub, identity, tenant_id):
    frozen = await _member(identity, tenant_id, "S3001")
    left = await _member(identity, tenant_id, "S3002")
    await _member(identity, tenant_id, "S3003")
    await identity.stub.FreezeMember(ipb.FreezeMemberRequest(tenant_id=tenant_id, member_id=frozen, reason="x"))
    await identity.stub.MarkMemberLeft(ipb.MarkMemberLeftRequest(tenant_id=tenant_id, member_id=left))
    gate = await enrol_device(devicehub.stub, device_stub, tenant_id, kind=pb.DEVICE_KIND_GATE, location="dorm-3")
    connection = await connect(device_stub, gate)
    try:
        # A device holding nothing gets the whole list of blocks, and no "active" entries.
        blocks = (await connection.recv_until(is_sync(pb.SYNC_KIND_MEMBER_BLOCKS))).sync
        assert blocks.full and {(b.member_id, b.status) for b in blocks.member_blocks} == {
            (frozen, "frozen"), (left, "left")}

        rules = {"time_zone": "Asia/Shanghai", "rules": [
            {"name": "dorm-3-residents", "places": ["dorm-3"], "purposes": ["access"],
             "groups": {"role": ["student"]}, "from": "06:00", "to": "23:30"}]}
        set_rules = await devicehub.stub.SetAccessRules(pb.SetAccessRulesRequest(tenant_id=tenant_id,
                                                                                 rules_json=json.dumps(rules)))
        update = (await connection.recv_until(is_sync(pb.SYNC_KIND_ACCESS_RULES), PUSH_WITHIN_S)).sync
        assert update.full and update.version == set_rules.version
        assert json.loads(update.document) == rules
    finally:
        await connection.close()


async def test_a_missed_event_is_made_good_by_the_periodic_resync(start_devicehub, identity, tenant_id):
    import uuid

    from onecard.devicehub.v1 import devicehub_pb2_grpc

    hub = await start_devicehub(sync_resync_interval_s=0.3)
    device_stub = devicehub_pb2_grpc.DeviceServiceStub(hub.device_channel)
    alice = await _member(identity, tenant_id, "S4001")
    await identity.stub.BindCard(ipb.BindCardRequest(tenant_id=tenant_id, member_id=alice, card_uid="04AB000001"))
    device = await enrol_device(hub.stub, device_stub, tenant_id)
    connection = await connect(device_stub, device)
    try:
        await connection.drain(0.4)
        session = hub.app.hub.sessions.get(uuid.UUID(device.device_id))
        held = dict(session.versions)
        await identity.stub.ReportCardLost(ipb.ReportCardLostRequest(tenant_id=tenant_id, member_id=alice,
                                                                     card_uid="04AB000001"))
        update = (await connection.recv_until(is_sync(pb.SYNC_KIND_CARD_BLACKLIST), 5.0)).sync
        assert update.from_version == held.get(pb.SYNC_KIND_CARD_BLACKLIST, 0)
        # And with the version forgotten (a lost push), the resync sends it again, whole.
        session.versions[pb.SYNC_KIND_CARD_BLACKLIST] = 0
        again = (await connection.recv_until(is_sync(pb.SYNC_KIND_CARD_BLACKLIST), 3.0)).sync
        assert again.full and [c.card_uid for c in again.cards] == ["04AB000001"]
    finally:
        await connection.close()
