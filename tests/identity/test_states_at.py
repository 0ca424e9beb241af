"""GetMemberStatesAt: what the directory said at given instants (offline settlement asks it for the
time of each record): a member's status from the change feed, a card's holder then and whether it
had been reported lost by then."""

from __future__ import annotations

import uuid
from datetime import timedelta

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from onecard.identity.v1 import identity_pb2 as pb
from tests.identity.support import create_member, create_tenant, refused

MICROSECOND = timedelta(microseconds=1)


def at(stamp: Timestamp, shift: timedelta = timedelta(0)) -> Timestamp:
    out = Timestamp()
    out.FromDatetime(stamp.ToDatetime() + shift)
    return out


async def states(stub, tenant_id: str, *queries: pb.MemberStateQuery) -> list[tuple]:  # noqa: ANN001
    answer = await stub.GetMemberStatesAt(pb.GetMemberStatesAtRequest(tenant_id=tenant_id, queries=queries))
    return [(s.found, s.member_id, pb.MemberStatus.Name(s.status).removeprefix("MEMBER_STATUS_"), s.card_lost)
            if s.found else (False,) for s in answer.states]


async def test_a_members_status_is_the_one_it_had_at_each_instant(identity, tenant_id: str) -> None:
    stub = identity.stub
    member = await create_member(stub, tenant_id, "S1")
    m = member.member_id
    frozen = (await stub.FreezeMember(pb.FreezeMemberRequest(tenant_id=tenant_id, member_id=m, reason="lost"))).member
    thawed = (await stub.UnfreezeMember(pb.UnfreezeMemberRequest(tenant_id=tenant_id, member_id=m))).member
    left = (await stub.MarkMemberLeft(pb.MarkMemberLeftRequest(tenant_id=tenant_id, member_id=m))).member

    def q(stamp: Timestamp, shift: timedelta = timedelta(0)) -> pb.MemberStateQuery:
        return pb.MemberStateQuery(member_id=m, at=at(stamp, shift))

    assert await states(stub, tenant_id, q(member.created_at, -MICROSECOND), q(member.created_at),
                        q(frozen.updated_at, -MICROSECOND), q(frozen.updated_at), q(thawed.updated_at),
                        q(left.updated_at), q(left.updated_at, timedelta(days=30))) == [
        (False,), (True, m, "ACTIVE", False), (True, m, "ACTIVE", False), (True, m, "FROZEN", False),
        (True, m, "ACTIVE", False), (True, m, "LEFT", False), (True, m, "LEFT", False)]


async def test_a_card_names_its_holder_then_and_whether_it_was_lost_by_then(identity, tenant_id: str) -> None:
    stub = identity.stub
    member = await create_member(stub, tenant_id, "S1")
    bound = (await stub.BindCard(pb.BindCardRequest(tenant_id=tenant_id, member_id=member.member_id,
                                                    card_uid="CAFE0001"))).member.cards[0]
    lost = (await stub.ReportCardLost(pb.ReportCardLostRequest(tenant_id=tenant_id, member_id=member.member_id,
                                                               card_uid="CAFE0001"))).member.cards[0]

    def q(stamp: Timestamp, shift: timedelta = timedelta(0), uid: str = "cafe0001") -> pb.MemberStateQuery:
        return pb.MemberStateQuery(card_uid=uid, at=at(stamp, shift))

    m = member.member_id
    assert await states(stub, tenant_id, q(bound.bound_at, -MICROSECOND), q(bound.bound_at),
                        q(lost.lost_at, -MICROSECOND), q(lost.lost_at), q(lost.lost_at, uid="DEADBEEF")) == [
        (False,), (True, m, "ACTIVE", False), (True, m, "ACTIVE", False), (True, m, "ACTIVE", True), (False,)]


async def test_other_tenants_and_unknown_members_are_not_found(identity, tenant_id: str) -> None:
    stub = identity.stub
    other = await create_tenant(stub, name="Peking")
    theirs = await create_member(stub, other, "S1")
    later = Timestamp()
    later.FromDatetime(theirs.created_at.ToDatetime() + timedelta(hours=1))
    assert await states(stub, tenant_id, pb.MemberStateQuery(member_id=theirs.member_id, at=later),
                        pb.MemberStateQuery(member_id=str(uuid.uuid4()), at=later)) == [(False,), (False,)]


async def test_bad_queries_are_refused(identity, tenant_id: str) -> None:
    stub = identity.stub
    now = Timestamp()
    now.GetCurrentTime()

    async def ask(*queries: pb.MemberStateQuery, tenant: str = tenant_id) -> tuple:
        return await refused(stub.GetMemberStatesAt(pb.GetMemberStatesAtRequest(tenant_id=tenant, queries=queries)))

    member = str(uuid.uuid4())
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    assert await ask() == (invalid, "QUERY_COUNT_INVALID")
    assert await ask(*[pb.MemberStateQuery(member_id=member, at=now)] * 1001) == (invalid, "QUERY_COUNT_INVALID")
    assert await ask(pb.MemberStateQuery(member_id=member)) == (invalid, "AT_REQUIRED")
    assert await ask(pb.MemberStateQuery(at=now)) == (invalid, "LOOKUP_KEY_REQUIRED")
    assert await ask(pb.MemberStateQuery(member_id="nope", at=now)) == (invalid, "MEMBER_ID_INVALID")
    assert await ask(pb.MemberStateQuery(card_uid="XYZ", at=now)) == (invalid, "CARD_UID_INVALID")
    assert await ask(pb.MemberStateQuery(member_id=member, at=now), tenant=str(uuid.uuid4())) == (
        grpc.StatusCode.NOT_FOUND, "TENANT_NOT_FOUND")
