"""Revoking a grant or a client stops its tokens within 60 s, not when they expire: at once through
identity's events on NATS, and at the next re-check with identity when NATS is away. Real
identity, real NATS."""
from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx

from devstack.servers import free_port
from gateway.auth import CLIENTS_ADMIN, MEMBERS_READ
from onecard.identity.v1 import identity_pb2 as pb
from tests.gateway.conftest import (
    ClientCredentials,
    Gateway,
    TenantAccess,
    assert_problem,
    gateway_settings,
    running_gateway,
)

# Longer than any of these tests waits: only identity's events can explain a token stopping fast.
SLOW_RECHECK_S = 60.0
FAST_RECHECK_S = 1.0
PATIENCE_S = 10.0


async def _token_works(gateway: Gateway, access: TenantAccess, token: str) -> httpx.Response:
    return await gateway.http.get(f"/v1/tenants/{access.tenant_id}", headers={"Authorization": f"Bearer {token}"})


async def _stopped_within(gateway: Gateway, access: TenantAccess, token: str, *, seconds: float) -> float:
    """Poll with the token until it is refused; the seconds that took."""
    started = time.monotonic()
    while True:
        response = await _token_works(gateway, access, token)
        if response.status_code == 401:
            assert_problem(response, 401, reason="TOKEN_REVOKED")
            assert 'error="invalid_token"' in response.headers["www-authenticate"]
            return time.monotonic() - started
        assert response.status_code == 200, response.text
        assert time.monotonic() - started < seconds, "the revoked token still works"
        await asyncio.sleep(0.05)


async def _following(gateway: Gateway) -> None:
    """Until the gateway follows identity's grant events."""
    deadline = time.monotonic() + PATIENCE_S
    while not gateway.app.state.gateway.grants.feed():
        assert time.monotonic() < deadline, "the gateway never subscribed to identity's events"
        await asyncio.sleep(0.05)


def _events_gateway(identity: Any, nats_url: str) -> Any:
    """A gateway following identity's events on the test's NATS, with the slowest re-check."""
    return running_gateway(gateway_settings(identity_target=identity.target, nats_url=nats_url,
                                            grant_recheck_s=SLOW_RECHECK_S))


async def test_revoking_a_grant_stops_its_tokens_at_once_through_identitys_events(identity: Any,
                                                                                  nats_url: str) -> None:
    async with _events_gateway(identity, nats_url) as (app, http):
        gateway = Gateway(app=app, http=http, stub=identity.stub, settings=app.state.gateway.settings)
        await _following(gateway)
        admin = await gateway.tenant_access(scopes=[CLIENTS_ADMIN, MEMBERS_READ])
        bank = await gateway.tenant_access(tenant_id=admin.tenant_id, scopes=[MEMBERS_READ])
        assert (await _token_works(gateway, bank, bank.token)).status_code == 200

        revoked = await http.delete(f"/v1/tenants/{admin.tenant_id}/api-clients/{bank.credentials.client_id}/grant",
                                    headers=admin.headers)
        assert revoked.status_code == 204, revoked.text
        took_s = await _stopped_within(gateway, bank, bank.token, seconds=PATIENCE_S)
        # The admin's own token is untouched.
        assert (await _token_works(gateway, admin, admin.token)).status_code == 200
        # And no new token either.
        assert (await gateway.request_token(tenant_id=bank.tenant_id, credentials=bank.credentials)).status_code == 401
    assert took_s < SLOW_RECHECK_S / 2


