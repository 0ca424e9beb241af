"""The console over plain HTTP (no browser), against the real gateway and services: the session
cookie's flags, CSRF on every POST, no token or secret in any page, a clean page for a client
without a page's scope, and tenant isolation over every console route (CONSOLE_ROUTE_CALLS, which
tests/gateway/test_isolation.py counts as the console's part of its route matrix)."""
from __future__ import annotations

import re
from contextlib import aclosing
import time
import uuid
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from gateway.auth import DATA_READ, DEVICES_ADMIN, LEDGER_ADMIN
from gateway.console.session import SESSION_COOKIE, SessionBox
from onecard.devicehub.v1 import devicehub_pb2 as dpb
from onecard.identity.v1 import identity_pb2 as ipb
from services.devicehub.alarms import Alarms
from tests.browser.console_support import Operator, operator
from tests.gateway.conftest import Gateway, assert_problem, gateway_settings

HTTP_BASE = "http://console.test"
HTTPS_BASE = "https://console.test"
CSRF_INPUT = re.compile(r'name="csrf_token" value="([^"]+)"')
# Every console route, with the ids it takes ({member_id}, {card_uid}, {batch_id}, {alarm_id}: the
# other tenant's in the isolation matrix), what it is sent, and its status when a session of tenant A
# sends tenant B's ids. A console route without an entry
# fails test_every_console_route_is_in_the_matrix (and tests/gateway/test_isolation.py).
CONSOLE_ROUTE_CALLS: dict[tuple[str, str], dict[str, Any]] = {
    ("GET", "/console"): {"status": 303},
    ("GET", "/console/static/{name:path}"): {"status": 200, "path": "/console/static/console.css"},
    ("GET", "/console/sign-in"): {"status": 200},
    ("POST", "/console/sign-in"): {"status": 401, "sign_in": True},
    ("POST", "/console/sign-out"): {"status": 303},
    ("GET", "/console/dining"): {"status": 200},
    ("GET", "/console/dining/chart"): {"status": 200},
    ("GET", "/console/terminals"): {"status": 200},
    ("POST", "/console/alarms/{alarm_id}/acknowledge"): {"status": 404},
    ("POST", "/console/alarms/{alarm_id}/clear"): {"status": 404},
    ("GET", "/console/rollouts"): {"status": 200},
    ("GET", "/console/subsidy-batches"): {"status": 200},
    ("POST", "/console/subsidy-batches"): {"status": 303, "upload": True},
    ("GET", "/console/subsidy-batches/{batch_id}"): {"status": 404},
    ("GET", "/console/subsidy-batches/{batch_id}/progress"): {"status": 404},
    ("GET", "/console/members"): {"status": 200, "params": {"q": "{external_number}"}},
    ("POST", "/console/members/{member_id}/freeze"): {"status": 404},
    ("POST", "/console/members/{member_id}/cards/{card_uid}/report-lost"): {"status": 404},
    ("GET", "/console/statements"): {"status": 404, "params": {"date": "2026-11-26", "subject": "merchant",
                                                "subject_id": "{merchant_account_id}"}},
    ("GET", "/console/statements/download"): {"status": 404, "params": {"date": "2026-11-26", "subject": "merchant",
                                                         "subject_id": "{merchant_account_id}"}},
}
CONSOLE_ROUTES = set(CONSOLE_ROUTE_CALLS)


def console_client(gateway: Gateway, *, base_url: str = HTTP_BASE) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway.app, raise_app_exceptions=False),
                             base_url=base_url)


async def signed_in(gateway: Gateway, who: Operator, *, base_url: str = HTTP_BASE) -> tuple[httpx.AsyncClient,
                                                                                           httpx.Response]:
    client = console_client(gateway, base_url=base_url)
    form = await client.get("/console/sign-in")
    assert form.status_code == 200, form.text
    answer = await client.post("/console/sign-in", data={
        "csrf_token": CSRF_INPUT.search(form.text).group(1), "tenant_id": who.tenant_id,
        "client_id": who.credentials.client_id, "client_secret": who.credentials.client_secret})
    assert answer.status_code == 303, answer.text
    return client, answer


async def csrf_of(client: httpx.AsyncClient) -> str:
    page = await client.get("/console/subsidy-batches")
    assert page.status_code == 200, page.text
    return CSRF_INPUT.search(page.text).group(1)


def opened_session(gateway: Gateway, client: httpx.AsyncClient) -> dict[str, Any]:
    box = SessionBox(token_secret=gateway.settings.token_secret.get_secret_value())
    payload = box.open(client.cookies.get(SESSION_COOKIE, path="/console"))
    assert payload is not None
    return payload


