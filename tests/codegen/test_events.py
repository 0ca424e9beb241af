"""identity's events reach codegen (freeze and departure revoke, a lost card does not), and
codegen's own changes reach the CODEGEN stream through its outbox."""

from __future__ import annotations

import json

import nats

from onecard.codegen.v1 import codegen_pb2 as pb
from onecard.identity.v1 import identity_pb2 as ipb
from runtime.events import MSG_ID_HEADER
from tests.codegen.support import eventually, issue, revocations
from tests.identity.support import create_member
from tests.streams import read_exactly


async def test_freezing_a_member_in_identity_revokes_their_credentials_end_to_end(
        codegen, identity, tenant_id, member_id):
    issued = [await issue(codegen.stub, tenant_id, member_id) for _ in range(2)]
    bystander = await create_member(identity.stub, tenant_id, "S3003")
    await issue(codegen.stub, tenant_id, bystander.member_id)
    await identity.stub.FreezeMember(ipb.FreezeMemberRequest(tenant_id=tenant_id, member_id=member_id,
                                                             reason="lost phone"))

    async def revoked() -> list[pb.RevocationEntry] | None:
        entries = list((await revocations(codegen.stub, tenant_id)).entries)
        return entries if len(entries) >= 2 else None

    entries = await eventually(revoked, what="revocations after the freeze")
    assert sorted(e.credential_id for e in entries) == sorted(i.credential.credential_id for i in issued)
    assert {e.reason for e in entries} == {"member_frozen"}
    assert {e.member_id for e in entries} == {member_id}


async def test_a_member_who_left_is_revoked_and_a_lost_card_revokes_nothing(codegen, identity, tenant_id, member_id):
    phone = await issue(codegen.stub, tenant_id, member_id)
    await identity.stub.BindCard(ipb.BindCardRequest(tenant_id=tenant_id, member_id=member_id, card_uid="0A0B0C0D"))
    await identity.stub.ReportCardLost(ipb.ReportCardLostRequest(tenant_id=tenant_id, member_id=member_id,
                                                                 card_uid="0A0B0C0D"))
    leaver = await create_member(identity.stub, tenant_id, "S4004")
    leaving = await issue(codegen.stub, tenant_id, leaver.member_id)
    # The departure comes after the card loss in identity's stream, so once it is applied the
    # card loss has been seen too: the phone's credential must still stand.
    await identity.stub.MarkMemberLeft(ipb.MarkMemberLeftRequest(tenant_id=tenant_id, member_id=leaver.member_id))

    async def revoked() -> list[pb.RevocationEntry] | None:
        entries = list((await revocations(codegen.stub, tenant_id)).entries)
        return entries or None

    entries = await eventually(revoked, what="the departure's revocation")
    assert [(e.credential_id, e.reason) for e in entries] == [(leaving.credential.credential_id, "member_left")]
    assert phone.credential.credential_id not in {e.credential_id for e in entries}
    # And the phone still gets new credentials.
    await issue(codegen.stub, tenant_id, member_id)


async def test_a_redelivered_freeze_revokes_nothing_twice(codegen, identity, tenant_id, member_id):
    await issue(codegen.stub, tenant_id, member_id)
    await identity.stub.FreezeMember(ipb.FreezeMemberRequest(tenant_id=tenant_id, member_id=member_id))
    await eventually(lambda: _entries(codegen, tenant_id), what="the freeze's revocation")
    await identity.stub.UnfreezeMember(ipb.UnfreezeMemberRequest(tenant_id=tenant_id, member_id=member_id))
    fresh = await eventually(lambda: _issue_when_allowed(codegen, tenant_id, member_id), what="issue after unfreeze")
    await identity.stub.FreezeMember(ipb.FreezeMemberRequest(tenant_id=tenant_id, member_id=member_id))

    async def second() -> list[pb.RevocationEntry] | None:
        entries = await _entries(codegen, tenant_id)
        return entries if entries and len(entries) == 2 else None

    entries = await eventually(second, what="the second freeze's revocation")
    assert entries[1].credential_id == fresh.credential.credential_id


async def _entries(codegen, tenant_id):
    return list((await revocations(codegen.stub, tenant_id)).entries) or None


async def _issue_when_allowed(codegen, tenant_id, member_id):
    import grpc
    try:
        return await issue(codegen.stub, tenant_id, member_id)
    except grpc.aio.AioRpcError:
        return None


async def codegen_events(nats_url: str, *, count: int) -> list[nats.aio.msg.Msg]:
    return await read_exactly(nats_url, stream="CODEGEN", subjects="codegen.>", count=count)


async def test_issue_revoke_and_key_changes_publish_events_without_secrets(codegen, tenant_id, member_id, nats_url):
    issued = await issue(codegen.stub, tenant_id, member_id)
    await codegen.stub.RevokeCredential(pb.RevokeCredentialRequest(
        tenant_id=tenant_id, credential_id=issued.credential.credential_id))
    await codegen.stub.RotateIssuerKey(pb.RotateIssuerKeyRequest(tenant_id=tenant_id))
    received = await codegen_events(nats_url, count=4)
    assert [m.subject for m in received] == [
        "codegen.trust_list.changed", "codegen.credential.issued", "codegen.credential.revoked",
        "codegen.trust_list.changed",
    ]
    bodies = [json.loads(m.data) for m in received]
    assert all(m.headers[MSG_ID_HEADER] == b["event_id"] for m, b in zip(received, bodies, strict=True))
    assert all(b["tenant_id"] == tenant_id for b in bodies)
    assert bodies[0]["data"]["version"] == 1 and bodies[3]["data"]["version"] == 2
    assert [k["status"] for k in bodies[3]["data"]["keys"]] == ["signing", "verifying"]
    assert bodies[1]["data"]["credential_id"] == issued.credential.credential_id
    assert bodies[2]["data"]["version"] == 1
    assert issued.credential_base64 not in str([m.data for m in received])
