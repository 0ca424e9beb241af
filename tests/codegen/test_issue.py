"""Issuing credentials and token batches: what comes back, what is refused and why."""

from __future__ import annotations

import base64
import uuid

import grpc
import nacl.bindings

import onecard_codes as sdk
from onecard.codegen.v1 import codegen_pb2 as pb
from onecard.identity.v1 import identity_pb2 as ipb
from tests.codegen.support import holder_key, issue, refused
from tests.identity.support import create_member

# A point of order 8 on Ed25519: added to a real key it gives a mixed-order key.
ORDER_8_POINT_HEX = "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a"


async def test_a_credential_carries_the_member_the_holder_key_and_the_tenant_caps(codegen, tenant_id, member_id):
    key = holder_key()
    answer = await issue(codegen.stub, tenant_id, member_id, key=key, purposes=(pb.PURPOSE_PAY, pb.PURPOSE_ACCESS),
                         validity_s=3600)
    credential = answer.credential
    assert (credential.tenant_id, credential.member_id) == (tenant_id, member_id)
    assert credential.holder_public_key == bytes(key.verify_key)
    assert list(credential.purposes) == [pb.PURPOSE_PAY, pb.PURPOSE_ACCESS]
    assert credential.not_after.seconds - credential.not_before.seconds == 3600
    assert (credential.caps.per_transaction_fen, credential.caps.per_day_fen, credential.caps.per_day_count) == (
        5000, 20000, 20)
    assert base64.b64decode(answer.credential_base64) == answer.credential_bytes
    # The id is the format's: derived from the signed bytes by the SDK.
    code = sdk.make_holder_code(credential_bytes=answer.credential_bytes, holder_signing_key=key,
                                now_s=credential.not_before.seconds, counter=1, purpose=sdk.Purpose.PAY)
    decoded = sdk.decode_code(code)
    assert str(uuid.UUID(bytes=decoded.credential.credential_id(tenant_id=uuid.UUID(tenant_id).bytes))) == (
        credential.credential_id)
    assert decoded.credential.key_id.hex() == credential.key_id
    assert len(code) <= sdk.MAX_TEXT_CHARS


async def test_the_default_validity_is_a_day_and_more_than_72_hours_is_refused(codegen, tenant_id, member_id):
    credential = (await issue(codegen.stub, tenant_id, member_id)).credential
    assert credential.not_after.seconds - credential.not_before.seconds == 24 * 3600
    code, reason = await refused(issue(codegen.stub, tenant_id, member_id, validity_s=72 * 3600 + 1))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "VALIDITY_INVALID")
    longest = (await issue(codegen.stub, tenant_id, member_id, validity_s=72 * 3600)).credential
    assert longest.not_after.seconds - longest.not_before.seconds == 72 * 3600


async def test_frozen_and_departed_members_are_refused_with_their_reason(codegen, identity, tenant_id):
    frozen = await create_member(identity.stub, tenant_id, "F1")
    await identity.stub.FreezeMember(ipb.FreezeMemberRequest(tenant_id=tenant_id, member_id=frozen.member_id))
    left = await create_member(identity.stub, tenant_id, "L1")
    await identity.stub.MarkMemberLeft(ipb.MarkMemberLeftRequest(tenant_id=tenant_id, member_id=left.member_id))
    assert await refused(issue(codegen.stub, tenant_id, frozen.member_id)) == (
        grpc.StatusCode.FAILED_PRECONDITION, "MEMBER_FROZEN")
    assert await refused(issue(codegen.stub, tenant_id, left.member_id)) == (
        grpc.StatusCode.FAILED_PRECONDITION, "MEMBER_LEFT")
    batch = codegen.stub.IssueTokenBatch(pb.IssueTokenBatchRequest(
        tenant_id=tenant_id, member_id=frozen.member_id, purposes=[pb.PURPOSE_PAY]))
    assert await refused(batch) == (grpc.StatusCode.FAILED_PRECONDITION, "MEMBER_FROZEN")


