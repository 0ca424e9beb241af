"""The webhook routes through the gateway, in front of a real identity, ledger and webhooks
service, delivering to a real HTTP receiver on 127.0.0.1: registration (secret shown once,
idempotent), refusals as problem+json, the delivery log, redelivery, rotation, disabling and
deletion, and one client never seeing another's endpoints."""
from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook

from onecard.ledger.v1 import ledger_pb2 as lpb
from tests.gateway.conftest import Gateway, assert_problem, gateway_settings, running_gateway
from tests.ledger.support import allow_credit
from tests.webhooks.conftest import receiver  # noqa: F401 - the fixture
from tests.webhooks.support import Receiver, eventually


@pytest.fixture
async def webhooks_gateway(identity: Any, ledger_service: Any, webhooks_service: Any) -> AsyncIterator[Gateway]:
    settings = gateway_settings(identity_target=identity.target, ledger_target=ledger_service.target,
                                webhooks_target=webhooks_service.target)
    async with running_gateway(settings) as (app, http):
        gateway = Gateway(app=app, http=http, stub=identity.stub, settings=settings)
        gateway.ledger_stub = ledger_service.stub  # type: ignore[attr-defined]
        yield gateway


async def top_up(ledger: Any, tenant_id: str, amount_fen: int) -> None:
    async def account(owner_kind: int, owner_id: str, purse_kind: int) -> str:
        answer = await ledger.OpenAccount(lpb.OpenAccountRequest(tenant_id=tenant_id, owner_kind=owner_kind,
                                                                 owner_id=owner_id, purse_kind=purse_kind))
        return answer.account.account.account_id

    bank = await account(lpb.OWNER_KIND_TENANT, "bank", lpb.PURSE_KIND_BANK_CLEARING)
    await allow_credit(ledger, tenant_id, bank)
    cash = await account(lpb.OWNER_KIND_MEMBER, "member-1", lpb.PURSE_KIND_CASH)
    await ledger.TopUp(lpb.TopUpRequest(tenant_id=tenant_id, idempotency_key=str(uuid.uuid4()), from_account_id=bank,
                                        to_account_id=cash, amount_fen=amount_fen))


