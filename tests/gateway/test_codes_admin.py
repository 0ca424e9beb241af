"""The e-code's administration through the gateway (scope codes:admin): tenant code settings,
issuer key rotation and revocation, against the real identity and codegen."""
from __future__ import annotations

import base64
import time
import uuid
from datetime import datetime

import nacl.signing

import onecard_codes as sdk
from gateway.auth import CODES_ADMIN, CODES_ISSUE, DEVICES_SYNC
from onecard.identity.v1 import identity_pb2 as pb
from onecard_codes.verify import Verifier
from tests.gateway.conftest import Gateway, TenantAccess, assert_problem


async def _member(gateway: Gateway, tenant_id: str, number: str) -> str:
    answer = await gateway.stub.CreateMember(pb.CreateMemberRequest(tenant_id=tenant_id, external_number=number,
                                                                    name="Code Holder"))
    return answer.member.member_id


async def _accesses(gateway: Gateway) -> tuple[TenantAccess, TenantAccess, TenantAccess]:
    admin = await gateway.tenant_access(scopes=(CODES_ADMIN,))
    bank = await gateway.tenant_access(tenant_id=admin.tenant_id, scopes=(CODES_ISSUE,))
    device = await gateway.tenant_access(tenant_id=admin.tenant_id, scopes=(DEVICES_SYNC,))
    return admin, bank, device


def _phone_key(phone: nacl.signing.SigningKey) -> str:
    return base64.b64encode(bytes(phone.verify_key)).decode()


async def _verifier(gateway: Gateway, device: TenantAccess) -> Verifier:
    """A device's verifier, from what it syncs over REST."""
    tenant_id = device.tenant_id
    trust = (await gateway.http.get(f"/v1/tenants/{tenant_id}/trust-list", headers=device.headers)).json()
    revoked = (await gateway.http.get(f"/v1/tenants/{tenant_id}/revocations", headers=device.headers)).json()
    revocations = sdk.Revocations()
    for entry in revoked["entries"]:
        revocations.revoke_credential(credential_id=uuid.UUID(entry["credential_id"]))
    keys = tuple(sdk.TrustedKey(tenant_id=uuid.UUID(tenant_id), public_key=base64.b64decode(k["public_key"]))
                 for k in trust["keys"] if k["status"] != "retired")
    return Verifier(trust_list=sdk.TrustList(keys=keys, fetched_at_s=int(time.time()), version=trust["version"]),
                    revocations=revocations)


async def test_an_admin_sets_the_caps_and_new_credentials_carry_them(codes_gateway: Gateway) -> None:
    gateway = codes_gateway
    admin, bank, device = await _accesses(gateway)
    tenant_id = admin.tenant_id
    url = f"/v1/tenants/{tenant_id}/code-settings"
    defaults = await gateway.http.get(url, headers=admin.headers)
    assert defaults.status_code == 200, defaults.text
    assert defaults.json() == {"caps": {"per_transaction_fen": 5000, "per_day_fen": 20000, "per_day_count": 20},
                               "default_credential_validity_hours": 24, "default_purposes": [], "updated_at": None}

    chosen = {"caps": {"per_transaction_fen": 1500, "per_day_fen": 6000, "per_day_count": 12},
              "default_credential_validity_hours": 8, "default_purposes": ["access", "pay"]}
    put = await gateway.http.put(url, headers=admin.headers, json=chosen)
    assert put.status_code == 200, put.text
    assert put.json()["default_purposes"] == ["pay", "access"]
    assert datetime.fromisoformat(put.json()["updated_at"])
    assert (await gateway.http.get(url, headers=admin.headers)).json() == put.json()

    # A bank names neither purposes nor validity: the tenant's defaults, and its caps in the bytes.
    member_id = await _member(gateway, tenant_id, "A100")
    phone = nacl.signing.SigningKey.generate()
    issued = await gateway.http.post(f"/v1/tenants/{tenant_id}/members/{member_id}/credentials",
                                     headers=bank.headers, json={"holder_public_key": _phone_key(phone)})
    assert issued.status_code == 201, issued.text
    credential = issued.json()["credential"]
    assert credential["caps"] == chosen["caps"]
    assert credential["purposes"] == ["pay", "access"]
    lifetime = (datetime.fromisoformat(credential["not_after"]) - datetime.fromisoformat(credential["not_before"]))
    assert lifetime.total_seconds() == 8 * 3600
    now_s = int(time.time())
    code = sdk.make_holder_code(credential_bytes=base64.b64decode(issued.json()["credential_base64"]),
                                holder_signing_key=phone, now_s=now_s, counter=1, purpose=sdk.Purpose.PAY)
    verified = (await _verifier(gateway, device)).verify(code, now_s=now_s, expected_tenant_id=uuid.UUID(tenant_id),
                                                          purpose=sdk.Purpose.PAY)
    assert verified.ok, verified
    assert verified.caps == sdk.OfflineCaps(per_transaction_fen=1500, per_day_fen=6000, count_per_day=12)