async def test_a_revoked_holder_key_is_refused_and_takes_its_credentials_with_it(codegen, tenant_id, member_id):
    key = holder_key()
    issued = await issue(codegen.stub, tenant_id, member_id, key=key)
    revoked = await codegen.stub.RevokeHolderKey(pb.RevokeHolderKeyRequest(
        tenant_id=tenant_id, member_id=member_id, public_key=bytes(key.verify_key), reason="phone stolen"))
    assert revoked.holder_key.status == pb.HOLDER_KEY_STATUS_REVOKED
    assert revoked.revoked_credentials == 1
    assert await refused(issue(codegen.stub, tenant_id, member_id, key=key)) == (
        grpc.StatusCode.FAILED_PRECONDITION, "HOLDER_KEY_REVOKED")
    entries = (await codegen.stub.GetRevocations(pb.GetRevocationsRequest(tenant_id=tenant_id))).entries
    assert [e.credential_id for e in entries] == [issued.credential.credential_id]
    assert entries[0].reason == "holder_key_revoked"


async def test_a_holder_key_belongs_to_one_member(codegen, identity, tenant_id, member_id):
    other = await create_member(identity.stub, tenant_id, "S2002")
    key = holder_key()
    registered = await codegen.stub.RegisterHolderKey(pb.RegisterHolderKeyRequest(
        tenant_id=tenant_id, member_id=member_id, public_key=bytes(key.verify_key)))
    assert registered.holder_key.status == pb.HOLDER_KEY_STATUS_ACTIVE
    again = await codegen.stub.RegisterHolderKey(pb.RegisterHolderKeyRequest(
        tenant_id=tenant_id, member_id=member_id, public_key=bytes(key.verify_key)))
    assert again.holder_key == registered.holder_key
    assert await refused(issue(codegen.stub, tenant_id, other.member_id, key=key)) == (
        grpc.StatusCode.FAILED_PRECONDITION, "HOLDER_KEY_TAKEN")


async def test_a_token_batch_covers_at_most_24_hours_in_aligned_back_to_back_slots(codegen, tenant_id, member_id):
    answer = await codegen.stub.IssueTokenBatch(pb.IssueTokenBatchRequest(
        tenant_id=tenant_id, member_id=member_id, purposes=[pb.PURPOSE_PAY, pb.PURPOSE_RIDE], slot_length_s=60,
        hours=24))
    tokens = answer.tokens
    assert len(tokens) == 24 * 60
    assert answer.slot_length_s == 60
    assert [t.sequence for t in tokens] == list(range(len(tokens)))
    starts = [t.slot_start.seconds for t in tokens]
    assert starts[0] % 60 == 0
    assert all(b - a == 60 for a, b in zip(starts, starts[1:], strict=False))
    assert answer.credential.not_before.seconds == starts[0]
    assert answer.credential.not_after.seconds == starts[0] + 24 * 3600
    assert answer.credential.holder_public_key == b""
    decoded = sdk.decode_code(tokens[5].code)
    assert (decoded.slot_start_s, decoded.slot_length_s, decoded.sequence) == (starts[5], 60, 5)
    assert str(uuid.UUID(bytes=decoded.credential_id)) == answer.credential.credential_id
    too_long = codegen.stub.IssueTokenBatch(pb.IssueTokenBatchRequest(
        tenant_id=tenant_id, member_id=member_id, purposes=[pb.PURPOSE_PAY], hours=25))
    assert await refused(too_long) == (grpc.StatusCode.INVALID_ARGUMENT, "BATCH_HOURS_INVALID")
    short = await codegen.stub.IssueTokenBatch(pb.IssueTokenBatchRequest(
        tenant_id=tenant_id, member_id=member_id, purposes=[pb.PURPOSE_PAY], slot_length_s=300, hours=1))
    assert len(short.tokens) == 12


