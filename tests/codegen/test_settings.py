"""Tenant code settings: offline caps, default validity and default purposes, what is refused,
and that what is issued afterwards carries them (checked with the decode SDK, as a device would)."""

from __future__ import annotations

import time
import uuid

import grpc

import onecard_codes as sdk
from onecard.codegen.v1 import codegen_pb2 as pb
from onecard_codes.verify import Verifier
from runtime.grpc_client import error_info
from services.codegen.client import fetch_verifier_inputs
from tests.codegen.support import holder_key, issue, refused
from tests.identity.support import create_tenant


def _update(tenant_id: str, *, per_transaction_fen: int = 800, per_day_fen: int = 3000, per_day_count: int = 7,
            hours: int = 12, purposes: tuple[int, ...] = ()) -> pb.UpdateTenantCodeSettingsRequest:
    return pb.UpdateTenantCodeSettingsRequest(
        tenant_id=tenant_id,
        caps=pb.OfflineCaps(per_transaction_fen=per_transaction_fen, per_day_fen=per_day_fen,
                            per_day_count=per_day_count),
        default_credential_validity_hours=hours, default_purposes=list(purposes))


async def test_a_tenant_that_never_chose_has_the_defaults(codegen, tenant_id):
    settings = (await codegen.stub.GetTenantCodeSettings(pb.GetTenantCodeSettingsRequest(tenant_id=tenant_id))
                ).settings
    assert settings.tenant_id == tenant_id
    assert (settings.caps.per_transaction_fen, settings.caps.per_day_fen, settings.caps.per_day_count) == (
        5000, 20000, 20)
    assert settings.default_credential_validity_hours == 24
    assert list(settings.default_purposes) == []
    assert not settings.HasField("updated_at")


async def test_issued_credentials_and_tokens_carry_the_tenant_caps_and_defaults(codegen, identity, tenant_id,
                                                                                member_id):
    stub = codegen.stub
    updated = (await stub.UpdateTenantCodeSettings(_update(
        tenant_id, per_transaction_fen=1234, per_day_fen=5678, per_day_count=255, hours=6,
        purposes=(pb.PURPOSE_ACCESS, pb.PURPOSE_PAY)))).settings
    assert (updated.caps.per_transaction_fen, updated.caps.per_day_fen, updated.caps.per_day_count) == (
        1234, 5678, 255)
    # Answered in the fixed purpose order, whatever order they were sent in.
    assert list(updated.default_purposes) == [pb.PURPOSE_PAY, pb.PURPOSE_ACCESS]
    assert updated.HasField("updated_at")
    fetched = (await stub.GetTenantCodeSettings(pb.GetTenantCodeSettingsRequest(tenant_id=tenant_id))).settings
    assert fetched == updated

    # No purposes and no validity named: the tenant's defaults.
    key = holder_key()
    answer = await issue(stub, tenant_id, member_id, key=key, purposes=())
    credential = answer.credential
    assert list(credential.purposes) == [pb.PURPOSE_PAY, pb.PURPOSE_ACCESS]
    assert credential.not_after.seconds - credential.not_before.seconds == 6 * 3600
    assert (credential.caps.per_transaction_fen, credential.caps.per_day_fen, credential.caps.per_day_count) == (
        1234, 5678, 255)

    # What a device sees: the caps are in the signed bytes, not only in the service's answer.
    trust, revocations = await fetch_verifier_inputs(stub, tenant_id=tenant_id)
    verifier = Verifier(trust_list=trust, revocations=revocations)
    now_s = int(time.time())
    code = sdk.make_holder_code(credential_bytes=answer.credential_bytes, holder_signing_key=key, now_s=now_s,
                                counter=1, purpose=sdk.Purpose.ACCESS)
    verified = verifier.verify(code, now_s=now_s, expected_tenant_id=uuid.UUID(tenant_id),
                               purpose=sdk.Purpose.ACCESS)
    assert verified.ok, verified
    assert verified.caps == sdk.OfflineCaps(per_transaction_fen=1234, per_day_fen=5678, count_per_day=255)

    # A request that names purposes and a validity gets those, with the tenant's caps.
    named = (await issue(stub, tenant_id, member_id, purposes=(pb.PURPOSE_RIDE,), validity_s=3600)).credential
    assert list(named.purposes) == [pb.PURPOSE_RIDE]
    assert named.not_after.seconds - named.not_before.seconds == 3600

    batch = await stub.IssueTokenBatch(pb.IssueTokenBatchRequest(tenant_id=tenant_id, member_id=member_id, hours=1))
    assert list(batch.credential.purposes) == [pb.PURPOSE_PAY, pb.PURPOSE_ACCESS]
    token = verifier.verify(batch.tokens[0].code, now_s=now_s, expected_tenant_id=uuid.UUID(tenant_id),
                            purpose=sdk.Purpose.PAY)
    assert token.ok, token
    assert token.caps == sdk.OfflineCaps(per_transaction_fen=1234, per_day_fen=5678, count_per_day=255)

    # Another tenant is untouched by this one's settings.
    other = await create_tenant(identity.stub)
    theirs = (await stub.GetTenantCodeSettings(pb.GetTenantCodeSettingsRequest(tenant_id=other))).settings
    assert (theirs.caps.per_transaction_fen, theirs.default_credential_validity_hours) == (5000, 24)


