"""The member code page's API (gateway.routes.codepage, docs/partners.md "Member code page"):
one-time links, their single exchange for a member token, and what a member token may reach,
against the real identity, codegen and ledger."""
from __future__ import annotations

import base64
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import nacl.signing
import pytest

from gateway.auth import CODES_ISSUE, MEMBERS_CODE_PAGE, WALLETS_READ, WALLETS_TOPUP, LEDGER_ADMIN
from gateway.routes.codepage import LINK_TTL_S, PAGE_HEADERS
from onecard.identity.v1 import identity_pb2 as pb
from services.identity import codepage
from runtime.errors import DomainError
from services.identity.domain import MemberStatus
from tests.gateway.conftest import Gateway, TenantAccess, assert_problem, gateway_settings, running_gateway

@pytest.fixture
async def page_gateway(identity: Any, codegen_service: Any, ledger_service: Any) -> AsyncIterator[Gateway]:
    """The gateway in front of identity, a real codegen and a real ledger; it asks identity for the
    grant behind a token on every call, so a changed grant shows at once."""
    settings = gateway_settings(identity_target=identity.target, codegen_target=codegen_service.target,
                                ledger_target=ledger_service.target, grant_recheck_s=0.001)
    async with running_gateway(settings) as (app, http):
        yield Gateway(app=app, http=http, stub=identity.stub, settings=settings)


async def member(gateway: Gateway, tenant_id: str, number: str) -> str:
    answer = await gateway.stub.CreateMember(pb.CreateMemberRequest(tenant_id=tenant_id, external_number=number,
                                                                    name=f"Page Holder {number}"))
    return answer.member.member_id


async def make_link(gateway: Gateway, partner: TenantAccess, member_id: str, *, key: str | None = None
                    ) -> httpx.Response:
    return await gateway.http.post(f"/v1/tenants/{partner.tenant_id}/members/{member_id}/code-page-links",
                                   headers={**partner.headers, "Idempotency-Key": key or str(uuid.uuid4())})


def session_body(url: str) -> dict[str, str]:
    """What the page sends: the link's fragment, '<tenant_id>.<secret>', in its two parts."""
    tenant_id, secret = url.split("#", 1)[1].split(".", 1)
    return {"tenant_id": tenant_id, "link_secret": secret}


def secret_of(url: str) -> str:
    return session_body(url)["link_secret"]


async def exchange(gateway: Gateway, url: str) -> httpx.Response:
    return await gateway.http.post("/v1/code-page/sessions", json=session_body(url))


async def member_session(gateway: Gateway, partner: TenantAccess, member_id: str) -> dict[str, str]:
    link = await make_link(gateway, partner, member_id)
    assert link.status_code == 201, link.text
    session = await exchange(gateway, link.json()["url"])
    assert session.status_code == 201, session.text
    return {"Authorization": f"Bearer {session.json()['access_token']}"}


async def test_a_link_is_exchanged_once_for_a_token_of_that_member(page_gateway: Gateway) -> None:
    partner = await page_gateway.tenant_access(scopes=(MEMBERS_CODE_PAGE,))
    member_id = await member(page_gateway, partner.tenant_id, "P-1")

    link = await make_link(page_gateway, partner, member_id)
    assert link.status_code == 201, link.text
    body = link.json()
    assert body["url"].startswith(f"http://gateway.test/m/#{partner.tenant_id}.") and body["created"] is True
    assert link.headers["cache-control"] == "no-store"
    expires_at = datetime.fromisoformat(body["expires_at"])
    assert timedelta(0) < expires_at - datetime.now(UTC) <= timedelta(seconds=LINK_TTL_S)

    # The secret under another tenant is no link at all, and uses nothing up.
    elsewhere = await page_gateway.create_tenant(name="Elsewhere")
    moved = await page_gateway.http.post("/v1/code-page/sessions",
                                         json={**session_body(body["url"]), "tenant_id": elsewhere})
    assert_problem(moved, 404, reason="LINK_NOT_FOUND")
    first = await exchange(page_gateway, body["url"])
    assert first.status_code == 201, first.text
    assert first.json()["member_id"] == member_id and first.json()["tenant_id"] == partner.tenant_id
    second = await exchange(page_gateway, body["url"])
    assert_problem(second, 409, reason="LINK_USED")
    unknown = await page_gateway.http.post("/v1/code-page/sessions",
                                           json={"tenant_id": partner.tenant_id, "link_secret": "A" * 43})
    assert_problem(unknown, 404, reason="LINK_NOT_FOUND")
    malformed = await page_gateway.http.post("/v1/code-page/sessions",
                                             json={"tenant_id": partner.tenant_id, "link_secret": "not a secret"})
    assert_problem(malformed, 422)
    no_tenant = await page_gateway.http.post("/v1/code-page/sessions",
                                             json={"tenant_id": "x", "link_secret": secret_of(body["url"])})
    assert_problem(no_tenant, 400, reason="TENANT_ID_INVALID")


