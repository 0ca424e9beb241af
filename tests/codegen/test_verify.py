"""Codes built from what codegen issued verify with the SDK against codegen's own trust list and
revocation list, and stop verifying once revoked."""

from __future__ import annotations

import time
import uuid

import grpc

import onecard_codes as sdk
from onecard_codes.verify import Verifier
from onecard.codegen.v1 import codegen_pb2 as pb
from services.codegen.client import fetch_verifier_inputs
from tests.codegen.support import holder_key, issue, refused


def holder_code(answer: pb.IssueCredentialResponse, key, *, now_s: int, counter: int = 1,
                purpose: sdk.Purpose = sdk.Purpose.PAY) -> str:
    return sdk.make_holder_code(credential_bytes=answer.credential_bytes, holder_signing_key=key, now_s=now_s,
                                counter=counter, purpose=purpose)


async def verifier(stub, tenant_id: str) -> Verifier:
    trust_list, revocations = await fetch_verifier_inputs(stub, tenant_id=tenant_id)
    return Verifier(trust_list=trust_list, revocations=revocations)


async def test_a_holder_code_verifies_against_the_services_trust_list(codegen, tenant_id, member_id):
    key = holder_key()
    answer = await issue(codegen.stub, tenant_id, member_id, key=key, purposes=(pb.PURPOSE_PAY, pb.PURPOSE_RIDE))
    now_s = int(time.time())
    check = await verifier(codegen.stub, tenant_id)
    result = check.verify(holder_code(answer, key, now_s=now_s), now_s=now_s,
                          expected_tenant_id=uuid.UUID(tenant_id), purpose=sdk.Purpose.PAY)
    assert result.ok, result
    assert (str(result.member_id), str(result.credential_id)) == (member_id, answer.credential.credential_id)
    assert result.caps == sdk.OfflineCaps(5000, 20000, 20)
    wrong = check.verify(holder_code(answer, key, now_s=now_s, counter=2), now_s=now_s,
                         expected_tenant_id=uuid.UUID(tenant_id), purpose=sdk.Purpose.ACCESS)
    assert not wrong.ok and wrong.reason is sdk.Reason.WRONG_PURPOSE


async def test_tokens_verify_and_a_revoked_batch_is_refused(codegen, tenant_id, member_id):
    batch = await codegen.stub.IssueTokenBatch(pb.IssueTokenBatchRequest(
        tenant_id=tenant_id, member_id=member_id, purposes=[pb.PURPOSE_PAY], hours=1))
    now_s = int(time.time())
    current = next(t for t in batch.tokens if t.slot_start.seconds <= now_s < t.slot_start.seconds + 60)
    result = (await verifier(codegen.stub, tenant_id)).verify(
        current.code, now_s=now_s, expected_tenant_id=uuid.UUID(tenant_id), purpose=sdk.Purpose.PAY)
    assert result.ok, result
    revoked = await codegen.stub.RevokeCredential(pb.RevokeCredentialRequest(
        tenant_id=tenant_id, credential_id=batch.credential.credential_id, reason="app uninstalled"))
    assert revoked.revocation.version == 1
    result = (await verifier(codegen.stub, tenant_id)).verify(
        current.code, now_s=now_s, expected_tenant_id=uuid.UUID(tenant_id), purpose=sdk.Purpose.PAY)
    assert not result.ok and result.reason is sdk.Reason.REVOKED


async def test_revocations_are_versioned_and_served_as_changes_since_a_version(codegen, tenant_id, member_id):
    issued = [await issue(codegen.stub, tenant_id, member_id) for _ in range(3)]
    first = await codegen.stub.RevokeCredential(pb.RevokeCredentialRequest(
        tenant_id=tenant_id, credential_id=issued[0].credential.credential_id))
    again = await codegen.stub.RevokeCredential(pb.RevokeCredentialRequest(
        tenant_id=tenant_id, credential_id=issued[0].credential.credential_id))
    assert again.revocation == first.revocation
    rest = await codegen.stub.RevokeMember(pb.RevokeMemberRequest(tenant_id=tenant_id, member_id=member_id))
    assert sorted(e.credential_id for e in rest.revocations) == sorted(
        i.credential.credential_id for i in issued[1:])
    assert [e.version for e in rest.revocations] == [2, 3]
    page = await codegen.stub.GetRevocations(pb.GetRevocationsRequest(tenant_id=tenant_id, page_size=2))
    assert ([e.version for e in page.entries], page.version, page.more) == ([1, 2], 2, True)
    page = await codegen.stub.GetRevocations(pb.GetRevocationsRequest(tenant_id=tenant_id, since_version=2))
    assert ([e.version for e in page.entries], page.version, page.more) == ([3], 3, False)
    page = await codegen.stub.GetRevocations(pb.GetRevocationsRequest(tenant_id=tenant_id, since_version=3))
    assert (list(page.entries), page.version, page.more) == ([], 3, False)


async def test_tenant_b_cannot_issue_for_or_revoke_a_member_of_tenant_a_nor_see_its_lists(
        codegen, identity, tenant_id, member_id):
    from tests.identity.support import create_tenant
    tenant_b = await create_tenant(identity.stub, name="Other College")
    await issue(codegen.stub, tenant_id, member_id)
    assert await refused(issue(codegen.stub, tenant_b, member_id)) == (grpc.StatusCode.NOT_FOUND,
                                                                        "MEMBER_NOT_FOUND")
    batch = codegen.stub.IssueTokenBatch(pb.IssueTokenBatchRequest(
        tenant_id=tenant_b, member_id=member_id, purposes=[pb.PURPOSE_PAY]))
    assert await refused(batch) == (grpc.StatusCode.NOT_FOUND, "MEMBER_NOT_FOUND")
    assert await refused(codegen.stub.RevokeMember(pb.RevokeMemberRequest(
        tenant_id=tenant_b, member_id=member_id))) == (grpc.StatusCode.NOT_FOUND, "MEMBER_NOT_FOUND")
    a_credential = (await codegen.stub.GetRevocations(pb.GetRevocationsRequest(tenant_id=tenant_id)))
    assert list(a_credential.entries) == []
    trust_a = await codegen.stub.GetTrustList(pb.GetTrustListRequest(tenant_id=tenant_id))
    trust_b = await codegen.stub.GetTrustList(pb.GetTrustListRequest(tenant_id=tenant_b))
    assert len(trust_a.keys) == 1 and list(trust_b.keys) == []
    # A code of tenant A's key is another tenant's code to a verifier set up for B.
    key = holder_key()
    answer = await issue(codegen.stub, tenant_id, member_id, key=key)
    now_s = int(time.time())
    trust_list, revocations = await fetch_verifier_inputs(codegen.stub, tenant_id=tenant_id)
    result = Verifier(trust_list=trust_list, revocations=revocations).verify(
        holder_code(answer, key, now_s=now_s), now_s=now_s, expected_tenant_id=uuid.UUID(tenant_b),
        purpose=sdk.Purpose.PAY)
    assert not result.ok and result.reason is sdk.Reason.WRONG_TENANT