async def _member_status(gateway: Gateway, tenant_id: str, member_id: str) -> ipb.Member:
    return (await gateway.stub.GetMember(ipb.GetMemberRequest(tenant_id=tenant_id, member_id=member_id))).member


def test_every_console_route_is_in_the_matrix() -> None:
    from fastapi.routing import iter_route_contexts

    from gateway.app import create_app

    app = create_app(gateway_settings(identity_target="127.0.0.1:1"))
    routes = {(method, route.path) for route in iter_route_contexts(app.routes) for method in (route.methods or ())
              if method != "HEAD" and (route.path == "/console" or route.path.startswith("/console/"))}
    assert routes == CONSOLE_ROUTES


async def test_the_session_cookie_is_httponly_strict_scoped_to_the_console_and_ends_with_the_token(
        devices_gateway: Gateway) -> None:
    gateway = devices_gateway
    who = await operator(gateway)
    for base_url, secure in ((HTTPS_BASE, True), (HTTP_BASE, False)):
        client, answer = await signed_in(gateway, who, base_url=base_url)
        async with aclosing(client):
            (cookie,) = [c for c in answer.headers.get_list("set-cookie") if c.startswith(SESSION_COOKIE + "=")]
            flags = [part.strip().lower() for part in cookie.split(";")[1:]]
            assert "httponly" in flags and "samesite=strict" in flags and "path=/console" in flags
            assert ("secure" in flags) is secure
            max_age = int(next(f for f in flags if f.startswith("max-age=")).split("=")[1])
            assert 0 < max_age <= gateway.settings.token_ttl_s
            session = opened_session(gateway, client)
            assert session["tid"] == who.tenant_id and session["cid"] == who.credentials.client_id
            assert session["exp"] <= int(time.time()) + gateway.settings.token_ttl_s
            # The cookie is sealed: the token is not in it in any readable form.
            assert session["t"] not in cookie and session["t"].split(".")[1] not in cookie
            page = await client.get("/console/dining")
            assert page.status_code == 200, page.text
            assert page.headers["x-frame-options"] == "DENY" and page.headers["cache-control"] == "no-store"
            assert "frame-ancestors 'none'" in page.headers["content-security-policy"]


async def test_a_post_without_or_with_a_wrong_csrf_token_is_a_403_problem_and_changes_nothing(
        devices_gateway: Gateway) -> None:
    gateway = devices_gateway
    who = await operator(gateway)
    member = (await gateway.stub.CreateMember(ipb.CreateMemberRequest(
        tenant_id=who.tenant_id, external_number="C1", name="Csrf Target"))).member

    # Signing in from a page that is not the console's sign-in form: no CSRF cookie, or a wrong token.
    async with console_client(gateway) as stranger:
        form = {"tenant_id": who.tenant_id, "client_id": who.credentials.client_id,
                "client_secret": who.credentials.client_secret}
        assert_problem(await stranger.post("/console/sign-in", data=form), 403, reason="CSRF_TOKEN_INVALID")
        await stranger.get("/console/sign-in")
        refused = await stranger.post("/console/sign-in", data={**form, "csrf_token": "forged"})
        assert_problem(refused, 403, reason="CSRF_TOKEN_INVALID")
        assert SESSION_COOKIE not in refused.headers.get("set-cookie", "")

    client, _ = await signed_in(gateway, who)
    async with aclosing(client):
        freeze = f"/console/members/{member.member_id}/freeze"
        assert_problem(await client.post(freeze), 403, reason="CSRF_TOKEN_INVALID")
        assert_problem(await client.post(freeze, data={"csrf_token": "x" * 43}), 403, reason="CSRF_TOKEN_INVALID")
        assert_problem(await client.post(freeze, headers={"X-CSRF-Token": ""}), 403, reason="CSRF_TOKEN_INVALID")
        # Another session's token is no good either.
        other, _ = await signed_in(gateway, who)
        async with aclosing(other):
            foreign = await csrf_of(other)
        assert_problem(await client.post(freeze, data={"csrf_token": foreign}), 403, reason="CSRF_TOKEN_INVALID")
        assert (await _member_status(gateway, who.tenant_id, member.member_id)).status == ipb.MEMBER_STATUS_ACTIVE
        assert_problem(await client.post("/console/sign-out"), 403, reason="CSRF_TOKEN_INVALID")

        # With the session's token, as the form sends it, the freeze is done.
        done = await client.post(freeze, data={"csrf_token": await csrf_of(client), "q": "C1"})
        assert done.status_code == 303 and done.headers["location"] == "/console/members?q=C1&notice=frozen"
        assert (await _member_status(gateway, who.tenant_id, member.member_id)).status == ipb.MEMBER_STATUS_FROZEN


