"""Cards and faces: binding, the one-active-card rule, lost cards blacklisted for good."""

import grpc

from onecard.identity.v1 import identity_pb2 as pb
from tests.identity.support import create_member, get_member, refused


async def bind(stub, tenant_id: str, member_id: str, card_uid: str) -> pb.Member:  # noqa: ANN001
    return (await stub.BindCard(pb.BindCardRequest(tenant_id=tenant_id, member_id=member_id, card_uid=card_uid))).member


async def lose(stub, tenant_id: str, member_id: str, card_uid: str) -> pb.Member:  # noqa: ANN001
    request = pb.ReportCardLostRequest(tenant_id=tenant_id, member_id=member_id, card_uid=card_uid)
    return (await stub.ReportCardLost(request)).member


async def test_bound_card_is_active_with_its_uid_in_upper_case(identity, tenant_id: str) -> None:
    member = await create_member(identity.stub, tenant_id, "S1")
    bound = await bind(identity.stub, tenant_id, member.member_id, "04a1b2c3d4")
    assert [(c.card_uid, c.status) for c in bound.cards] == [("04A1B2C3D4", pb.CARD_STATUS_ACTIVE)]
    assert bound.version == 2 and bound.cards[0].HasField("bound_at")
    assert await bind(identity.stub, tenant_id, member.member_id, "04A1B2C3D4") == bound


async def test_card_uid_must_be_8_to_20_hex_digits(identity, tenant_id: str) -> None:
    member = await create_member(identity.stub, tenant_id, "S1")
    for uid in ["", "1234567", "1" * 21, "04A1B2C3ZZ", "04 A1 B2 C3"]:
        assert await refused(bind(identity.stub, tenant_id, member.member_id, uid)) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "CARD_UID_INVALID",
        ), uid
    assert len((await bind(identity.stub, tenant_id, member.member_id, "A" * 20)).cards) == 1


async def test_second_card_is_refused_until_the_first_is_reported_lost(identity, tenant_id: str) -> None:
    stub = identity.stub
    member = await create_member(stub, tenant_id, "S1")
    await bind(stub, tenant_id, member.member_id, "AAAA0001")
    assert await refused(bind(stub, tenant_id, member.member_id, "AAAA0002")) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "CARD_ALREADY_BOUND",
    )
    await lose(stub, tenant_id, member.member_id, "aaaa0001")
    replaced = await bind(stub, tenant_id, member.member_id, "AAAA0002")
    assert [(c.card_uid, c.status) for c in replaced.cards] == [
        ("AAAA0001", pb.CARD_STATUS_LOST),
        ("AAAA0002", pb.CARD_STATUS_ACTIVE),
    ]
    assert replaced.version == 4


async def test_lost_card_is_blacklisted_and_can_never_be_bound_again(identity, tenant_id: str) -> None:
    stub = identity.stub
    owner = await create_member(stub, tenant_id, "S1")
    other = await create_member(stub, tenant_id, "S2")
    await bind(stub, tenant_id, owner.member_id, "CAFE0001")
    lost = await lose(stub, tenant_id, owner.member_id, "CAFE0001")
    assert lost.cards[0].status == pb.CARD_STATUS_LOST and lost.cards[0].HasField("lost_at")
    blacklisted = (grpc.StatusCode.FAILED_PRECONDITION, "CARD_BLACKLISTED")
    assert await refused(bind(stub, tenant_id, owner.member_id, "CAFE0001")) == blacklisted
    assert await refused(bind(stub, tenant_id, other.member_id, "cafe0001")) == blacklisted
    assert await lose(stub, tenant_id, owner.member_id, "CAFE0001") == lost
    assert await get_member(stub, tenant_id, other.member_id) == other


async def test_card_held_by_another_member_is_refused(identity, tenant_id: str) -> None:
    a = await create_member(identity.stub, tenant_id, "S1")
    b = await create_member(identity.stub, tenant_id, "S2")
    await bind(identity.stub, tenant_id, a.member_id, "BEEF0001")
    assert await refused(bind(identity.stub, tenant_id, b.member_id, "BEEF0001")) == (
        grpc.StatusCode.ALREADY_EXISTS,
        "CARD_UID_IN_USE",
    )


async def test_reporting_a_card_the_member_never_had_is_not_found(identity, tenant_id: str) -> None:
    a = await create_member(identity.stub, tenant_id, "S1")
    b = await create_member(identity.stub, tenant_id, "S2")
    await bind(identity.stub, tenant_id, a.member_id, "BEEF0001")
    assert await refused(lose(identity.stub, tenant_id, b.member_id, "BEEF0001")) == (
        grpc.StatusCode.NOT_FOUND,
        "CARD_NOT_FOUND",
    )


async def test_blacklist_is_listed_by_version_for_devices(identity, tenant_id: str) -> None:
    stub = identity.stub
    uids = [f"DEAD{i:04d}" for i in range(5)]
    for i, uid in enumerate(uids):
        member = await create_member(stub, tenant_id, f"S{i}")
        await bind(stub, tenant_id, member.member_id, uid)
        await lose(stub, tenant_id, member.member_id, uid)
    first = await stub.ListCardBlacklist(pb.ListCardBlacklistRequest(tenant_id=tenant_id, page_size=3))
    assert [c.card_uid for c in first.cards] == uids[:3]
    assert [c.version for c in first.cards] == [1, 2, 3] and first.version == 3
    rest = await stub.ListCardBlacklist(pb.ListCardBlacklistRequest(tenant_id=tenant_id, since_version=first.version))
    assert [c.card_uid for c in rest.cards] == uids[3:] and rest.version == 5
    empty = await stub.ListCardBlacklist(pb.ListCardBlacklistRequest(tenant_id=tenant_id, since_version=5))
    assert (list(empty.cards), empty.version) == ([], 5)
    assert await refused(
        stub.ListCardBlacklist(pb.ListCardBlacklistRequest(tenant_id=tenant_id, since_version=-1))
    ) == (grpc.StatusCode.INVALID_ARGUMENT, "VERSION_INVALID")


async def test_face_enrolment_is_set_replaced_and_cleared(identity, tenant_id: str) -> None:
    stub = identity.stub
    member = await create_member(stub, tenant_id, "S1")

    async def set_face(ref: str) -> pb.Member:
        request = pb.SetFaceEnrolmentRequest(tenant_id=tenant_id, member_id=member.member_id, face_enrolment_ref=ref)
        return (await stub.SetFaceEnrolment(request)).member

    assert ((m := await set_face("vendor-face-001")).face_enrolment_ref, m.version) == ("vendor-face-001", 2)
    assert (await set_face("vendor-face-001")).version == 2
    assert (await set_face("vendor-face-002")).face_enrolment_ref == "vendor-face-002"
    cleared = await set_face("")
    assert (cleared.face_enrolment_ref, cleared.version) == ("", 4)
    assert await refused(set_face("x" * 257)) == (grpc.StatusCode.INVALID_ARGUMENT, "FACE_REF_INVALID")