async def test_changed_caps_apply_to_new_credentials_only(codegen, tenant_id, member_id):
    stub = codegen.stub
    before = (await issue(stub, tenant_id, member_id)).credential
    await stub.UpdateTenantCodeSettings(_update(tenant_id, per_transaction_fen=100, per_day_fen=100,
                                                per_day_count=0))
    after = (await issue(stub, tenant_id, member_id)).credential
    assert before.caps.per_transaction_fen == 5000
    assert (after.caps.per_transaction_fen, after.caps.per_day_fen, after.caps.per_day_count) == (100, 100, 0)


async def test_settings_out_of_the_format_or_inconsistent_are_refused_and_change_nothing(codegen, tenant_id):
    stub = codegen.stub
    cases = {
        "CAPS_REQUIRED": pb.UpdateTenantCodeSettingsRequest(tenant_id=tenant_id,
                                                            default_credential_validity_hours=24),
        "CAP_PER_TRANSACTION_INVALID": _update(tenant_id, per_transaction_fen=-1),
        "CAP_PER_DAY_INVALID": _update(tenant_id, per_day_fen=2**32),
        "CAP_COUNT_INVALID": _update(tenant_id, per_day_count=256),
        "CAPS_INCONSISTENT": _update(tenant_id, per_transaction_fen=3001, per_day_fen=3000),
        "DEFAULT_VALIDITY_INVALID": _update(tenant_id, hours=73),
        "PURPOSE_INVALID": _update(tenant_id, purposes=(pb.PURPOSE_PAY, 99)),
        "PURPOSE_REPEATED": _update(tenant_id, purposes=(pb.PURPOSE_PAY, pb.PURPOSE_PAY)),
        "TENANT_ID_INVALID": _update("not-a-uuid"),
    }
    for reason, request in cases.items():
        assert await refused(stub.UpdateTenantCodeSettings(request)) == (grpc.StatusCode.INVALID_ARGUMENT,
                                                                          reason), reason
    assert await refused(stub.UpdateTenantCodeSettings(_update(tenant_id, hours=0))) == (
        grpc.StatusCode.INVALID_ARGUMENT, "DEFAULT_VALIDITY_INVALID")
    settings = (await stub.GetTenantCodeSettings(pb.GetTenantCodeSettingsRequest(tenant_id=tenant_id))).settings
    assert not settings.HasField("updated_at")
    # The format's edges are accepted.
    edge = (await stub.UpdateTenantCodeSettings(_update(tenant_id, per_transaction_fen=2**32 - 1,
                                                        per_day_fen=2**32 - 1, per_day_count=255, hours=72))).settings
    assert (edge.caps.per_day_fen, edge.caps.per_day_count, edge.default_credential_validity_hours) == (
        2**32 - 1, 255, 72)


async def test_without_default_purposes_a_request_must_name_them(codegen, tenant_id, member_id):
    assert await refused(issue(codegen.stub, tenant_id, member_id, purposes=())) == (
        grpc.StatusCode.INVALID_ARGUMENT, "PURPOSES_REQUIRED")
    batch = codegen.stub.IssueTokenBatch(pb.IssueTokenBatchRequest(tenant_id=tenant_id, member_id=member_id))
    assert await refused(batch) == (grpc.StatusCode.INVALID_ARGUMENT, "PURPOSES_REQUIRED")


async def test_the_same_request_twice_in_a_second_answers_the_same_credential(codegen, tenant_id, member_id):
    # Ed25519 is deterministic and a holder credential's id comes from its bytes, so a retried
    # request within the second makes the very same credential: answered again, not a fault.
    key = holder_key()
    for _ in range(20):
        first = await issue(codegen.stub, tenant_id, member_id, key=key)
        second = await issue(codegen.stub, tenant_id, member_id, key=key)
        if first.credential.not_before == second.credential.not_before:
            break
    else:
        raise AssertionError("never two issues within one second")
    assert first.credential_bytes == second.credential_bytes
    assert first.credential.credential_id == second.credential.credential_id
    await codegen.stub.RevokeCredential(pb.RevokeCredentialRequest(tenant_id=tenant_id,
                                                                   credential_id=first.credential.credential_id))
    try:
        answer = await issue(codegen.stub, tenant_id, member_id, key=key)
    except grpc.aio.AioRpcError as error:
        # Within the same second: the revoked twin is not handed out.
        assert (error.code(), error_info(error)[0]) == (grpc.StatusCode.FAILED_PRECONDITION, "CREDENTIAL_REVOKED")
    else:
        # A second later: a new credential.
        assert answer.credential.credential_id != first.credential.credential_id
