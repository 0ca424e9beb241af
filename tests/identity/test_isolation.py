"""Tenant isolation at the gRPC level: another tenant's member is simply not there."""

import grpc

from onecard.identity.v1 import identity_pb2 as pb
from tests.identity.support import create_member, create_tenant, feed, get_member, refused


async def test_every_member_call_with_another_tenants_id_is_not_found_and_changes_nothing(identity) -> None:
    stub = identity.stub
    tenant_a = await create_tenant(stub, name="A")
    tenant_b = await create_tenant(stub, name="B")
    member = await create_member(stub, tenant_a, "S1")
    await stub.BindCard(pb.BindCardRequest(tenant_id=tenant_a, member_id=member.member_id, card_uid="0A0A0A0A"))
    member = await get_member(stub, tenant_a, member.member_id)
    m = member.member_id
    calls = [
        stub.GetMember(pb.GetMemberRequest(tenant_id=tenant_b, member_id=m)),
        stub.UpdateMember(pb.UpdateMemberRequest(tenant_id=tenant_b, member_id=m, name="Mallory")),
        stub.FreezeMember(pb.FreezeMemberRequest(tenant_id=tenant_b, member_id=m)),
        stub.UnfreezeMember(pb.UnfreezeMemberRequest(tenant_id=tenant_b, member_id=m)),
        stub.MarkMemberLeft(pb.MarkMemberLeftRequest(tenant_id=tenant_b, member_id=m)),
        stub.BindCard(pb.BindCardRequest(tenant_id=tenant_b, member_id=m, card_uid="0B0B0B0B")),
        stub.ReportCardLost(pb.ReportCardLostRequest(tenant_id=tenant_b, member_id=m, card_uid="0A0A0A0A")),
        stub.SetFaceEnrolment(pb.SetFaceEnrolmentRequest(tenant_id=tenant_b, member_id=m, face_enrolment_ref="f")),
    ]
    for call in calls:
        assert await refused(call) == (grpc.StatusCode.NOT_FOUND, "MEMBER_NOT_FOUND")
    assert await get_member(stub, tenant_a, m) == member
    assert await feed(stub, tenant_b) == []


async def test_lists_show_only_the_tenants_own_rows(identity) -> None:
    stub = identity.stub
    tenant_a = await create_tenant(stub, name="A")
    tenant_b = await create_tenant(stub, name="B")
    member = await create_member(stub, tenant_a, "S1", name="Alice")
    await stub.BindCard(pb.BindCardRequest(tenant_id=tenant_a, member_id=member.member_id, card_uid="0A0A0A0A"))
    await stub.ReportCardLost(
        pb.ReportCardLostRequest(tenant_id=tenant_a, member_id=member.member_id, card_uid="0A0A0A0A")
    )
    assert list((await stub.SearchMembers(pb.SearchMembersRequest(tenant_id=tenant_b, query="Alice"))).members) == []
    assert list((await stub.ListCardBlacklist(pb.ListCardBlacklistRequest(tenant_id=tenant_b))).cards) == []
    assert await feed(stub, tenant_b) == []
    assert len(await feed(stub, tenant_a)) == 3


async def test_numbers_and_card_uids_are_per_tenant(identity) -> None:
    stub = identity.stub
    tenant_a = await create_tenant(stub, name="A")
    tenant_b = await create_tenant(stub, name="B")
    in_a = await create_member(stub, tenant_a, "S1")
    in_b = await create_member(stub, tenant_b, "S1")
    assert in_a.member_id != in_b.member_id
    await stub.BindCard(pb.BindCardRequest(tenant_id=tenant_a, member_id=in_a.member_id, card_uid="0C0C0C0C"))
    await stub.ReportCardLost(
        pb.ReportCardLostRequest(tenant_id=tenant_a, member_id=in_a.member_id, card_uid="0C0C0C0C")
    )
    bound_in_b = (
        await stub.BindCard(pb.BindCardRequest(tenant_id=tenant_b, member_id=in_b.member_id, card_uid="0C0C0C0C"))
    ).member
    assert bound_in_b.cards[0].status == pb.CARD_STATUS_ACTIVE