async def test_the_same_key_answers_the_same_link_and_another_member_under_it_is_refused(
        page_gateway: Gateway) -> None:
    partner = await page_gateway.tenant_access(scopes=(MEMBERS_CODE_PAGE,))
    member_id = await member(page_gateway, partner.tenant_id, "P-1")
    other_id = await member(page_gateway, partner.tenant_id, "P-2")

    first = await make_link(page_gateway, partner, member_id, key="link-1")
    again = await make_link(page_gateway, partner, member_id, key="link-1")
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json() == {**first.json(), "created": False}
    assert_problem(await make_link(page_gateway, partner, other_id, key="link-1"), 409,
                   reason="IDEMPOTENCY_KEY_REUSED")
    missing = await page_gateway.http.post(
        f"/v1/tenants/{partner.tenant_id}/members/{member_id}/code-page-links", headers=partner.headers)
    assert_problem(missing, 400, reason="IDEMPOTENCY_KEY_REQUIRED")
    assert_problem(await make_link(page_gateway, partner, str(uuid.uuid4())), 404, reason="MEMBER_NOT_FOUND")
    # Another client's same key is its own: a different link.
    other_partner = await page_gateway.tenant_access(tenant_id=partner.tenant_id, scopes=(MEMBERS_CODE_PAGE,))
    theirs = await make_link(page_gateway, other_partner, member_id, key="link-1")
    assert theirs.status_code == 201 and secret_of(theirs.json()["url"]) != secret_of(first.json()["url"])


async def test_no_link_opens_for_a_member_who_left(page_gateway: Gateway) -> None:
    partner = await page_gateway.tenant_access(scopes=(MEMBERS_CODE_PAGE,))
    member_id = await member(page_gateway, partner.tenant_id, "P-1")
    unused = (await make_link(page_gateway, partner, member_id)).json()["url"]
    await page_gateway.stub.MarkMemberLeft(pb.MarkMemberLeftRequest(tenant_id=partner.tenant_id,
                                                                    member_id=member_id))
    assert_problem(await make_link(page_gateway, partner, member_id), 409, reason="MEMBER_LEFT")
    assert_problem(await exchange(page_gateway, unused), 409, reason="MEMBER_LEFT")


async def test_a_link_needs_the_code_page_scope(page_gateway: Gateway) -> None:
    partner = await page_gateway.tenant_access(scopes=(CODES_ISSUE,))
    member_id = await member(page_gateway, partner.tenant_id, "P-1")
    assert_problem(await make_link(page_gateway, partner, member_id), 403, reason="INSUFFICIENT_SCOPE")