async def test_no_page_shows_the_token_or_the_secret(devices_gateway: Gateway) -> None:
    gateway = devices_gateway
    who = await operator(gateway)
    client, _ = await signed_in(gateway, who)
    async with aclosing(client):
        token = opened_session(gateway, client)["t"]
        for path in ("/console/dining", "/console/dining/chart", "/console/terminals", "/console/rollouts",
                     "/console/subsidy-batches", "/console/members?q=nobody", "/console/statements",
                     f"/console/subsidy-batches/{uuid.uuid4()}"):
            page = await client.get(path)
            assert page.status_code in (200, 404), (path, page.text)
            assert page.headers["content-type"].startswith("text/html")
            assert token not in page.text and token.split(".")[2] not in page.text, path
            assert who.credentials.client_secret not in page.text, path
            assert "Traceback" not in page.text


async def test_wrong_credentials_sign_nobody_in(devices_gateway: Gateway) -> None:
    gateway = devices_gateway
    who = await operator(gateway)
    async with console_client(gateway) as client:
        form = await client.get("/console/sign-in")
        answer = await client.post("/console/sign-in", data={
            "csrf_token": CSRF_INPUT.search(form.text).group(1), "tenant_id": who.tenant_id,
            "client_id": who.credentials.client_id, "client_secret": "not-the-secret"})
        assert answer.status_code == 401
        assert "These credentials do not open this tenant." in answer.text
        assert "not-the-secret" not in answer.text
        assert client.cookies.get(SESSION_COOKIE, path="/console") is None
        assert (await client.get("/console/members")).headers["location"] == "/console/sign-in"


async def test_a_client_without_a_pages_scope_gets_a_clean_refusal_and_sees_only_its_pages(
        devices_gateway: Gateway) -> None:
    gateway = devices_gateway
    who = await operator(gateway, scopes=(DATA_READ,))
    client, answer = await signed_in(gateway, who)
    async with aclosing(client):
        assert answer.headers["location"] == "/console"
        assert (await client.get("/console")).headers["location"] == "/console/dining"
        dining = await client.get("/console/dining")
        assert dining.status_code == 200
        assert 'href="/console/dining"' in dining.text and 'href="/console/members"' not in dining.text
        members = await client.get("/console/members", params={"q": "x"})
        assert members.status_code == 403
        assert "members:read" in members.text and 'data-reason="INSUFFICIENT_SCOPE"' in members.text
        assert "Traceback" not in members.text
        upload = await client.post("/console/subsidy-batches", data={
            "csrf_token": CSRF_INPUT.search(dining.text).group(1), "bill_number": "B1", "ref": "meal-2026"},
            files={"file": ("b.csv", b"member_id,amount_fen\n")})
        assert upload.status_code == 403 and LEDGER_ADMIN in upload.text


async def test_an_expired_or_forged_session_asks_to_sign_in_again(devices_gateway: Gateway) -> None:
    gateway = devices_gateway
    who = await operator(gateway)
    client, _ = await signed_in(gateway, who)
    async with aclosing(client):
        box = SessionBox(token_secret=gateway.settings.token_secret.get_secret_value())
        session = opened_session(gateway, client)
        expired = box.seal({**session, "exp": int(time.time()) - 1})
        forged = SessionBox(token_secret="another-secret-" + "0" * 32).seal(session)
        for value in (expired, forged, "garbage"):
            client.cookies.clear()
            client.cookies.set(SESSION_COOKIE, value, domain="console.test", path="/console")
            page = await client.get("/console/dining")
            assert page.status_code == 303 and page.headers["location"] == "/console/sign-in"
            polled = await client.get("/console/dining/chart", headers={"HX-Request": "true"})
            assert polled.status_code == 401 and polled.headers["hx-redirect"] == "/console/sign-in"


# --- tenant isolation -----------------------------------------------------------------------------


@dataclass
class TenantIds:
    tenant_id: str
    member_id: str
    external_number: str
    member_name: str
    card_uid: str
    batch_id: str
    merchant_account_id: str
    alarm_id: str


