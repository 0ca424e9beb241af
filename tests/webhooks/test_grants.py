"""identity's grant events keep endpoints honest: a delivery whose type the client's changed grant
no longer reads is dropped, never sent; a revoked grant disables the client's endpoints."""

from __future__ import annotations

import asyncpg
import grpc

from onecard.identity.v1 import identity_pb2 as ipb
from onecard.webhooks.v1 import webhooks_pb2 as pb
from tests.conftest import RunningService
from tests.webhooks.support import OK, REFUSE, MovableClock, Receiver, eventually, refused
from tests.webhooks.test_delivery import Campus, create_endpoint, deliveries, time_passing

GRANTED = ["wallets:read", "members:read", "webhooks:manage"]


async def test_a_changed_grant_drops_what_it_no_longer_reads_and_a_revoked_one_disables(
        identity: RunningService, ledger: RunningService, webhooks: RunningService, receiver: Receiver,
        clock: MovableClock, database_url: str) -> None:
    campus = await Campus(identity, ledger).open()
    client = (await identity.stub.CreateApiClient(ipb.CreateApiClientRequest(
        name="bank", scopes=GRANTED, grants=[ipb.TenantGrant(tenant_id=campus.tenant_id, scopes=GRANTED)]))).client
    created = await create_endpoint(webhooks, campus.tenant_id, receiver.url, event_types=["topup.booked"],
                                    scopes=GRANTED, client_id=client.client_id)
    endpoint_id = created.endpoint.endpoint_id
    await receiver.set_mode(REFUSE)
    ann = await campus.member("A1")
    await campus.top_up(ann, 100)

    async def tried() -> bool:
        listed = await deliveries(webhooks, campus.tenant_id, endpoint_id, client_id=client.client_id)
        return bool(listed) and listed[0].attempts >= 1

    await eventually(tried, what="a first refused attempt")
    await identity.stub.GrantTenantAccess(ipb.GrantTenantAccessRequest(
        tenant_id=campus.tenant_id, client_id=client.client_id, scopes=["members:read", "webhooks:manage"]))
    db = await asyncpg.connect(database_url, server_settings={"search_path": "webhooks"})
    try:
        async def scopes_changed() -> bool:
            scopes = await db.fetchval("SELECT scopes FROM endpoints WHERE endpoint_id = $1::uuid", endpoint_id)
            return "wallets:read" not in scopes

        await eventually(scopes_changed, what="the grant event applied")
    finally:
        await db.close()
    await receiver.set_mode(OK)

    async def dropped() -> bool:
        listed = await deliveries(webhooks, campus.tenant_id, endpoint_id, client_id=client.client_id)
        return listed[0].status == pb.DELIVERY_STATUS_DROPPED

    async with time_passing(clock):
        await eventually(dropped, what="the delivery dropped")
    assert receiver.requests == []

    await identity.stub.RevokeTenantAccess(ipb.RevokeTenantAccessRequest(tenant_id=campus.tenant_id,
                                                                         client_id=client.client_id))

    async def disabled() -> bool:
        answer = await webhooks.stub.GetEndpoint(pb.GetEndpointRequest(
            tenant_id=campus.tenant_id, client_id=client.client_id, endpoint_id=endpoint_id))
        return answer.endpoint.state == pb.ENDPOINT_STATE_DISABLED_GRANT_REVOKED

    await eventually(disabled, what="the endpoint disabled by the revocation")
    code, reason = await refused(webhooks.stub.UpdateEndpoint(pb.UpdateEndpointRequest(
        tenant_id=campus.tenant_id, client_id=client.client_id, caller_scopes=GRANTED, endpoint_id=endpoint_id,
        enabled=True)))
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "GRANT_REVOKED")