async def test_a_member_token_acts_for_its_member_only(page_gateway: Gateway) -> None:
    partner = await page_gateway.tenant_access(scopes=(MEMBERS_CODE_PAGE,))
    bank = await page_gateway.tenant_access(tenant_id=partner.tenant_id, scopes=(WALLETS_READ, WALLETS_TOPUP))
    admin = await page_gateway.tenant_access(tenant_id=partner.tenant_id, scopes=(LEDGER_ADMIN,))
    response = await page_gateway.http.put(
        f"/v1/tenants/{admin.tenant_id}/api-clients/{bank.credentials.client_id}/clearing-account",
        headers=admin.headers, json={"credit_limit_fen": 1_000_000})
    assert response.status_code == 200, response.text
    mine = await member(page_gateway, partner.tenant_id, "P-1")
    theirs = await member(page_gateway, partner.tenant_id, "P-2")
    for member_id in (mine, theirs):
        top_up = await page_gateway.http.post(f"/v1/tenants/{bank.tenant_id}/members/{member_id}/top-ups",
                                              headers={**bank.headers, "Idempotency-Key": str(uuid.uuid4())},
                                              json={"amount_fen": 2500})
        assert top_up.status_code == 201, top_up.text
    headers = await member_session(page_gateway, partner, mine)
    tenant = f"/v1/tenants/{partner.tenant_id}"

    # Its own member: the same routes everyone calls.
    holder = nacl.signing.SigningKey.generate()
    issued = await page_gateway.http.post(
        f"{tenant}/members/{mine}/credentials", headers=headers,
        json={"holder_public_key": base64.b64encode(bytes(holder.verify_key)).decode(), "purposes": ["pay"]})
    assert issued.status_code == 201, issued.text
    assert issued.json()["credential"]["member_id"] == mine
    batch = await page_gateway.http.post(f"{tenant}/members/{mine}/token-batches", headers=headers,
                                         json={"hours": 1, "purposes": ["pay"]})
    assert batch.status_code == 201 and len(batch.json()["tokens"]) == 60
    balances = await page_gateway.http.get(f"{tenant}/members/{mine}/balances", headers=headers)
    assert balances.status_code == 200
    (cash,) = [p for p in balances.json()["purses"] if p["purse_kind"] == "cash"]
    assert cash["available_fen"] == 2500
    history = await page_gateway.http.get(f"{tenant}/accounts/{cash['account_id']}/transfers", headers=headers)
    assert history.status_code == 200 and [t["kind"] for t in history.json()["transfers"]] == ["top_up"]
    assert (await page_gateway.http.get(f"{tenant}/members/{mine}", headers=headers)).json()["member_id"] == mine

    # Another member: as if there were none.
    for method, path, body in [
        ("GET", f"{tenant}/members/{theirs}", None),
        ("GET", f"{tenant}/members/{theirs}/balances", None),
        ("POST", f"{tenant}/members/{theirs}/token-batches", {"hours": 1, "purposes": ["pay"]}),
        ("POST", f"{tenant}/members/{theirs}/credentials",
         {"holder_public_key": base64.b64encode(bytes(holder.verify_key)).decode()}),
        ("POST", f"{tenant}/members/{theirs}/cards/CARD-X/report-lost", None),
    ]:
        refused = await page_gateway.http.request(method, path, headers=headers, json=body)
        assert_problem(refused, 404, reason="MEMBER_NOT_FOUND")
    their_balances = await page_gateway.http.get(f"{tenant}/members/{theirs}/balances", headers=bank.headers)
    (their_cash,) = [p for p in their_balances.json()["purses"] if p["purse_kind"] == "cash"]
    refused = await page_gateway.http.get(f"{tenant}/accounts/{their_cash['account_id']}/transfers", headers=headers)
    assert_problem(refused, 404, reason="ACCOUNT_NOT_FOUND")

    # Any route not marked for member tokens, even with the member's own id in it.
    for method, path in [("GET", f"{tenant}/members"), ("GET", f"{tenant}/clearing-account"),
                         ("GET", f"{tenant}/accounts/{cash['account_id']}"),
                         ("POST", f"{tenant}/members/{mine}/freeze"),
                         ("POST", f"{tenant}/members/{mine}/code-page-links")]:
        refused = await page_gateway.http.request(method, path, headers=headers)
        assert_problem(refused, 403, reason="MEMBER_TOKEN_NOT_ALLOWED")
    other_tenant = await page_gateway.create_tenant(name="Elsewhere")
    assert_problem(await page_gateway.http.get(f"/v1/tenants/{other_tenant}/members/{mine}/balances",
                                               headers=headers), 404, reason="TENANT_NOT_FOUND")