async def _populated(gateway: Gateway, label: str) -> tuple[Operator, TenantIds]:
    who = await operator(gateway)
    number, name, card = f"{label}-0001", f"Isolated {label}", f"{label}0C0D0E01".replace("-", "")
    member = (await gateway.stub.CreateMember(ipb.CreateMemberRequest(
        tenant_id=who.tenant_id, external_number=number, name=name))).member
    await gateway.stub.BindCard(ipb.BindCardRequest(tenant_id=who.tenant_id, member_id=member.member_id,
                                                    card_uid=card))
    admin = await gateway.tenant_access(tenant_id=who.tenant_id, scopes=(LEDGER_ADMIN,))
    accounts = f"/v1/tenants/{who.tenant_id}/accounts"
    funding = await gateway.http.post(accounts, headers=admin.headers, json={
        "owner_kind": "tenant", "owner_id": "finance", "purse_kind": "subsidy_funding", "ref": "meal-2026"})
    merchant = await gateway.http.post(accounts, headers=admin.headers, json={
        "owner_kind": "merchant", "owner_id": "canteen-north", "purse_kind": "merchant_settlement"})
    assert funding.status_code == 201 and merchant.status_code == 201, (funding.text, merchant.text)
    defined = await gateway.http.post(f"/v1/tenants/{who.tenant_id}/subsidy-programs", headers=admin.headers, json={
        "purse_kind": "subsidy", "ref": "meal-2026", "funding_account_id": funding.json()["account"]["account_id"]})
    assert defined.status_code == 201, defined.text
    started = await gateway.http.post(f"/v1/tenants/{who.tenant_id}/subsidy-batches", headers=admin.headers, json={
        "bill_number": f"SUB-{label}", "purse_kind": "subsidy", "ref": "meal-2026",
        "rows": [{"member_id": member.member_id, "amount_fen": 500}]})
    assert started.status_code == 202, started.text
    devices = await gateway.tenant_access(tenant_id=who.tenant_id, scopes=(DEVICES_ADMIN,))
    registered = await gateway.http.post(f"/v1/tenants/{who.tenant_id}/devices", headers=devices.headers, json={
        "kind": "pos", "model": "HX-P300", "name": f"POS {label}", "location": "north-canteen"})
    assert registered.status_code == 201, registered.text
    await Alarms(gateway.devicehub.app.pool).raise_alarm(  # type: ignore[attr-defined]
        tenant_id=who.tenant_id, device_id=registered.json()["device"]["device_id"],
        kind=dpb.ALARM_KIND_SEQUENCE_GAP, severity=dpb.ALARM_SEVERITY_WARNING, detail=f"gap at {label}")
    (alarm,) = (await gateway.http.get(f"/v1/tenants/{who.tenant_id}/alarms", headers=devices.headers)).json()["alarms"]
    return who, TenantIds(tenant_id=who.tenant_id, member_id=member.member_id, external_number=number,
                          member_name=name, card_uid=card, batch_id=started.json()["batch"]["batch_id"],
                          merchant_account_id=merchant.json()["account"]["account_id"], alarm_id=alarm["alarm_id"])


def _fill(text: str, ids: TenantIds) -> str:
    return re.sub(r"\{([a-z_]+)\}", lambda m: str(getattr(ids, m.group(1))), text)


