"""Every change reaches NATS JetStream as exactly one event, through the outbox."""

import json

import nats

from onecard.identity.v1 import identity_pb2 as pb
from runtime.events import MSG_ID_HEADER
from tests.identity.support import create_member, csv_file, run_import
from tests.streams import read_exactly


async def events(nats_url: str, *, count: int) -> list[nats.aio.msg.Msg]:
    return await read_exactly(nats_url, stream="IDENTITY", subjects="identity.>", count=count)


async def test_each_change_publishes_one_event_with_a_message_id(identity, tenant_id: str, nats_url: str) -> None:
    stub = identity.stub
    member = await create_member(stub, tenant_id, "S1", name="Li Lei")
    m = member.member_id
    await stub.UpdateMember(pb.UpdateMemberRequest(tenant_id=tenant_id, member_id=m, name="Li Lei Jr"))
    await stub.FreezeMember(pb.FreezeMemberRequest(tenant_id=tenant_id, member_id=m, reason="lost phone"))
    await stub.FreezeMember(pb.FreezeMemberRequest(tenant_id=tenant_id, member_id=m))
    await stub.UnfreezeMember(pb.UnfreezeMemberRequest(tenant_id=tenant_id, member_id=m))
    await stub.BindCard(pb.BindCardRequest(tenant_id=tenant_id, member_id=m, card_uid="C0FFEE01"))
    await stub.BindCard(pb.BindCardRequest(tenant_id=tenant_id, member_id=m, card_uid="C0FFEE01"))
    await stub.ReportCardLost(pb.ReportCardLostRequest(tenant_id=tenant_id, member_id=m, card_uid="C0FFEE01"))
    await stub.SetFaceEnrolment(
        pb.SetFaceEnrolmentRequest(tenant_id=tenant_id, member_id=m, face_enrolment_ref="face-9")
    )
    await stub.SetFaceEnrolment(pb.SetFaceEnrolmentRequest(tenant_id=tenant_id, member_id=m, face_enrolment_ref=""))
    await stub.MarkMemberLeft(pb.MarkMemberLeftRequest(tenant_id=tenant_id, member_id=m))
    received = await events(nats_url, count=10)
    assert [msg.subject for msg in received] == [
        "identity.tenant.created",
        "identity.member.created",
        "identity.member.updated",
        "identity.member.frozen",
        "identity.member.unfrozen",
        "identity.card.bound",
        "identity.card.lost",
        "identity.face.enrolled",
        "identity.face.cleared",
        "identity.member.left",
    ]
    bodies = [json.loads(msg.data) for msg in received]
    assert len({msg.headers[MSG_ID_HEADER] for msg in received}) == 10
    assert all(msg.headers[MSG_ID_HEADER] == body["event_id"] for msg, body in zip(received, bodies, strict=True))
    for body in bodies[1:]:
        assert body["tenant_id"] == tenant_id
        assert {"tenant_id", "member_id", "external_number", "status", "version"} <= set(body["data"])
        assert (body["data"]["member_id"], body["data"]["external_number"]) == (m, "S1")
        assert "Li Lei" not in json.dumps(body)
    by_subject = {msg.subject: body["data"] for msg, body in zip(received, bodies, strict=True)}
    assert by_subject["identity.card.lost"]["card_uid"] == "C0FFEE01"
    assert by_subject["identity.member.frozen"]["status"] == "frozen"
    assert by_subject["identity.member.frozen"]["reason"] == "lost phone"
    assert by_subject["identity.member.left"]["status"] == "left"
    assert [body["data"]["version"] for body in bodies[1:]] == list(range(1, 10))


async def test_import_publishes_one_event_per_change(identity, tenant_id: str, nats_url: str) -> None:
    data = csv_file("external_number,name,card_uid", "S1,A,0A000001", "S2,B,0A000002", "S3,C,")
    record = await run_import(identity.stub, tenant_id, data)
    assert record.rows_created == 3
    received = await events(nats_url, count=6)
    assert sorted(msg.subject for msg in received[1:]) == [
        "identity.card.bound",
        "identity.card.bound",
        "identity.member.created",
        "identity.member.created",
        "identity.member.created",
    ]
    await run_import(identity.stub, tenant_id, data)
    assert len(await events(nats_url, count=6)) == 6


async def test_grants_publish_events_for_caches_to_drop(identity, tenant_id: str, nats_url: str) -> None:
    created = await identity.stub.CreateApiClient(
        pb.CreateApiClientRequest(
            name="bank", scopes=["topup"], grants=[pb.TenantGrant(tenant_id=tenant_id, scopes=["topup"])]
        )
    )
    client_id = created.client.client_id
    await identity.stub.RevokeTenantAccess(pb.RevokeTenantAccessRequest(tenant_id=tenant_id, client_id=client_id))
    received = await events(nats_url, count=3)
    assert [msg.subject for msg in received[1:]] == ["identity.api_client.granted", "identity.api_client.revoked"]
    assert created.client_secret not in str([msg.data for msg in received])
    granted = json.loads(received[1].data)["data"]
    assert granted.pop("grant_version") > 0
    assert granted == {"tenant_id": tenant_id, "client_id": client_id, "scopes": ["topup"]}
    assert json.loads(received[2].data)["data"] == {"tenant_id": tenant_id, "client_id": client_id,
                                                    "client_revoked": False}