async def test_the_member_reports_their_card_lost_from_the_page(page_gateway: Gateway) -> None:
    partner = await page_gateway.tenant_access(scopes=(MEMBERS_CODE_PAGE,))
    member_id = await member(page_gateway, partner.tenant_id, "P-1")
    await page_gateway.stub.BindCard(pb.BindCardRequest(tenant_id=partner.tenant_id, member_id=member_id,
                                                        card_uid="04A224B2C35E80"))
    headers = await member_session(page_gateway, partner, member_id)
    lost = await page_gateway.http.post(
        f"/v1/tenants/{partner.tenant_id}/members/{member_id}/cards/04A224B2C35E80/report-lost", headers=headers)
    assert lost.status_code == 200, lost.text
    assert [c["status"] for c in lost.json()["cards"]] == ["lost"]


async def test_a_revoked_grant_ends_links_and_member_tokens(page_gateway: Gateway) -> None:
    admin = await page_gateway.tenant_access()
    partner = await page_gateway.tenant_access(tenant_id=admin.tenant_id, scopes=(MEMBERS_CODE_PAGE, CODES_ISSUE))
    member_id = await member(page_gateway, partner.tenant_id, "P-1")
    headers = await member_session(page_gateway, partner, member_id)
    unused = (await make_link(page_gateway, partner, member_id)).json()["url"]

    narrowed = await page_gateway.http.put(
        f"/v1/tenants/{admin.tenant_id}/api-clients/{partner.credentials.client_id}/grant",
        headers=admin.headers, json={"scopes": [CODES_ISSUE]})
    assert narrowed.status_code == 200, narrowed.text
    refused = await page_gateway.http.get(f"/v1/tenants/{partner.tenant_id}/members/{member_id}/balances",
                                          headers=headers)
    assert_problem(refused, 401, reason="TOKEN_REVOKED")
    assert_problem(await exchange(page_gateway, unused), 403, reason="LINK_REVOKED")


async def test_the_page_is_served_with_its_headers_and_nothing_else_under_it(page_gateway: Gateway) -> None:
    page = await page_gateway.http.get("/m/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for name, value in PAGE_HEADERS.items():
        assert page.headers[name] == value
    for asset, media_type in [("app.js", "text/javascript"), ("sw.js", "text/javascript"),
                              ("manifest.webmanifest", "application/manifest+json")]:
        response = await page_gateway.http.get(f"/m/{asset}")
        assert response.status_code == 200 and response.headers["content-type"].startswith(media_type), asset
    assert_problem(await page_gateway.http.get("/m/missing.js"), 404)
    assert_problem(await page_gateway.http.get("/m/..%2Fauth.py"), 404)


# --- the rules, no I/O ---------------------------------------------------------------------------

NOW = datetime(2026, 9, 1, 8, 0, tzinfo=UTC)
LINK = codepage.CodePageLink(link_id=uuid.uuid4(), tenant_id=uuid.uuid4(), member_id=uuid.uuid4(), client_id="c",
                             secret_hash=b"\x00" * 32, created_at=NOW, expires_at=NOW + timedelta(seconds=300),
                             redeemed_at=None)


@pytest.mark.parametrize(("link", "status", "now", "reason"), [
    (None, MemberStatus.ACTIVE, NOW, "LINK_NOT_FOUND"),
    (LINK, MemberStatus.ACTIVE, NOW + timedelta(seconds=300), "LINK_EXPIRED"),
    (codepage.CodePageLink(**{**LINK.__dict__, "redeemed_at": NOW}), MemberStatus.ACTIVE, NOW, "LINK_USED"),
    (LINK, MemberStatus.LEFT, NOW, "MEMBER_LEFT"),
])
def test_a_link_is_refused_when_unknown_late_used_or_its_member_left(link: Any, status: Any, now: datetime,
                                                                      reason: str) -> None:
    with pytest.raises(DomainError) as caught:
        codepage.refuse_redemption(link, status, now)
    assert caught.value.reason == reason


def test_a_link_is_redeemable_until_just_before_it_expires() -> None:
    codepage.refuse_redemption(LINK, MemberStatus.FROZEN, NOW + timedelta(seconds=299))
