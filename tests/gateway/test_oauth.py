"""The token endpoint (OAuth2 client credentials) and how routes treat bad tokens."""
from __future__ import annotations

import base64
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import jwt

from gateway.auth import CLIENTS_ADMIN, MEMBERS_READ, MEMBERS_WRITE, TOKEN_AUDIENCE, TOKEN_ISSUER, issue_access_token
from tests.gateway.conftest import (
    BASE_URL,
    TOKEN_SECRET,
    ClientCredentials,
    Gateway,
    assert_problem,
    gateway_settings,
    running_gateway,
)


async def test_client_credentials_in_the_form_get_a_bearer_token_bound_to_the_tenant(gateway: Gateway) -> None:
    tenant_id = await gateway.create_tenant()
    credentials = await gateway.create_client(tenant_id=tenant_id, scopes=[MEMBERS_READ, MEMBERS_WRITE])

    response = await gateway.request_token(tenant_id=tenant_id, credentials=credentials)

    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == gateway.settings.token_ttl_s
    assert body["scope"].split() == [MEMBERS_READ, MEMBERS_WRITE]
    claims = jwt.decode(body["access_token"], TOKEN_SECRET, algorithms=["HS256"], audience=TOKEN_AUDIENCE,
                        issuer=TOKEN_ISSUER)
    assert (claims["tid"], claims["sub"]) == (tenant_id, credentials.client_id)
    assert claims["exp"] - claims["iat"] == gateway.settings.token_ttl_s
    tenant = await gateway.http.get(f"/v1/tenants/{tenant_id}",
                                    headers={"Authorization": f"Bearer {body['access_token']}"})
    assert tenant.status_code == 200
    assert tenant.json()["tenant_id"] == tenant_id


async def test_http_basic_client_authentication_is_accepted(gateway: Gateway) -> None:
    tenant_id = await gateway.create_tenant()
    credentials = await gateway.create_client(tenant_id=tenant_id, scopes=[MEMBERS_READ])
    basic = base64.b64encode(f"{credentials.client_id}:{credentials.client_secret}".encode()).decode()

    response = await gateway.http.post(
        "/v1/oauth/token",
        data={"grant_type": "client_credentials", "tenant_id": tenant_id},
        headers={"Authorization": f"Basic {basic}"},
    )

    assert response.status_code == 200, response.text
    assert response.json()["scope"] == MEMBERS_READ


async def test_a_wrong_secret_an_unknown_client_and_an_ungranted_tenant_are_one_invalid_client(
    gateway: Gateway,
) -> None:
    tenant_a = await gateway.create_tenant(name="A")
    tenant_b = await gateway.create_tenant(name="B")
    credentials = await gateway.create_client(tenant_id=tenant_a, scopes=[MEMBERS_READ])

    wrong_secret = await gateway.request_token(
        tenant_id=tenant_a, credentials=ClientCredentials(credentials.client_id, "not-the-secret")
    )
    unknown_client = await gateway.request_token(
        tenant_id=tenant_a, credentials=ClientCredentials(str(uuid.uuid4()), credentials.client_secret)
    )
    ungranted_tenant = await gateway.request_token(tenant_id=tenant_b, credentials=credentials)
    unknown_tenant = await gateway.request_token(tenant_id=str(uuid.uuid4()), credentials=credentials)

    bodies = [
        assert_problem(response, 401, reason="INVALID_CLIENT")
        for response in (wrong_secret, unknown_client, ungranted_tenant, unknown_tenant)
    ]
    # Alike in every word, so a caller cannot probe which client ids or tenants exist.
    assert {(b["error"], b["detail"]) for b in bodies} == {("invalid_client", "client authentication failed")}
    assert all("access_token" not in b for b in bodies)


async def test_a_requested_scope_narrows_the_token_and_more_than_granted_is_refused(gateway: Gateway) -> None:
    tenant_id = await gateway.create_tenant()
    credentials = await gateway.create_client(tenant_id=tenant_id, scopes=[MEMBERS_READ, MEMBERS_WRITE])

    narrowed = await gateway.request_token(tenant_id=tenant_id, credentials=credentials, scope=MEMBERS_READ)
    too_wide = await gateway.request_token(tenant_id=tenant_id, credentials=credentials,
                                           scope=f"{MEMBERS_READ} {CLIENTS_ADMIN}")

    assert narrowed.status_code == 200
    assert narrowed.json()["scope"] == MEMBERS_READ
    assert_problem(too_wide, 400, reason="INVALID_SCOPE")


async def test_malformed_token_requests_are_invalid_request_or_unsupported_grant(gateway: Gateway) -> None:
    tenant_id = await gateway.create_tenant()
    credentials = await gateway.create_client(tenant_id=tenant_id, scopes=[MEMBERS_READ])

    password_grant = await gateway.request_token(tenant_id=tenant_id, credentials=credentials, grant_type="password")
    missing_fields = await gateway.http.post("/v1/oauth/token", data={"grant_type": "client_credentials"})
    as_json = await gateway.http.post("/v1/oauth/token", json={"grant_type": "client_credentials",
                                                                "tenant_id": tenant_id,
                                                                "client_id": credentials.client_id,
                                                                "client_secret": credentials.client_secret})

    assert_problem(password_grant, 400, reason="UNSUPPORTED_GRANT_TYPE")
    assert_problem(missing_fields, 400, reason="INVALID_REQUEST")
    assert_problem(as_json, 400, reason="INVALID_REQUEST")


