"""The token endpoint (OAuth2 client credentials) and how routes treat bad tokens."""
from __future__ import annotations

import base64
import time
import uuid

import jwt

from gateway.auth import CLIENTS_ADMIN, MEMBERS_READ, MEMBERS_WRITE, TOKEN_AUDIENCE, TOKEN_ISSUER, issue_access_token
from tests.gateway.conftest import TOKEN_SECRET, ClientCredentials, Gateway, assert_problem


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
                                 tenant_id=access.tenant_id, scopes=[MEMBERS_READ], ttl_s=60,
                                 now_s=time.time() - 3600)
    foreign = issue_access_token(secret="some-other-deployment-secret-0123456789", client_id="c",
                                 tenant_id=access.tenant_id, scopes=[MEMBERS_READ], ttl_s=60)
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
