"""LookupMember: the member a device was shown, by card UID or face enrolment reference."""

import uuid

import grpc
import pytest

from onecard.identity.v1 import identity_pb2 as pb
from runtime.grpc_client import error_info
from tests.identity.support import create_member, create_tenant, refused


async def lookup(stub, tenant_id: str, **by: str) -> pb.Member:  # noqa: ANN001
    return (await stub.LookupMember(pb.LookupMemberRequest(tenant_id=tenant_id, **by))).member


async def bind(stub, tenant_id: str, member_id: str, card_uid: str) -> pb.Member:  # noqa: ANN001
    return (await stub.BindCard(pb.BindCardRequest(tenant_id=tenant_id, member_id=member_id, card_uid=card_uid))).member


async def enrol_face(stub, tenant_id: str, member_id: str, ref: str) -> pb.Member:  # noqa: ANN001
    request = pb.SetFaceEnrolmentRequest(tenant_id=tenant_id, member_id=member_id, face_enrolment_ref=ref)
    return (await stub.SetFaceEnrolment(request)).member


async def test_active_card_finds_its_holder_in_either_case(identity, tenant_id: str) -> None:
    stub = identity.stub
    member = await create_member(stub, tenant_id, "S1", groups={"role": "student"})
    bound = await bind(stub, tenant_id, member.member_id, "04A1B2C3D4")
    assert await lookup(stub, tenant_id, card_uid="04a1b2c3d4") == bound
    assert (await lookup(stub, tenant_id, card_uid=" 04A1B2C3D4 ")).groups == {"role": "student"}


async def test_unknown_card_and_face_are_not_found(identity, tenant_id: str) -> None:
    stub = identity.stub
    await create_member(stub, tenant_id, "S1")
    assert await refused(lookup(stub, tenant_id, card_uid="DEADBEEF")) == (grpc.StatusCode.NOT_FOUND, "CARD_UNKNOWN")
    assert await refused(lookup(stub, tenant_id, face_enrolment_ref="face-1")) == (
        grpc.StatusCode.NOT_FOUND, "FACE_UNKNOWN")


async def test_lost_card_is_refused_with_its_holder(identity, tenant_id: str) -> None:
    stub = identity.stub
    member = await create_member(stub, tenant_id, "S1")
    await bind(stub, tenant_id, member.member_id, "CAFE0001")
    await stub.ReportCardLost(pb.ReportCardLostRequest(tenant_id=tenant_id, member_id=member.member_id,
                                                       card_uid="CAFE0001"))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await lookup(stub, tenant_id, card_uid="cafe0001")
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(info.value) == ("CARD_LOST", {"member_id": member.member_id})
    # The new card works; the lost one stays refused.
    renewed = await bind(stub, tenant_id, member.member_id, "CAFE0002")
    assert await lookup(stub, tenant_id, card_uid="CAFE0002") == renewed
    assert (await refused(lookup(stub, tenant_id, card_uid="CAFE0001")))[1] == "CARD_LOST"


async def test_face_reference_finds_its_member_and_a_cleared_one_does_not(identity, tenant_id: str) -> None:
    stub = identity.stub
    member = await create_member(stub, tenant_id, "S1")
    await create_member(stub, tenant_id, "S2")
    enrolled = await enrol_face(stub, tenant_id, member.member_id, "vendor:face/0001")
    assert await lookup(stub, tenant_id, face_enrolment_ref="vendor:face/0001") == enrolled
    await enrol_face(stub, tenant_id, member.member_id, "")
    assert (await refused(lookup(stub, tenant_id, face_enrolment_ref="vendor:face/0001")))[1] == "FACE_UNKNOWN"


async def test_shared_face_reference_prefers_the_current_member_or_is_ambiguous(identity, tenant_id: str) -> None:
    stub = identity.stub
    a = await create_member(stub, tenant_id, "S1")
    b = await create_member(stub, tenant_id, "S2")
    await enrol_face(stub, tenant_id, a.member_id, "same")
    await enrol_face(stub, tenant_id, b.member_id, "same")
    assert await refused(lookup(stub, tenant_id, face_enrolment_ref="same")) == (
        grpc.StatusCode.FAILED_PRECONDITION, "FACE_AMBIGUOUS")
    await stub.MarkMemberLeft(pb.MarkMemberLeftRequest(tenant_id=tenant_id, member_id=a.member_id))
    assert (await lookup(stub, tenant_id, face_enrolment_ref="same")).member_id == b.member_id


async def test_status_is_answered_not_judged(identity, tenant_id: str) -> None:
    stub = identity.stub
    member = await create_member(stub, tenant_id, "S1")
    await bind(stub, tenant_id, member.member_id, "AB12CD34")
    await stub.FreezeMember(pb.FreezeMemberRequest(tenant_id=tenant_id, member_id=member.member_id, reason="audit"))
    assert (await lookup(stub, tenant_id, card_uid="AB12CD34")).status == pb.MEMBER_STATUS_FROZEN


async def test_another_tenants_card_and_face_are_unknown(identity, tenant_id: str) -> None:
    stub = identity.stub
    member = await create_member(stub, tenant_id, "S1")
    await bind(stub, tenant_id, member.member_id, "AB12CD34")
    await enrol_face(stub, tenant_id, member.member_id, "face-x")
    other = await create_tenant(stub, name="Peking")
    assert (await refused(lookup(stub, other, card_uid="AB12CD34")))[1] == "CARD_UNKNOWN"
    assert (await refused(lookup(stub, other, face_enrolment_ref="face-x")))[1] == "FACE_UNKNOWN"


async def test_bad_requests_are_invalid_and_unknown_tenant_not_found(identity, tenant_id: str) -> None:
    stub = identity.stub
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    assert await refused(lookup(stub, tenant_id)) == (invalid, "LOOKUP_KEY_REQUIRED")
    assert await refused(lookup(stub, tenant_id, card_uid="XYZ")) == (invalid, "CARD_UID_INVALID")
    assert await refused(lookup(stub, tenant_id, face_enrolment_ref="  ")) == (invalid, "FACE_REF_INVALID")
    assert await refused(lookup(stub, "nope", card_uid="AB12CD34")) == (invalid, "TENANT_ID_INVALID")
    assert await refused(lookup(stub, str(uuid.uuid4()), card_uid="AB12CD34")) == (
        grpc.StatusCode.NOT_FOUND, "TENANT_NOT_FOUND")
