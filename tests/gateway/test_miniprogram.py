"""Mini-program backends over REST (docs/miniprograms.md): bindings of a partner's own openids,
self-service with a PIN, and what never leaves onecard (the PIN, in answers and in logs)."""
from __future__ import annotations

import io
import json
from urllib.parse import quote

import nacl.signing

from gateway.auth import MEMBERS_BIND, MEMBERS_READ, MEMBERS_SELF_SERVICE, MEMBERS_WRITE
from onecard.codegen.v1 import codegen_pb2 as cpb
from onecard.identity.v1 import identity_pb2 as pb
from runtime.logs import configure_logging
from tests.codegen.support import eventually
from tests.gateway.conftest import Gateway, TenantAccess, assert_problem

# An openid with characters a path could not carry plainly.
OPENID = "oUpF8/uMu+AJO?M2=pxb#1Q9%zN&jWeS6o"
PIN = "402913"
NEW_PIN = "880417"
WRONG_PIN = "551207"


async def _member(gateway: Gateway, tenant_id: str, number: str) -> str:
    answer = await gateway.stub.CreateMember(pb.CreateMemberRequest(tenant_id=tenant_id, external_number=number,
                                                                    name=f"Person {number}"))
    return answer.member.member_id


async def _bind(gateway: Gateway, access: TenantAccess, member_id: str, openid: str = OPENID):  # noqa: ANN202
    return await gateway.http.put(f"/v1/tenants/{access.tenant_id}/members/{member_id}/external-user",
                                  json={"external_user_id": openid}, headers=access.headers)


async def _lookup(gateway: Gateway, access: TenantAccess, openid: str = OPENID):  # noqa: ANN202
    return await gateway.http.get(f"/v1/tenants/{access.tenant_id}/members/by-external-user",
                                  params={"external_user_id": openid}, headers=access.headers)


async def _self(gateway: Gateway, access: TenantAccess, action: str, **body: str):  # noqa: ANN202
    payload = {"external_user_id": OPENID, "attestation_id": "wx-session-1", **body}
    method = "PUT" if action == "pin" else "POST"
    return await gateway.http.request(method, f"/v1/tenants/{access.tenant_id}/self-service/{action}",
                                      json=payload, headers=access.headers)


async def test_a_partner_binds_looks_up_and_unbinds_its_own_openids(gateway: Gateway) -> None:
    partner = await gateway.tenant_access(scopes=[MEMBERS_BIND])
    other_partner = await gateway.tenant_access(tenant_id=partner.tenant_id, scopes=[MEMBERS_BIND])
    member_id = await _member(gateway, partner.tenant_id, "S1")
    bound = await _bind(gateway, partner, member_id)
    assert bound.status_code == 200, bound.text
    assert bound.json()["binding"]["external_user_id"] == OPENID and bound.json()["replaced"] is None

    found = await _lookup(gateway, partner)
    assert found.status_code == 200, found.text
    assert found.json()["member"]["member_id"] == member_id
    assert found.json()["binding"]["member_id"] == member_id
    # The same openid means nothing at another partner.
    assert_problem(await _lookup(gateway, other_partner), 404, reason="BINDING_NOT_FOUND")
    assert_problem(await gateway.http.delete(f"/v1/tenants/{partner.tenant_id}/members/{member_id}/external-user",
                                             headers=other_partner.headers), 404, reason="BINDING_NOT_FOUND")
    # The openid also works in a raw, percent-encoded query string.
    raw = await gateway.http.get(f"/v1/tenants/{partner.tenant_id}/members/by-external-user?external_user_id="
                                 f"{quote(OPENID, safe='')}", headers=partner.headers)
    assert raw.json()["member"]["member_id"] == member_id

    replaced = await _bind(gateway, partner, member_id, "openid-2")
    assert replaced.json()["replaced"]["external_user_id"] == OPENID
    assert replaced.json()["replaced"]["unbound_at"] is not None
    gone = await gateway.http.delete(f"/v1/tenants/{partner.tenant_id}/members/{member_id}/external-user",
                                     headers=partner.headers)
    assert gone.status_code == 204
    assert_problem(await _lookup(gateway, partner, "openid-2"), 404, reason="BINDING_NOT_FOUND")

    await gateway.stub.MarkMemberLeft(pb.MarkMemberLeftRequest(tenant_id=partner.tenant_id, member_id=member_id))
    assert_problem(await _bind(gateway, partner, member_id), 409, reason="MEMBER_LEFT")
    assert_problem(await _bind(gateway, partner, member_id, "has space"), 400, reason="EXTERNAL_USER_ID_INVALID")