async def test_a_partner_registers_an_endpoint_receives_signed_events_and_manages_it(
        webhooks_gateway: Gateway, receiver: Receiver) -> None:  # noqa: F811
    gateway = webhooks_gateway
    partner = await gateway.tenant_access(scopes=("wallets:read", "webhooks:manage"))
    base = f"/v1/tenants/{partner.tenant_id}/webhook-endpoints"
    body = {"url": receiver.url, "event_types": ["topup.booked"], "description": "bank"}

    missing_key = await gateway.http.post(base, json=body, headers=partner.headers)
    assert_problem(missing_key, 400, reason="IDEMPOTENCY_KEY_REQUIRED")
    keyed = {**partner.headers, "Idempotency-Key": "endpoint-1"}
    created = await gateway.http.post(base, json=body, headers=keyed)
    assert created.status_code == 201, created.text
    endpoint = created.json()
    assert endpoint["secret"].startswith("whsec_") and endpoint["state"] == "enabled"
    assert created.headers["location"] == f"{base}/{endpoint['endpoint_id']}"
    again = await gateway.http.post(base, json=body, headers=keyed)
    assert (again.json()["endpoint_id"], again.json()["secret"]) == (endpoint["endpoint_id"], endpoint["secret"])
    other = await gateway.http.post(base, json={**body, "description": "changed"}, headers=keyed)
    assert_problem(other, 409, reason="IDEMPOTENCY_KEY_REUSED")

    not_readable = await gateway.http.post(base, json={**body, "event_types": ["member.frozen"]},
                                           headers={**partner.headers, "Idempotency-Key": "endpoint-2"})
    assert_problem(not_readable, 403, reason="EVENT_TYPE_NOT_ALLOWED")
    private = await gateway.http.post(base, json={**body, "url": "https://10.0.0.1/hooks"},
                                      headers={**partner.headers, "Idempotency-Key": "endpoint-3"})
    assert_problem(private, 400, reason="TARGET_NOT_ALLOWED")
    private_flag = await gateway.http.post(base, json={**body, "allow_private_targets": True},
                                           headers={**partner.headers, "Idempotency-Key": "endpoint-4"})
    assert_problem(private_flag, 403, reason="PRIVATE_TARGETS_NOT_ALLOWED")

    await top_up(gateway.ledger_stub, partner.tenant_id, 1_500)  # type: ignore[attr-defined]
    received = await eventually(lambda: _first(receiver), what="the top-up delivered")
    message = Webhook(endpoint["secret"]).verify(received.body, received.headers)
    assert message["type"] == "topup.booked" and message["data"]["amount_fen"] == 1_500

    endpoint_url = f"{base}/{endpoint['endpoint_id']}"
    async def delivered() -> Any:
        log = (await gateway.http.get(f"{endpoint_url}/deliveries", params={"status": "delivered"},
                                      headers=partner.headers)).json()
        return log["deliveries"]

    (delivery,) = await eventually(delivered, what="the delivery logged as delivered")
    assert delivery["message_id"] == received.headers["webhook-id"]
    detail = (await gateway.http.get(f"{base}/deliveries/{delivery['delivery_id']}", headers=partner.headers)).json()
    assert detail["payload"] == message
    assert [a["response_status"] for a in detail["attempt_log"]] == [204]
    redelivered = await gateway.http.post(f"{base}/deliveries/{delivery['delivery_id']}/redeliver",
                                          headers={**partner.headers, "Idempotency-Key": "again-1"})
    assert redelivered.status_code == 202, redelivered.text
    assert redelivered.json()["redelivery_of"] == delivery["delivery_id"]
    await eventually(lambda: _count(receiver, 2), what="the redelivery")
    assert receiver.accepted()[1].headers["webhook-id"] == received.headers["webhook-id"]

    rotated = await gateway.http.post(f"{endpoint_url}/rotate-secret", json={"overlap_s": 600},
                                      headers={**partner.headers, "Idempotency-Key": "rotate-1"})
    assert rotated.status_code == 200, rotated.text
    assert rotated.json()["secret"] != endpoint["secret"]
    secrets = rotated.json()["secrets"]
    assert len(secrets) == 2 and secrets[0]["expires_at"] and secrets[1]["expires_at"] is None

    # Another client of the same tenant sees nothing of it.
    stranger = await gateway.tenant_access(tenant_id=partner.tenant_id, scopes=("wallets:read", "webhooks:manage"))
    assert_problem(await gateway.http.get(endpoint_url, headers=stranger.headers), 404, reason="ENDPOINT_NOT_FOUND")
    assert (await gateway.http.get(base, headers=stranger.headers)).json()["endpoints"] == []

    disabled = await gateway.http.patch(endpoint_url, json={"enabled": False}, headers=partner.headers)
    assert disabled.json()["state"] == "disabled"
    deleted = await gateway.http.delete(endpoint_url, headers=partner.headers)
    assert deleted.json()["state"] == "deleted"
    assert (await gateway.http.get(base, headers=partner.headers)).json()["endpoints"] == []


async def test_without_a_webhooks_service_the_routes_answer_503(gateway: Gateway) -> None:
    partner = await gateway.tenant_access(scopes=("webhooks:manage",))
    response = await gateway.http.get(f"/v1/tenants/{partner.tenant_id}/webhook-endpoints", headers=partner.headers)
    assert_problem(response, 503, reason="WEBHOOKS_NOT_CONFIGURED")


async def _first(receiver: Receiver) -> Any:
    accepted = receiver.accepted()
    return accepted[0] if accepted else None


async def _count(receiver: Receiver, count: int) -> bool:
    await asyncio.sleep(0)
    return len(receiver.accepted()) >= count