@pytest.mark.timeout(300)
async def test_a_session_of_tenant_a_shows_and_changes_nothing_of_tenant_b(devices_gateway: Gateway) -> None:
    gateway = devices_gateway
    who_a, ids_a = await _populated(gateway, "A")
    _, ids_b = await _populated(gateway, "B")
    secrets_of_b = [ids_b.tenant_id, ids_b.member_id, ids_b.member_name, ids_b.card_uid, ids_b.batch_id,
                    ids_b.merchant_account_id, ids_b.alarm_id, "gap at B", "POS B"]
    for (method, template), call in CONSOLE_ROUTE_CALLS.items():
        client, _ = await signed_in(gateway, who_a)
        async with aclosing(client):
            csrf = await csrf_of(client)
            path = call.get("path") or _fill(template, ids_b)
            params = {k: _fill(v, ids_b) for k, v in call.get("params", {}).items()}
            if method == "GET":
                answer = await client.get(path, params=params)
            elif call.get("sign_in"):
                # Signing in to B with A's client: refused, no session of B.
                form = await client.get("/console/sign-in")
                answer = await client.post(path, data={
                    "csrf_token": CSRF_INPUT.search(form.text).group(1), "tenant_id": ids_b.tenant_id,
                    "client_id": who_a.credentials.client_id, "client_secret": who_a.credentials.client_secret})
                assert answer.status_code == 401, answer.text
                assert opened_session(gateway, client)["tid"] == ids_a.tenant_id
            elif call.get("upload"):
                rows = f"member_id,amount_fen\n{ids_b.member_id},700\n".encode()
                answer = await client.post(path, data={"csrf_token": csrf, "bill_number": f"SUB-{ids_b.batch_id}",
                                                       "purse_kind": "subsidy", "ref": "meal-2026"},
                                           files={"file": ("rows.csv", rows, "text/csv")})
                if answer.status_code == 303:
                    # A's batch naming B's member: the row fails in A, nothing reaches B.
                    batch = await client.get(answer.headers["location"])
                    assert batch.status_code == 200
            else:
                answer = await client.post(path, data={"csrf_token": csrf})
            key = (method, template)
            # B's ids are unknown in A: 404 as ids that do not exist; pages without ids show A's own.
            assert answer.status_code == call["status"], (key, answer.status_code, answer.text[:300])
            body = answer.text
            for secret in secrets_of_b:
                # What the caller sent itself may come back (a search box, the sign-in form's tenant).
                if secret in path or secret in str(params) or call.get("sign_in"):
                    body = body.replace(secret, "") if secret == ids_b.tenant_id or not call.get("sign_in") else body
                assert secret not in body, (key, secret)
    # Nothing of B changed.
    member_b = await _member_status(gateway, ids_b.tenant_id, ids_b.member_id)
    assert member_b.status == ipb.MEMBER_STATUS_ACTIVE
    assert [c.status for c in member_b.cards] == [ipb.CARD_STATUS_ACTIVE]
    admin_b = await gateway.tenant_access(tenant_id=ids_b.tenant_id, scopes=(LEDGER_ADMIN,))
    batch_b = await gateway.http.get(f"/v1/tenants/{ids_b.tenant_id}/subsidy-batches/{ids_b.batch_id}",
                                     headers=admin_b.headers)
    assert batch_b.json()["total_rows"] == 1
    devices_b = await gateway.tenant_access(tenant_id=ids_b.tenant_id, scopes=(DEVICES_ADMIN,))
    alarms_b = await gateway.http.get(f"/v1/tenants/{ids_b.tenant_id}/alarms", headers=devices_b.headers)
    assert [(a["alarm_id"], a["state"]) for a in alarms_b.json()["alarms"]] == [(ids_b.alarm_id, "open")]


async def test_a_statement_downloads_as_the_apis_csv_and_a_card_is_reported_lost(devices_gateway: Gateway) -> None:
    gateway = devices_gateway
    who, ids = await _populated(gateway, "C")
    client, _ = await signed_in(gateway, who)
    async with aclosing(client):
        query = {"date": "2026-11-26", "subject": "merchant", "subject_id": ids.merchant_account_id}
        totals = await client.get("/console/statements", params=query)
        assert totals.status_code == 200, totals.text
        assert 'id="statement-totals"' in totals.text and 'id="download"' in totals.text
        download = await client.get("/console/statements/download", params=query)
        assert download.status_code == 200, download.text
        assert download.headers["content-type"].startswith("text/csv")
        assert download.headers["content-disposition"] == (
            f'attachment; filename="statement-{ids.merchant_account_id}-2026-11-26.csv"')
        assert download.text.splitlines()[0].startswith("booked_at,event_time,transfer_id,kind,merchant_fen")
        # A day the API refuses is the page's message, not a stack trace.
        refused = await client.get("/console/statements", params={**query, "date": "2026-13-45"})
        assert refused.status_code in (400, 422) and 'class="error"' in refused.text

        lost = await client.post(f"/console/members/{ids.member_id}/cards/{ids.card_uid}/report-lost",
                                 data={"csrf_token": await csrf_of(client), "q": ids.external_number})
        assert lost.status_code == 303 and lost.headers["location"].endswith("notice=card-lost")
        member = await _member_status(gateway, ids.tenant_id, ids.member_id)
        assert [c.status for c in member.cards] == [ipb.CARD_STATUS_LOST]
        page = await client.get(lost.headers["location"])
        assert "reported lost" in page.text and ">Report lost<" not in page.text


async def test_a_client_holding_none_of_the_consoles_scopes_is_told_so(devices_gateway: Gateway) -> None:
    gateway = devices_gateway
    who = await operator(gateway, scopes=("wallets:read",))
    client, _ = await signed_in(gateway, who)
    async with aclosing(client):
        home = await client.get("/console")
        assert home.status_code == 403
        assert 'data-reason="INSUFFICIENT_SCOPE"' in home.text and "data:read or" in home.text
        assert '<nav' not in home.text or 'href="/console/dining"' not in home.text