async def test_expired_malformed_and_foreign_tokens_are_refused_with_a_bearer_challenge(gateway: Gateway) -> None:
    access = await gateway.tenant_access(scopes=[MEMBERS_READ])
    path = f"/v1/tenants/{access.tenant_id}"
    expired = issue_access_token(secret=TOKEN_SECRET, client_id=access.credentials.client_id,
                                 tenant_id=access.tenant_id, scopes=[MEMBERS_READ], grant_version=1, ttl_s=60,
                                 now_s=time.time() - 3600)
    foreign = issue_access_token(secret="some-other-deployment-secret-0123456789", client_id="c",
                                 tenant_id=access.tenant_id, scopes=[MEMBERS_READ], grant_version=1, ttl_s=60)
    tampered = access.token[:-4] + ("AAAA" if not access.token.endswith("AAAA") else "BBBB")

    cases = {
        "TOKEN_EXPIRED": expired,
        "INVALID_TOKEN": foreign,
    }
    for reason, token in cases.items():
        response = await gateway.http.get(path, headers={"Authorization": f"Bearer {token}"})
        assert_problem(response, 401, reason=reason)
        assert response.headers["www-authenticate"].startswith("Bearer")
        assert 'error="invalid_token"' in response.headers["www-authenticate"]
    for token in [tampered, "not-a-jwt"]:
        response = await gateway.http.get(path, headers={"Authorization": f"Bearer {token}"})
        assert_problem(response, 401, reason="INVALID_TOKEN")
    missing = await gateway.http.get(path)
    assert_problem(missing, 401, reason="MISSING_TOKEN")
    assert missing.headers["www-authenticate"].startswith("Bearer")
    still_good = await gateway.http.get(path, headers=access.headers)
    assert still_good.status_code == 200


# --- the token endpoint cannot be used against its clients -------------------------------------------

PARTNER_ADDRESS = "198.51.100.20"
ATTACKER_ADDRESS = "203.0.113.66"


@asynccontextmanager
async def _from(gateway: Gateway, address: str) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client of the running gateway whose requests come from ``address``."""
    transport = httpx.ASGITransport(app=gateway.app, raise_app_exceptions=False, client=(address, 40_000))
    async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as http:
        yield http


def _token_form(tenant_id: str, client_id: str, secret: str) -> dict[str, str]:
    return {"grant_type": "client_credentials", "tenant_id": tenant_id, "client_id": client_id,
            "client_secret": secret}


async def test_wrong_secrets_sent_from_elsewhere_never_lock_the_partner_out(identity: Any) -> None:
    """The attack: 25 wrong secrets sent with the bank's (public) client id got the bank's own
    request answered 429. Failures now count per (client, address): the attacker's address backs
    off, the bank's is untouched. Production limits, not the tests' generous ones."""
    settings = gateway_settings(identity_target=identity.target, token_rate_limit_per_s=1.0,
                                token_rate_limit_burst=10)
    async with running_gateway(settings) as (app, http):
        gateway = Gateway(app=app, http=http, stub=identity.stub, settings=settings)
        tenant_id = await gateway.create_tenant()
        bank = await gateway.create_client(tenant_id=tenant_id, scopes=[MEMBERS_READ])
        async with _from(gateway, ATTACKER_ADDRESS) as attacker, _from(gateway, PARTNER_ADDRESS) as partner:
            guesses = [await attacker.post("/v1/oauth/token",
                                           data=_token_form(tenant_id, bank.client_id, f"ocs_guess_{n}"))
                       for n in range(25)]
            real = await partner.post("/v1/oauth/token",
                                      data=_token_form(tenant_id, bank.client_id, bank.client_secret))
            # Even the right secret from the attacker's address waits out the back-off now.
            from_attacker = await attacker.post("/v1/oauth/token",
                                                data=_token_form(tenant_id, bank.client_id, bank.client_secret))

    statuses = [g.status_code for g in guesses]
    assert statuses[:5] == [401] * 5 and set(statuses) == {401, 429}
    refused = next(g for g in guesses if g.status_code == 429)
    assert_problem(refused, 429, reason="RATE_LIMITED")
    assert int(refused.headers["retry-after"]) >= 1
    assert real.status_code == 200, real.text
    assert from_attacker.status_code == 429


async def test_an_attacker_rotating_addresses_is_bounded_and_the_partners_own_address_keeps_working(
        identity: Any) -> None:
    """Many addresses, a few wrong secrets each: the client's failure budget bounds them all, and
    once it is spent a new address waits; the address the bank signed in from is never refused."""
    settings = gateway_settings(identity_target=identity.target, token_client_failure_burst=20,
                                token_client_failures_per_s=1 / 60)
    async with running_gateway(settings) as (app, http):
        gateway = Gateway(app=app, http=http, stub=identity.stub, settings=settings)
        tenant_id = await gateway.create_tenant()
        bank = await gateway.create_client(tenant_id=tenant_id, scopes=[MEMBERS_READ])
        right = _token_form(tenant_id, bank.client_id, bank.client_secret)
        async with _from(gateway, PARTNER_ADDRESS) as partner:
            assert (await partner.post("/v1/oauth/token", data=right)).status_code == 200
            statuses = []
            for n in range(30):
                async with _from(gateway, f"192.0.2.{n + 1}") as attacker:
                    for _ in range(2):
                        wrong = _token_form(tenant_id, bank.client_id, f"ocs_guess_{n}")
                        statuses.append((await attacker.post("/v1/oauth/token", data=wrong)).status_code)
            async with _from(gateway, "192.0.2.200") as newcomer:
                fresh_address = await newcomer.post("/v1/oauth/token", data=right)
            own_address = [await partner.post("/v1/oauth/token", data=right) for _ in range(3)]

    assert statuses.count(401) == 20 and statuses.count(429) == 40
    assert_problem(fresh_address, 429, reason="RATE_LIMITED")
    assert [r.status_code for r in own_address] == [200, 200, 200]