async def test_revoking_a_client_stops_its_tokens_in_every_tenant(identity: Any, nats_url: str) -> None:
    async with _events_gateway(identity, nats_url) as (app, http):
        gateway = Gateway(app=app, http=http, stub=identity.stub, settings=app.state.gateway.settings)
        await _following(gateway)
        tenant_a, tenant_b = await gateway.create_tenant(name="A"), await gateway.create_tenant(name="B")
        created = await identity.stub.CreateApiClient(pb.CreateApiClientRequest(
            name="leaky bank", scopes=[MEMBERS_READ],
            grants=[pb.TenantGrant(tenant_id=t, scopes=[MEMBERS_READ]) for t in (tenant_a, tenant_b)]))
        credentials = ClientCredentials(created.client.client_id, created.client_secret)
        accesses = [TenantAccess(tenant_id=t, credentials=credentials,
                                 token=await gateway.token(tenant_id=t, credentials=credentials))
                    for t in (tenant_a, tenant_b)]
        for access in accesses:
            assert (await _token_works(gateway, access, access.token)).status_code == 200

        await identity.stub.RevokeApiClient(pb.RevokeApiClientRequest(client_id=credentials.client_id))
        took = [await _stopped_within(gateway, access, access.token, seconds=PATIENCE_S) for access in accesses]
        assert (await gateway.request_token(tenant_id=tenant_a, credentials=credentials)).status_code == 401
    assert max(took) < SLOW_RECHECK_S / 2


async def test_a_changed_or_regranted_grant_ends_the_tokens_issued_before_it(identity: Any, nats_url: str) -> None:
    async with _events_gateway(identity, nats_url) as (app, http):
        gateway = Gateway(app=app, http=http, stub=identity.stub, settings=app.state.gateway.settings)
        await _following(gateway)
        admin = await gateway.tenant_access(scopes=[CLIENTS_ADMIN, MEMBERS_READ])
        bank = await gateway.tenant_access(tenant_id=admin.tenant_id, scopes=[MEMBERS_READ, CLIENTS_ADMIN])
        grant_url = f"/v1/tenants/{admin.tenant_id}/api-clients/{bank.credentials.client_id}/grant"

        # Narrowed: the old token (with clients:admin) stops; a new one carries the new scopes.
        narrowed = await http.put(grant_url, headers=admin.headers, json={"scopes": [MEMBERS_READ]})
        assert narrowed.status_code == 200, narrowed.text
        await _stopped_within(gateway, bank, bank.token, seconds=PATIENCE_S)
        fresh = await gateway.token(tenant_id=bank.tenant_id, credentials=bank.credentials)
        assert (await _token_works(gateway, bank, fresh)).status_code == 200

        # Revoked and granted again: the token from before the revocation stays dead.
        assert (await http.delete(grant_url, headers=admin.headers)).status_code == 204
        await _stopped_within(gateway, bank, fresh, seconds=PATIENCE_S)
        again = await http.put(grant_url, headers=admin.headers, json={"scopes": [MEMBERS_READ]})
        assert again.status_code == 200, again.text
        await asyncio.sleep(0.5)
        assert_problem(await _token_works(gateway, bank, fresh), 401, reason="TOKEN_REVOKED")
        newest = await gateway.token(tenant_id=bank.tenant_id, credentials=bank.credentials)
        assert (await _token_works(gateway, bank, newest)).status_code == 200


async def test_with_nats_away_a_revoked_grant_still_stops_its_tokens_at_the_recheck(identity: Any) -> None:
    """NATS is down (nothing listens where the gateway looks for it): the gateway serves on, and
    the re-check with identity alone ends the revoked grant's tokens (here 1 s; 30 s by default,
    never more than 60)."""
    settings = gateway_settings(identity_target=identity.target, nats_url=f"nats://127.0.0.1:{free_port()}",
                                grant_recheck_s=FAST_RECHECK_S)
    async with running_gateway(settings) as (app, http):
        gateway = Gateway(app=app, http=http, stub=identity.stub, settings=settings)
        admin = await gateway.tenant_access(scopes=[CLIENTS_ADMIN, MEMBERS_READ])
        bank = await gateway.tenant_access(tenant_id=admin.tenant_id, scopes=[MEMBERS_READ])
        assert (await _token_works(gateway, bank, bank.token)).status_code == 200
        assert not app.state.gateway.grants.feed()

        revoked = await http.delete(f"/v1/tenants/{admin.tenant_id}/api-clients/{bank.credentials.client_id}/grant",
                                    headers=admin.headers)
        assert revoked.status_code == 204, revoked.text
        took_s = await _stopped_within(gateway, bank, bank.token, seconds=PATIENCE_S)
    assert took_s <= FAST_RECHECK_S + 1.0