async def test_settings_the_format_cannot_carry_or_that_disagree_are_problems(codes_gateway: Gateway) -> None:
    gateway = codes_gateway
    admin = await gateway.tenant_access(scopes=(CODES_ADMIN,))
    url = f"/v1/tenants/{admin.tenant_id}/code-settings"
    good = {"caps": {"per_transaction_fen": 100, "per_day_fen": 1000, "per_day_count": 10},
            "default_credential_validity_hours": 24}
    # Caps that agree with each other are checked by codegen: a typed 400.
    assert_problem(await gateway.http.put(url, headers=admin.headers, json={
        **good, "caps": {**good["caps"], "per_transaction_fen": 1001}}), 400, reason="CAPS_INCONSISTENT")
    # Out of the format's fields or the schema: 422 before codegen is asked.
    for bad in ({**good, "caps": {**good["caps"], "per_day_count": 256}},
                {**good, "caps": {**good["caps"], "per_day_fen": 2**32}},
                {**good, "default_credential_validity_hours": 73},
                {**good, "default_credential_validity_hours": 0},
                {**good, "default_purposes": ["teleport"]},
                {"default_credential_validity_hours": 24},
                {**good, "surprise": 1}):
        assert_problem(await gateway.http.put(url, headers=admin.headers, json=bad), 422,
                       reason="VALIDATION_FAILED")
    assert_problem(await gateway.http.put(url, headers=admin.headers, json={
        **good, "default_purposes": ["pay", "pay"]}), 400, reason="PURPOSE_REPEATED")
    assert (await gateway.http.get(url, headers=admin.headers)).json()["updated_at"] is None


async def test_rotation_keeps_the_old_key_verifying_until_its_credentials_end(codes_gateway: Gateway) -> None:
    gateway = codes_gateway
    admin, bank, device = await _accesses(gateway)
    tenant_id = admin.tenant_id
    rotate = f"/v1/tenants/{tenant_id}/issuer-keys/rotate"
    first = await gateway.http.post(rotate, headers=admin.headers)
    assert first.status_code == 200, first.text
    assert first.json()["previous_key"] is None
    assert first.json()["signing_key"]["status"] == "signing"

    member_id = await _member(gateway, tenant_id, "A200")
    phone = nacl.signing.SigningKey.generate()
    issued = (await gateway.http.post(f"/v1/tenants/{tenant_id}/members/{member_id}/credentials",
                                      headers=bank.headers, json={"holder_public_key": _phone_key(phone),
                                                                  "purposes": ["pay"], "validity_s": 3600})).json()
    second = (await gateway.http.post(rotate, headers=admin.headers)).json()
    previous = second["previous_key"]
    assert (previous["key_id"], previous["status"]) == (first.json()["signing_key"]["key_id"], "verifying")
    assert previous["retire_after"] == issued["credential"]["not_after"]
    assert second["signing_key"]["key_id"] != previous["key_id"]
    assert second["trust_list_version"] > first.json()["trust_list_version"]

    # A device that syncs now still accepts the code signed with the old key.
    now_s = int(time.time())
    code = sdk.make_holder_code(credential_bytes=base64.b64decode(issued["credential_base64"]),
                                holder_signing_key=phone, now_s=now_s, counter=1, purpose=sdk.Purpose.PAY)
    verified = (await _verifier(gateway, device)).verify(code, now_s=now_s, expected_tenant_id=uuid.UUID(tenant_id),
                                                          purpose=sdk.Purpose.PAY)
    assert verified.ok, verified


