"""Freeze, unfreeze and leave: the state rules, and which calls are harmless repeats."""

import grpc

from onecard.identity.v1 import identity_pb2 as pb
from tests.identity.support import create_member, feed, refused


async def freeze(stub, tenant_id: str, member_id: str, reason: str = "lost phone") -> pb.Member:  # noqa: ANN001
    return (
        await stub.FreezeMember(pb.FreezeMemberRequest(tenant_id=tenant_id, member_id=member_id, reason=reason))
    ).member


async def unfreeze(stub, tenant_id: str, member_id: str) -> pb.Member:  # noqa: ANN001
    return (await stub.UnfreezeMember(pb.UnfreezeMemberRequest(tenant_id=tenant_id, member_id=member_id))).member


async def leave(stub, tenant_id: str, member_id: str) -> pb.Member:  # noqa: ANN001
    return (await stub.MarkMemberLeft(pb.MarkMemberLeftRequest(tenant_id=tenant_id, member_id=member_id))).member


async def test_freeze_then_unfreeze_moves_status_and_bumps_version(identity, tenant_id: str) -> None:
    member = await create_member(identity.stub, tenant_id, "S1")
    frozen = await freeze(identity.stub, tenant_id, member.member_id)
    assert (frozen.status, frozen.version) == (pb.MEMBER_STATUS_FROZEN, 2)
    active = await unfreeze(identity.stub, tenant_id, member.member_id)
    assert (active.status, active.version) == (pb.MEMBER_STATUS_ACTIVE, 3)


async def test_freezing_a_frozen_member_is_a_no_op(identity, tenant_id: str) -> None:
    member = await create_member(identity.stub, tenant_id, "S1")
    frozen = await freeze(identity.stub, tenant_id, member.member_id)
    again = await freeze(identity.stub, tenant_id, member.member_id, reason="another reason")
    assert again == frozen
    assert await unfreeze(identity.stub, tenant_id, member.member_id) != frozen
    active = await unfreeze(identity.stub, tenant_id, member.member_id)
    assert (active.status, active.version) == (pb.MEMBER_STATUS_ACTIVE, 3)
    assert [c.kind for c in await feed(identity.stub, tenant_id)] == [
        pb.CHANGE_KIND_MEMBER_CREATED,
        pb.CHANGE_KIND_MEMBER_FROZEN,
        pb.CHANGE_KIND_MEMBER_UNFROZEN,
    ]


async def test_member_who_left_cannot_be_frozen_unfrozen_or_edited(identity, tenant_id: str) -> None:
    stub = identity.stub
    member = await create_member(stub, tenant_id, "S1")
    gone = await leave(stub, tenant_id, member.member_id)
    assert (gone.status, gone.version) == (pb.MEMBER_STATUS_LEFT, 2)
    left_refusal = (grpc.StatusCode.FAILED_PRECONDITION, "MEMBER_LEFT")
    assert await refused(freeze(stub, tenant_id, member.member_id)) == left_refusal
    assert await refused(unfreeze(stub, tenant_id, member.member_id)) == left_refusal
    assert (
        await refused(
            stub.UpdateMember(pb.UpdateMemberRequest(tenant_id=tenant_id, member_id=member.member_id, name="Back"))
        )
        == left_refusal
    )
    assert (
        await refused(
            stub.BindCard(pb.BindCardRequest(tenant_id=tenant_id, member_id=member.member_id, card_uid="04A1B2C3"))
        )
        == left_refusal
    )
    assert await leave(stub, tenant_id, member.member_id) == gone
    assert len(await feed(stub, tenant_id)) == 2


async def test_frozen_member_can_leave(identity, tenant_id: str) -> None:
    member = await create_member(identity.stub, tenant_id, "S1")
    await freeze(identity.stub, tenant_id, member.member_id)
    gone = await leave(identity.stub, tenant_id, member.member_id)
    assert (gone.status, gone.version) == (pb.MEMBER_STATUS_LEFT, 3)


async def test_freeze_reason_is_validated(identity, tenant_id: str) -> None:
    member = await create_member(identity.stub, tenant_id, "S1")
    assert await refused(freeze(identity.stub, tenant_id, member.member_id, reason="r" * 201)) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "FREEZE_REASON_INVALID",
    )
