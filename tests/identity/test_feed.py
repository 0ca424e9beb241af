"""The directory change feed: one entry per change, in order, pulled by an opaque cursor."""

import grpc

from onecard.identity.v1 import identity_pb2 as pb
from tests.identity.support import create_member, refused


async def changes(stub, tenant_id: str, cursor: str = "", page_size: int = 0) -> pb.ListDirectoryChangesResponse:  # noqa: ANN001
    return await stub.ListDirectoryChanges(
        pb.ListDirectoryChangesRequest(tenant_id=tenant_id, cursor=cursor, page_size=page_size)
    )


async def test_every_change_is_in_the_feed_in_order_with_the_member_after_it(identity, tenant_id: str) -> None:
    stub = identity.stub
    member = await create_member(stub, tenant_id, "S1")
    m = member.member_id
    await stub.UpdateMember(pb.UpdateMemberRequest(tenant_id=tenant_id, member_id=m, name="Renamed"))
    await stub.FreezeMember(pb.FreezeMemberRequest(tenant_id=tenant_id, member_id=m))
    await stub.UnfreezeMember(pb.UnfreezeMemberRequest(tenant_id=tenant_id, member_id=m))
    await stub.BindCard(pb.BindCardRequest(tenant_id=tenant_id, member_id=m, card_uid="F00D0001"))
    await stub.ReportCardLost(pb.ReportCardLostRequest(tenant_id=tenant_id, member_id=m, card_uid="F00D0001"))
    await stub.SetFaceEnrolment(
        pb.SetFaceEnrolmentRequest(tenant_id=tenant_id, member_id=m, face_enrolment_ref="face-1")
    )
    last = (await stub.MarkMemberLeft(pb.MarkMemberLeftRequest(tenant_id=tenant_id, member_id=m))).member
    feed = (await changes(stub, tenant_id)).changes
    assert [c.kind for c in feed] == [
        pb.CHANGE_KIND_MEMBER_CREATED,
        pb.CHANGE_KIND_MEMBER_UPDATED,
        pb.CHANGE_KIND_MEMBER_FROZEN,
        pb.CHANGE_KIND_MEMBER_UNFROZEN,
        pb.CHANGE_KIND_CARD_BOUND,
        pb.CHANGE_KIND_CARD_LOST,
        pb.CHANGE_KIND_FACE_ENROLLED,
        pb.CHANGE_KIND_MEMBER_LEFT,
    ]
    assert [c.sequence for c in feed] == list(range(1, 9))
    assert [c.member.version for c in feed] == list(range(1, 9))
    assert {c.member_id for c in feed} == {m}
    assert feed[1].member.name == "Renamed" and feed[2].member.status == pb.MEMBER_STATUS_FROZEN
    assert feed[-1].member == last
    assert feed[-1].changed_at == last.updated_at


async def test_feed_pages_by_cursor_and_the_cursor_stays_when_nothing_is_new(identity, tenant_id: str) -> None:
    stub = identity.stub
    for i in range(5):
        await create_member(stub, tenant_id, f"S{i}")
    first = await changes(stub, tenant_id, page_size=2)
    second = await changes(stub, tenant_id, cursor=first.next_cursor, page_size=2)
    third = await changes(stub, tenant_id, cursor=second.next_cursor, page_size=2)
    assert [c.sequence for c in (*first.changes, *second.changes, *third.changes)] == [1, 2, 3, 4, 5]
    idle = await changes(stub, tenant_id, cursor=third.next_cursor)
    assert (list(idle.changes), idle.next_cursor) == ([], third.next_cursor)
    await create_member(stub, tenant_id, "S9")
    fresh = await changes(stub, tenant_id, cursor=third.next_cursor)
    assert [c.member.external_number for c in fresh.changes] == ["S9"]


async def test_empty_feed_answers_the_empty_cursor(identity, tenant_id: str) -> None:
    empty = await changes(identity.stub, tenant_id)
    assert (list(empty.changes), empty.next_cursor) == ([], "")


async def test_bad_cursor_and_oversized_page_are_refused(identity, tenant_id: str) -> None:
    for cursor in ["nope", "ZGMxOi0x", "ZGMxOng"]:
        assert await refused(changes(identity.stub, tenant_id, cursor=cursor)) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "CURSOR_INVALID",
        ), cursor
    assert await refused(changes(identity.stub, tenant_id, page_size=1001)) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "PAGE_SIZE_TOO_LARGE",
    )