async def test_bad_input_is_refused_with_a_typed_reason_and_changes_nothing(codegen, tenant_id, member_id):
    stub = codegen.stub
    key = bytes(holder_key().verify_key)
    cases = {
        "TENANT_ID_INVALID": stub.IssueCredential(pb.IssueCredentialRequest(
            tenant_id="nope", member_id=member_id, holder_public_key=key, purposes=[pb.PURPOSE_PAY])),
        "MEMBER_ID_INVALID": stub.IssueCredential(pb.IssueCredentialRequest(
            tenant_id=tenant_id, member_id="x", holder_public_key=key, purposes=[pb.PURPOSE_PAY])),
        "HOLDER_KEY_INVALID": stub.IssueCredential(pb.IssueCredentialRequest(
            tenant_id=tenant_id, member_id=member_id, holder_public_key=key[:31], purposes=[pb.PURPOSE_PAY])),
        "PURPOSES_REQUIRED": stub.IssueCredential(pb.IssueCredentialRequest(
            tenant_id=tenant_id, member_id=member_id, holder_public_key=key)),
        "PURPOSE_INVALID": stub.IssueCredential(pb.IssueCredentialRequest(
            tenant_id=tenant_id, member_id=member_id, holder_public_key=key, purposes=[pb.PURPOSE_PAY, 99])),
        "PURPOSE_REPEATED": stub.IssueCredential(pb.IssueCredentialRequest(
            tenant_id=tenant_id, member_id=member_id, holder_public_key=key,
            purposes=[pb.PURPOSE_PAY, pb.PURPOSE_PAY])),
        "SLOT_LENGTH_INVALID": stub.IssueTokenBatch(pb.IssueTokenBatchRequest(
            tenant_id=tenant_id, member_id=member_id, purposes=[pb.PURPOSE_PAY], slot_length_s=5)),
        "CREDENTIAL_ID_INVALID": stub.RevokeCredential(pb.RevokeCredentialRequest(
            tenant_id=tenant_id, credential_id="zz")),
        "VERSION_INVALID": stub.GetRevocations(pb.GetRevocationsRequest(tenant_id=tenant_id, since_version=-1)),
        "PAGE_SIZE_INVALID": stub.GetRevocations(pb.GetRevocationsRequest(tenant_id=tenant_id, page_size=10**6)),
    }
    for reason, call in cases.items():
        assert await refused(call) == (grpc.StatusCode.INVALID_ARGUMENT, reason), reason
    # 32 bytes but not a key a verifier may use: the identity point (small order: anyone could
    # sign for it) and a real key plus a point of order 8 (mixed order).
    small_order = bytes.fromhex("01" + "00" * 31)
    mixed_order = nacl.bindings.crypto_core_ed25519_add(key, bytes.fromhex(ORDER_8_POINT_HEX))
    for bad_key in (small_order, mixed_order):
        assert await refused(stub.IssueCredential(pb.IssueCredentialRequest(
            tenant_id=tenant_id, member_id=member_id, holder_public_key=bad_key,
            purposes=[pb.PURPOSE_PAY]))) == (grpc.StatusCode.INVALID_ARGUMENT, "HOLDER_KEY_INVALID")
    assert await refused(stub.RevokeCredential(pb.RevokeCredentialRequest(
        tenant_id=tenant_id, credential_id=str(uuid.uuid4())))) == (grpc.StatusCode.NOT_FOUND,
                                                                    "CREDENTIAL_NOT_FOUND")
    assert await refused(issue(stub, tenant_id, str(uuid.uuid4()))) == (grpc.StatusCode.NOT_FOUND,
                                                                         "MEMBER_NOT_FOUND")
    trust = await stub.GetTrustList(pb.GetTrustListRequest(tenant_id=tenant_id))
    assert (trust.version, list(trust.keys)) == (0, [])
