"""The e-code through the gateway: a bank client issues for a member of its tenant, a device
syncs the trust list and revocations, and the codes verify with the SDK."""
from __future__ import annotations

import base64
import time
import uuid

import nacl.signing

import onecard_codes as sdk
from gateway.auth import CODES_ISSUE, DEVICES_SYNC
from onecard.codegen.v1 import codegen_pb2 as cpb
from onecard.identity.v1 import identity_pb2 as pb
from onecard_codes.verify import Verifier
from tests.gateway.conftest import Gateway, assert_problem


async def _member(gateway: Gateway, tenant_id: str, number: str) -> str:
    answer = await gateway.stub.CreateMember(pb.CreateMemberRequest(tenant_id=tenant_id, external_number=number,
                                                                    name="Code Holder"))
    return answer.member.member_id


async def test_a_bank_issues_a_credential_and_a_device_verifies_its_code_from_the_synced_lists(
        codes_gateway: Gateway) -> None:
    gateway = codes_gateway
    bank = await gateway.tenant_access(scopes=(CODES_ISSUE,))
    tenant_id = bank.tenant_id
    device = await gateway.tenant_access(tenant_id=tenant_id, scopes=(DEVICES_SYNC,))
    member_id = await _member(gateway, tenant_id, "C100")
    phone = nacl.signing.SigningKey.generate()

    response = await gateway.http.post(
        f"/v1/tenants/{tenant_id}/members/{member_id}/credentials", headers=bank.headers,
        json={"holder_public_key": base64.b64encode(bytes(phone.verify_key)).decode(), "purposes": ["pay"],
              "validity_s": 7200})
    assert response.status_code == 201, response.text
    issued = response.json()
    assert issued["credential"]["member_id"] == member_id
    assert issued["credential"]["purposes"] == ["pay"]

    trust = await gateway.http.get(f"/v1/tenants/{tenant_id}/trust-list", headers=device.headers)
    assert trust.status_code == 200, trust.text
    assert trust.json()["version"] == 1
    [key] = trust.json()["keys"]
    assert (key["status"], key["key_id"]) == ("signing", issued["credential"]["key_id"])
    revoked = await gateway.http.get(f"/v1/tenants/{tenant_id}/revocations", headers=device.headers)
    assert revoked.json() == {"entries": [], "version": 0, "more": False}

    now_s = int(time.time())
    code = sdk.make_holder_code(credential_bytes=base64.b64decode(issued["credential_base64"]),
                                holder_signing_key=phone, now_s=now_s, counter=1, purpose=sdk.Purpose.PAY)
    trust_list = sdk.TrustList(keys=(sdk.TrustedKey(tenant_id=uuid.UUID(tenant_id),
                                                    public_key=base64.b64decode(key["public_key"])),),
                               fetched_at_s=now_s, version=1)
    result = Verifier(trust_list=trust_list).verify(code, now_s=now_s, expected_tenant_id=uuid.UUID(tenant_id),
                                                    purpose=sdk.Purpose.PAY)
    assert result.ok, result

    await gateway.codegen_stub.RevokeCredential(cpb.RevokeCredentialRequest(  # type: ignore[attr-defined]
        tenant_id=tenant_id, credential_id=issued["credential"]["credential_id"]))
    revoked = (await gateway.http.get(f"/v1/tenants/{tenant_id}/revocations", params={"since_version": 0},
                                      headers=device.headers)).json()
    assert [e["credential_id"] for e in revoked["entries"]] == [issued["credential"]["credential_id"]]
    assert revoked["version"] == 1


async def test_token_batches_and_refusals_come_back_as_problems(codes_gateway: Gateway) -> None:
    gateway = codes_gateway
    bank = await gateway.tenant_access(scopes=(CODES_ISSUE,))
    tenant_id = bank.tenant_id
    member_id = await _member(gateway, tenant_id, "C200")
    response = await gateway.http.post(f"/v1/tenants/{tenant_id}/members/{member_id}/token-batches",
                                       headers=bank.headers, json={"purposes": ["ride"], "hours": 2,
                                                                   "slot_length_s": 120})
    assert response.status_code == 201, response.text
    batch = response.json()
    assert (len(batch["tokens"]), batch["slot_length_s"]) == (60, 120)
    assert batch["tokens"][0]["code"].startswith("OC1:")

    base = f"/v1/tenants/{tenant_id}/members/{member_id}"
    assert_problem(await gateway.http.post(f"{base}/credentials", headers=bank.headers,
                                           json={"holder_public_key": "not base64!", "purposes": ["pay"]}),
                   400, reason="HOLDER_KEY_INVALID")
    assert_problem(await gateway.http.post(f"{base}/credentials", headers=bank.headers,
                                           json={"holder_public_key": base64.b64encode(b"x" * 31).decode(),
                                                 "purposes": ["pay"]}),
                   400, reason="HOLDER_KEY_INVALID")
    assert_problem(await gateway.http.post(f"{base}/token-batches", headers=bank.headers,
                                           json={"purposes": ["pay"], "hours": 25}), 422)
    await gateway.stub.FreezeMember(pb.FreezeMemberRequest(tenant_id=tenant_id, member_id=member_id))
    assert_problem(await gateway.http.post(f"{base}/token-batches", headers=bank.headers,
                                           json={"purposes": ["pay"]}), 409, reason="MEMBER_FROZEN")
    assert_problem(await gateway.http.post(f"/v1/tenants/{tenant_id}/members/{uuid.uuid4()}/token-batches",
                                           headers=bank.headers, json={"purposes": ["pay"]}),
                   404, reason="MEMBER_NOT_FOUND")
