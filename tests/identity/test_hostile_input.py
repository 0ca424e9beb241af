"""Input crafted to break the service is refused with a typed error, never an INTERNAL."""

import base64
import json
import uuid

import grpc

from onecard.identity.v1 import identity_pb2 as pb
from services.identity.servicer import search_fingerprint
from tests.identity.support import create_member, refused


def b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


async def test_nul_bytes_and_forged_cursors_are_refused_not_internal(identity, tenant_id: str) -> None:
    stub = identity.stub
    member = await create_member(stub, tenant_id, "S1")
    calls = [
        stub.CreateMember(pb.CreateMemberRequest(tenant_id=tenant_id, external_number="S\x002", name="n")),
        stub.SearchMembers(pb.SearchMembersRequest(tenant_id=tenant_id, query="a\x00")),
        stub.SearchMembers(pb.SearchMembersRequest(tenant_id=tenant_id, groups={"grade": "\x00"})),
        stub.UpdateMember(pb.UpdateMemberRequest(tenant_id=tenant_id, member_id=member.member_id, name="\x00")),
        stub.FreezeMember(pb.FreezeMemberRequest(tenant_id=tenant_id, member_id=member.member_id, reason="\x00")),
        stub.SetFaceEnrolment(
            pb.SetFaceEnrolmentRequest(tenant_id=tenant_id, member_id=member.member_id, face_enrolment_ref="\x00")
        ),
        stub.GrantTenantAccess(pb.GrantTenantAccessRequest(tenant_id=tenant_id, client_id="oc\x00", scopes=["a"])),
        stub.RevokeTenantAccess(pb.RevokeTenantAccessRequest(tenant_id=tenant_id, client_id="oc\x00")),
        stub.AuthenticateClient(pb.AuthenticateClientRequest(client_id="oc\x00", client_secret="s", tenant_id=tenant_id)),
        stub.CreateApiClient(pb.CreateApiClientRequest(name="n", scopes=["pay\n"])),
        stub.ListDirectoryChanges(pb.ListDirectoryChangesRequest(tenant_id=tenant_id, cursor=b64("dc1:" + "9" * 30))),
        stub.ListDirectoryChanges(pb.ListDirectoryChangesRequest(tenant_id=tenant_id, cursor="é")),
    ]
    token = (await stub.SearchMembers(pb.SearchMembersRequest(tenant_id=tenant_id, page_size=1))).next_page_token
    assert token == ""
    # The fingerprint hashes only what the caller sent, so a caller can forge a token that passes it.
    fingerprint = search_fingerprint(tenant_id=uuid.UUID(tenant_id), query="", status=None, groups={})
    forged = json.dumps({"v": 1, "after": "\x00", "f": fingerprint})
    calls.append(stub.SearchMembers(pb.SearchMembersRequest(tenant_id=tenant_id, page_token=b64(forged))))
    for call in calls:
        code, reason = await refused(call)
        assert code in (
            grpc.StatusCode.INVALID_ARGUMENT,
            grpc.StatusCode.NOT_FOUND,
            grpc.StatusCode.UNAUTHENTICATED,
        ), (code, reason)
        assert reason is not None