async def test_revoking_a_credential_and_all_of_a_members(codes_gateway: Gateway) -> None:
    gateway = codes_gateway
    admin, bank, device = await _accesses(gateway)
    tenant_id = admin.tenant_id
    member_id = await _member(gateway, tenant_id, "A300")
    phone = nacl.signing.SigningKey.generate()
    credentials_url = f"/v1/tenants/{tenant_id}/members/{member_id}/credentials"
    # Different validities, so the two are different credentials even within one second.
    issued = [(await gateway.http.post(credentials_url, headers=bank.headers,
                                       json={"holder_public_key": _phone_key(phone), "purposes": ["pay"],
                                             "validity_s": validity_s})).json()
              for validity_s in (3600, 7200)]
    batch = (await gateway.http.post(f"/v1/tenants/{tenant_id}/members/{member_id}/token-batches",
                                     headers=bank.headers, json={"purposes": ["pay"], "hours": 1})).json()

    one = issued[0]["credential"]["credential_id"]
    revoked = await gateway.http.post(f"/v1/tenants/{tenant_id}/credentials/{one}/revoke", headers=admin.headers,
                                      json={"reason": "phone stolen"})
    assert revoked.status_code == 200, revoked.text
    entry = revoked.json()
    assert (entry["credential_id"], entry["member_id"], entry["reason"], entry["version"]) == (
        one, member_id, "requested", 1)
    # Idempotent, and the body is optional.
    again = await gateway.http.post(f"/v1/tenants/{tenant_id}/credentials/{one}/revoke", headers=admin.headers)
    assert again.json() == entry

    now_s = int(time.time())
    verifier = await _verifier(gateway, device)
    code = sdk.make_holder_code(credential_bytes=base64.b64decode(issued[0]["credential_base64"]),
                                holder_signing_key=phone, now_s=now_s, counter=1, purpose=sdk.Purpose.PAY)
    refused = verifier.verify(code, now_s=now_s, expected_tenant_id=uuid.UUID(tenant_id), purpose=sdk.Purpose.PAY)
    assert refused.reason is sdk.Reason.REVOKED

    everything = await gateway.http.post(f"{credentials_url}/revoke", headers=admin.headers)
    assert everything.status_code == 200, everything.text
    assert {e["credential_id"] for e in everything.json()["revocations"]} == {
        issued[1]["credential"]["credential_id"], batch["credential"]["credential_id"]}
    assert {e["reason"] for e in everything.json()["revocations"]} == {"member_revoked"}
    assert (await gateway.http.post(f"{credentials_url}/revoke", headers=admin.headers)).json() == {
        "revocations": []}
    listed = (await gateway.http.get(f"/v1/tenants/{tenant_id}/revocations", headers=device.headers)).json()
    assert (len(listed["entries"]), listed["version"]) == (3, 3)

    assert_problem(await gateway.http.post(f"/v1/tenants/{tenant_id}/credentials/{uuid.uuid4()}/revoke",
                                           headers=admin.headers), 404, reason="CREDENTIAL_NOT_FOUND")
    assert_problem(await gateway.http.post(f"/v1/tenants/{tenant_id}/credentials/zz/revoke",
                                           headers=admin.headers), 400, reason="CREDENTIAL_ID_INVALID")
    assert_problem(await gateway.http.post(f"/v1/tenants/{tenant_id}/members/{uuid.uuid4()}/credentials/revoke",
                                           headers=admin.headers), 404, reason="MEMBER_NOT_FOUND")
    assert_problem(await gateway.http.post(f"/v1/tenants/{tenant_id}/credentials/{one}/revoke",
                                           headers=admin.headers, json={"reason": "x" * 201}), 422)
    # Issuing is not administering: a bank's token cannot revoke.
    assert_problem(await gateway.http.post(f"{credentials_url}/revoke", headers=bank.headers), 403,
                   reason="INSUFFICIENT_SCOPE")