async def test_self_service_with_a_pin_end_to_end_never_shows_the_pin(gateway: Gateway) -> None:
    partner = await gateway.tenant_access(scopes=[MEMBERS_BIND, MEMBERS_SELF_SERVICE])
    admin = await gateway.tenant_access(tenant_id=partner.tenant_id, scopes=[MEMBERS_WRITE])
    member_id = await _member(gateway, partner.tenant_id, "S1")
    await _bind(gateway, partner, member_id)
    logs = io.StringIO()
    configure_logging(service="tests", level="debug", stream=logs)
    answers: list[str] = []
    try:
        first = await _self(gateway, partner, "pin", new_pin=PIN)
        assert (first.status_code, first.json()) == (200, {"first": True})
        frozen = await _self(gateway, partner, "freeze")
        assert (frozen.json()["status"], frozen.json()["frozen_by"]) == ("frozen", "member")
        wrong = await _self(gateway, partner, "unfreeze", pin=WRONG_PIN)
        assert assert_problem(wrong, 403, reason="PIN_INCORRECT")["attempts_left"] == 4
        answers += [first.text, frozen.text, wrong.text]
        changed = await _self(gateway, partner, "pin", new_pin=NEW_PIN, old_pin=PIN)
        assert changed.json() == {"first": False}
        unfrozen = await _self(gateway, partner, "unfreeze", pin=NEW_PIN)
        assert (unfrozen.json()["status"], unfrozen.json()["frozen_by"]) == ("active", None)
        answers += [changed.text, unfrozen.text]

        await _self(gateway, partner, "freeze")
        for _ in range(4):
            answers.append((await _self(gateway, partner, "unfreeze", pin=WRONG_PIN)).text)
        locked = await _self(gateway, partner, "unfreeze", pin=WRONG_PIN)
        body = assert_problem(locked, 429, reason="PIN_LOCKED")
        assert body["retry_after_s"] == 900 and locked.headers["retry-after"] == "900"
        still = await _self(gateway, partner, "unfreeze", pin=NEW_PIN)
        assert_problem(still, 429, reason="PIN_LOCKED")
        answers += [locked.text, still.text]

        # The school's admin clears the forgotten PIN; the member sets a new first one.
        reset = await gateway.http.delete(f"/v1/tenants/{partner.tenant_id}/members/{member_id}/pin",
                                          headers=admin.headers)
        assert reset.status_code == 204
        assert (await _self(gateway, partner, "pin", new_pin=PIN)).json() == {"first": True}
        assert (await _self(gateway, partner, "unfreeze", pin=PIN)).json()["status"] == "active"
        # A malformed PIN is refused by the schema or by identity, never echoed.
        bad = await _self(gateway, partner, "unfreeze", pin="x" * 17)
        assert_problem(bad, 422, reason="VALIDATION_FAILED")
        answers.append(bad.text)
    finally:
        configure_logging(service="tests", level="warning")
    logged = logs.getvalue()
    assert "self-service" in logged, "the requests were logged at all"
    for secret in (PIN, NEW_PIN, WRONG_PIN, "x" * 17):
        assert secret not in logged
        assert all(secret not in answer for answer in answers)


async def test_the_member_cannot_lift_the_schools_freeze(gateway: Gateway) -> None:
    partner = await gateway.tenant_access(scopes=[MEMBERS_BIND, MEMBERS_SELF_SERVICE])
    member_id = await _member(gateway, partner.tenant_id, "S1")
    await _bind(gateway, partner, member_id)
    await _self(gateway, partner, "pin", new_pin=PIN)
    await gateway.stub.FreezeMember(pb.FreezeMemberRequest(tenant_id=partner.tenant_id, member_id=member_id,
                                                           reason="unpaid fees"))
    assert_problem(await _self(gateway, partner, "unfreeze", pin=PIN), 409, reason="FROZEN_BY_TENANT")
    card = await gateway.stub.BindCard(pb.BindCardRequest(tenant_id=partner.tenant_id, member_id=member_id,
                                                          card_uid="0A0B0C0D"))
    assert card.member.cards[0].status == pb.CARD_STATUS_ACTIVE
    lost = await _self(gateway, partner, "report-card-lost")
    assert lost.json()["cards"][0]["status"] == "lost"


async def test_a_self_service_freeze_revokes_the_members_codes(codes_gateway: Gateway) -> None:
    gateway = codes_gateway
    partner = await gateway.tenant_access(scopes=[MEMBERS_BIND, MEMBERS_SELF_SERVICE])
    member_id = await _member(gateway, partner.tenant_id, "S1")
    await _bind(gateway, partner, member_id)
    codegen = gateway.codegen_stub  # type: ignore[attr-defined]
    issued = await codegen.IssueCredential(cpb.IssueCredentialRequest(
        tenant_id=partner.tenant_id, member_id=member_id,
        holder_public_key=bytes(nacl.signing.SigningKey.generate().verify_key), purposes=[cpb.PURPOSE_PAY]))
    assert (await _self(gateway, partner, "freeze")).status_code == 200

    async def revoked() -> list[cpb.RevocationEntry] | None:
        answer = await codegen.GetRevocations(cpb.GetRevocationsRequest(tenant_id=partner.tenant_id))
        return list(answer.entries) or None

    entries = await eventually(revoked, what="the credential revoked after the self-service freeze")
    assert [(e.credential_id, e.reason) for e in entries] == [(issued.credential.credential_id, "member_frozen")]
    assert json.loads(json.dumps([e.member_id for e in entries])) == [member_id]


async def test_the_school_requires_first_pins_at_its_office(gateway: Gateway) -> None:
    partner = await gateway.tenant_access(scopes=[MEMBERS_BIND, MEMBERS_SELF_SERVICE])
    admin = await gateway.tenant_access(tenant_id=partner.tenant_id, scopes=[MEMBERS_READ, MEMBERS_WRITE])
    member_id = await _member(gateway, partner.tenant_id, "S1")
    await _bind(gateway, partner, member_id)
    settings_url = f"/v1/tenants/{partner.tenant_id}/self-service-settings"
    assert (await gateway.http.get(settings_url, headers=admin.headers)).json() == {
        "first_pin_by_admin": False, "updated_at": None}
    updated = await gateway.http.put(settings_url, json={"first_pin_by_admin": True}, headers=admin.headers)
    assert updated.json()["first_pin_by_admin"] is True and updated.json()["updated_at"] is not None
    assert_problem(await _self(gateway, partner, "pin", new_pin=PIN), 409, reason="FIRST_PIN_BY_ADMIN")
    office = await gateway.http.put(f"/v1/tenants/{partner.tenant_id}/members/{member_id}/pin", json={"pin": PIN},
                                    headers=admin.headers)
    assert office.status_code == 204 and PIN not in office.text
    assert (await _self(gateway, partner, "pin", new_pin=NEW_PIN, old_pin=PIN)).json() == {"first": False}
