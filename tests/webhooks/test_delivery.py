"""Deliveries from the services' real events to a real HTTP receiver: at least once, in order per
member, through refusals, timeouts and 500s; signatures verified with ``standardwebhooks``;
rotation overlap; SSRF refused at registration and at delivery; disabling after days of failure;
manual redelivery; event types limited by scopes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from typing import Any

import grpc
import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from onecard.identity.v1 import identity_pb2 as ipb
from onecard.ledger.v1 import ledger_pb2 as lpb
from onecard.webhooks.v1 import webhooks_pb2 as pb
from tests.conftest import RunningService
from tests.ledger.support import allow_credit
from tests.mesh import connect_nats
from tests.webhooks.conftest import RECEIVER_HOST
from tests.webhooks.support import FAIL, HANG, OK, REFUSE, MovableClock, Names, Receiver, eventually, refused

ALL_READ = ["wallets:read", "members:read", "ledger:admin", "devices:admin", "webhooks:manage"]
MEMBER_TYPES = ["payment.booked", "refund.booked", "topup.booked", "member.frozen", "member.unfrozen", "card.lost"]


class Campus:
    """A tenant in identity and the ledger: a bank, a canteen, and members with cash purses."""

    def __init__(self, identity: RunningService, ledger: RunningService):
        self.identity, self.ledger = identity.stub, ledger.stub
        self.tenant_id = ""
        self.bank_id = self.merchant_id = ""
        self.cash: dict[str, str] = {}

    async def open(self) -> Campus:
        tenant = await self.identity.CreateTenant(ipb.CreateTenantRequest(
            name="Hook University", kind=ipb.TENANT_KIND_UNIVERSITY, time_zone="Asia/Shanghai", currency="CNY"))
        self.tenant_id = tenant.tenant.tenant_id
        self.bank_id = await self._account(lpb.OWNER_KIND_TENANT, "bank", lpb.PURSE_KIND_BANK_CLEARING)
        await allow_credit(self.ledger, self.tenant_id, self.bank_id)
        self.merchant_id = await self._account(lpb.OWNER_KIND_MERCHANT, "canteen", lpb.PURSE_KIND_MERCHANT_SETTLEMENT)
        return self

    async def _account(self, owner_kind: int, owner_id: str, purse_kind: int) -> str:
        answer = await self.ledger.OpenAccount(lpb.OpenAccountRequest(
            tenant_id=self.tenant_id, owner_kind=owner_kind, owner_id=owner_id, purse_kind=purse_kind))
        return answer.account.account.account_id

    async def member(self, number: str) -> str:
        created = await self.identity.CreateMember(ipb.CreateMemberRequest(
            tenant_id=self.tenant_id, external_number=number, name=f"Member {number}"))
        member_id = created.member.member_id
        self.cash[member_id] = await self._account(lpb.OWNER_KIND_MEMBER, member_id, lpb.PURSE_KIND_CASH)
        return member_id

    async def top_up(self, member_id: str, amount_fen: int) -> None:
        await self.ledger.TopUp(lpb.TopUpRequest(tenant_id=self.tenant_id, idempotency_key=str(uuid.uuid4()),
                                                 from_account_id=self.bank_id, to_account_id=self.cash[member_id],
                                                 amount_fen=amount_fen))

    async def pay(self, member_id: str, amount_fen: int) -> str:
        paid = await self.ledger.Pay(lpb.PayRequest(tenant_id=self.tenant_id, idempotency_key=str(uuid.uuid4()),
                                                    merchant_account_id=self.merchant_id, device_id="pos-1",
                                                    legs=[lpb.PayLeg(account_id=self.cash[member_id],
                                                                     amount_fen=amount_fen)]))
        return paid.transfer.transfer_id

    async def refund(self, transfer_id: str) -> None:
        await self.ledger.Refund(lpb.RefundRequest(tenant_id=self.tenant_id, idempotency_key=str(uuid.uuid4()),
                                                   payment_transfer_id=transfer_id))

    async def freeze(self, member_id: str) -> None:
        await self.identity.FreezeMember(ipb.FreezeMemberRequest(tenant_id=self.tenant_id, member_id=member_id,
                                                                 reason="lost wallet"))

    async def unfreeze(self, member_id: str) -> None:
        await self.identity.UnfreezeMember(ipb.UnfreezeMemberRequest(tenant_id=self.tenant_id, member_id=member_id))

    async def lose_card(self, member_id: str, card_uid: str) -> None:
        await self.identity.BindCard(ipb.BindCardRequest(tenant_id=self.tenant_id, member_id=member_id,
                                                         card_uid=card_uid))
        await self.identity.ReportCardLost(ipb.ReportCardLostRequest(tenant_id=self.tenant_id, member_id=member_id,
                                                                     card_uid=card_uid))


async def create_endpoint(webhooks: RunningService, tenant_id: str, url: str, *, event_types: list[str] | None = None,
                          scopes: list[str] | None = None, client_id: str = "client-1",
                          **fields: Any) -> pb.CreateEndpointResponse:
    return await webhooks.stub.CreateEndpoint(pb.CreateEndpointRequest(
        tenant_id=tenant_id, client_id=client_id, caller_scopes=scopes or ALL_READ, url=url,
        event_types=event_types or MEMBER_TYPES, idempotency_key=str(uuid.uuid4()),
        key_scope=f"client:{client_id}", **fields))


async def deliveries(webhooks: RunningService, tenant_id: str, endpoint_id: str, *, client_id: str = "client-1",
                     ) -> list[pb.Delivery]:
    answer = await webhooks.stub.ListDeliveries(pb.ListDeliveriesRequest(
        tenant_id=tenant_id, client_id=client_id, endpoint_id=endpoint_id, page_size=200))
    return list(reversed(answer.deliveries))


@contextlib.asynccontextmanager
async def time_passing(clock: MovableClock, *, step_s: float = 2.5, every_s: float = 0.05):
    """The service's clock runs ahead while the block runs, so retries come due at once."""
    async def tick() -> None:
        while True:
            await asyncio.sleep(every_s)
            clock.advance(seconds=step_s)

    task = asyncio.ensure_future(tick())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def verify(secret: str, received: Any) -> dict[str, Any]:
    return Webhook(secret).verify(received.body, received.headers)


async def test_every_event_arrives_at_least_once_in_order_per_member_through_refusals_timeouts_and_500s(
        identity: RunningService, ledger: RunningService, webhooks: RunningService, receiver: Receiver,
        clock: MovableClock) -> None:
    campus = await Campus(identity, ledger).open()
    created = await create_endpoint(webhooks, campus.tenant_id, receiver.url)
    endpoint_id, secret = created.endpoint.endpoint_id, created.secret
    assert secret.startswith("whsec_")
    await receiver.set_mode(REFUSE)
    ann, bob = await campus.member("A1"), await campus.member("B1")
    expected: dict[str, list[str]] = {ann: [], bob: []}
    made = 0

    async def step(member_id: str, event_type: str, action: Any) -> None:
        nonlocal made
        await action
        made += 1
        expected[member_id].append(event_type)
        # Each event is fanned out before the next is made, so the order per member is the test's.
        await eventually(lambda: _count(webhooks, campus.tenant_id, endpoint_id, made), what=f"{event_type} fanned out")

    await step(ann, "topup.booked", campus.top_up(ann, 5_000))
    await step(bob, "topup.booked", campus.top_up(bob, 3_000))
    payment = campus.pay(ann, 1_200)
    await step(ann, "payment.booked", payment)
    await step(ann, "member.frozen", campus.freeze(ann))
    await step(bob, "card.lost", campus.lose_card(bob, "0A0B0C0D0E"))
    await step(ann, "member.unfrozen", campus.unfreeze(ann))
    bob_paid = await campus.pay(bob, 800)
    made += 1
    expected[bob].append("payment.booked")
    await eventually(lambda: _count(webhooks, campus.tenant_id, endpoint_id, made), what="payment fanned out")
    await step(bob, "refund.booked", campus.refund(bob_paid))

    async def attempts_with(kind: str) -> bool:
        for delivery in await deliveries(webhooks, campus.tenant_id, endpoint_id):
            full = await webhooks.stub.GetDelivery(pb.GetDeliveryRequest(
                tenant_id=campus.tenant_id, client_id="client-1", delivery_id=delivery.delivery_id))
            if any(a.error_kind == kind or (kind == "500" and a.response_status == 500)
                   for a in full.delivery.attempt_log):
                return True
        return False

    async with time_passing(clock):
        await eventually(lambda: attempts_with("connect"), what="an attempt refused")
        await receiver.set_mode(HANG)
        await eventually(lambda: attempts_with("timeout"), what="an attempt timed out")
        await receiver.set_mode(FAIL)
        await eventually(lambda: attempts_with("500"), what="an attempt answered 500")
        await receiver.set_mode(OK)

        async def all_delivered() -> bool:
            listed = await deliveries(webhooks, campus.tenant_id, endpoint_id)
            return len(listed) == made and all(d.status == pb.DELIVERY_STATUS_DELIVERED for d in listed)

        await eventually(all_delivered, what="every delivery delivered", deadline_s=60)

    listed = await deliveries(webhooks, campus.tenant_id, endpoint_id)
    accepted = receiver.accepted()
    # At least once: every delivery's message reached the receiver and was accepted.
    assert {d.message_id for d in listed} <= {r.headers["webhook-id"] for r in accepted}
    # Signed: every request the receiver got verifies with the endpoint's secret.
    for received in receiver.requests:
        assert verify(secret, received) == received.message
    # In order per member: the first acceptance of each message, per member, in the order made.
    seen: set[str] = set()
    order: dict[str, list[str]] = {ann: [], bob: []}
    for received in accepted:
        if received.headers["webhook-id"] in seen:
            continue
        seen.add(received.headers["webhook-id"])
        order[received.message["data"]["member_id"]].append(received.message["type"])
    assert order == expected
    # Ids and amounts only: no card UID, no name, no freeze reason.
    bodies = b"".join(r.body for r in accepted)
    assert b"0A0B0C0D0E" not in bodies and b"Member A1" not in bodies and b"lost wallet" not in bodies
    payment_message = next(r.message for r in accepted if r.message["type"] == "payment.booked"
                           and r.message["data"]["member_id"] == ann)
    assert payment_message["data"]["amount_fen"] == 1_200
    assert payment_message["data"]["member_postings"] == [
        {"account_id": campus.cash[ann], "purse_kind": "cash", "amount_fen": -1_200}]
    # Each attempt is logged: status or error kind, latency, at most 1 KiB of the body.
    logs = [a for d in listed for a in (await webhooks.stub.GetDelivery(pb.GetDeliveryRequest(
        tenant_id=campus.tenant_id, client_id="client-1", delivery_id=d.delivery_id))).delivery.attempt_log]
    kinds = {a.error_kind or str(a.response_status) for a in logs}
    assert {"connect", "timeout", "500", "204"} <= kinds
    assert all(len(a.response_body.encode()) <= 1024 for a in logs)
    assert any(a.response_status == 500 and len(a.response_body) == 1024 for a in logs)


async def _count(webhooks: RunningService, tenant_id: str, endpoint_id: str, count: int) -> bool:
    return len(await deliveries(webhooks, tenant_id, endpoint_id)) >= count


async def test_a_rotated_secret_signs_beside_the_old_one_during_the_overlap_and_alone_after(
        identity: RunningService, ledger: RunningService, webhooks: RunningService, receiver: Receiver,
        clock: MovableClock) -> None:
    campus = await Campus(identity, ledger).open()
    created = await create_endpoint(webhooks, campus.tenant_id, receiver.url, event_types=["topup.booked"])
    old = created.secret
    ann = await campus.member("A1")
    key = str(uuid.uuid4())
    rotate = pb.RotateSecretRequest(tenant_id=campus.tenant_id, client_id="client-1",
                                    endpoint_id=created.endpoint.endpoint_id, overlap_s=3600, idempotency_key=key,
                                    key_scope="client:client-1")
    rotated = await webhooks.stub.RotateSecret(rotate)
    new = rotated.secret
    assert new != old and new.startswith("whsec_")
    # A repeat of the rotation answers the same secret and makes no third.
    assert (await webhooks.stub.RotateSecret(rotate)).secret == new
    assert len(rotated.endpoint.secrets) == 2

    await campus.top_up(ann, 100)
    first = await eventually(lambda: _accepted(receiver, 1), what="a delivery during the overlap")
    assert len(first.headers["webhook-signature"].split(" ")) == 2
    assert verify(old, first) and verify(new, first)

    clock.advance(hours=2)
    await campus.top_up(ann, 200)
    second = await eventually(lambda: _accepted(receiver, 2), what="a delivery after the overlap")
    assert verify(new, second)["data"]["amount_fen"] == 200
    with pytest.raises(WebhookVerificationError):
        verify(old, second)


async def _accepted(receiver: Receiver, count: int) -> Any:
    accepted = receiver.accepted()
    return accepted[count - 1] if len(accepted) >= count else None


@pytest.mark.parametrize("url", [
    "https://10.0.0.1/hooks",
    "https://192.168.1.20/hooks",
    "https://172.16.0.5/hooks",
    "https://100.64.1.1/hooks",
    "https://169.254.169.254/latest/meta-data",
    "https://[fd00::1]/hooks",
    "https://[fe80::1]/hooks",
    "https://[::ffff:10.0.0.1]/hooks",
    "https://[64:ff9b::a00:1]/hooks",
    "https://224.0.0.1/hooks",
    "https://0.0.0.0/hooks",
    "https://internal.test/hooks",
    "http://public.test/hooks",
    "ftp://public.test/hooks",
    "https://user:pw@public.test/hooks",
])
async def test_a_target_that_is_not_public_https_is_refused_at_registration_and_nothing_is_stored(
        webhooks: RunningService, names: Names, url: str) -> None:
    names.answers.update({"internal.test": ["93.184.216.34", "10.9.9.9"], "public.test": ["93.184.216.34"]})
    tenant_id = str(uuid.uuid4())
    code, reason = await refused(create_endpoint(webhooks, tenant_id, url))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "TARGET_NOT_ALLOWED")
    listed = await webhooks.stub.ListEndpoints(pb.ListEndpointsRequest(tenant_id=tenant_id, client_id="client-1"))
    assert list(listed.endpoints) == []


async def test_private_targets_need_the_tenants_admin_and_never_reach_link_local(
        webhooks: RunningService, names: Names) -> None:
    tenant_id = str(uuid.uuid4())
    names.answers["intranet.test"] = ["10.20.30.40"]
    code, reason = await refused(create_endpoint(webhooks, tenant_id, "https://intranet.test/hooks",
                                                 allow_private_targets=True))
    assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "PRIVATE_TARGETS_NOT_ALLOWED")
    admin = [*ALL_READ, "clients:admin"]
    allowed = await create_endpoint(webhooks, tenant_id, "https://intranet.test/hooks", scopes=admin,
                                    allow_private_targets=True)
    assert allowed.endpoint.allow_private_targets
    code, reason = await refused(create_endpoint(webhooks, tenant_id, "https://169.254.169.254/", scopes=admin,
                                                 allow_private_targets=True))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "TARGET_NOT_ALLOWED")


async def test_a_name_that_resolves_to_a_private_address_at_delivery_is_not_connected_to(
        identity: RunningService, ledger: RunningService, webhooks: RunningService, receiver: Receiver,
        names: Names) -> None:
    campus = await Campus(identity, ledger).open()
    created = await create_endpoint(webhooks, campus.tenant_id, f"http://{RECEIVER_HOST}:{receiver.port}/hooks",
                                    event_types=["topup.booked"])
    ann = await campus.member("A1")
    await campus.top_up(ann, 100)
    first = await eventually(lambda: _accepted(receiver, 1), what="the first delivery, by name")
    # Sent to the checked address, with the name as Host.
    assert first.headers["host"] == f"{RECEIVER_HOST}:{receiver.port}"

    names.answers[RECEIVER_HOST] = ["10.0.0.7"]
    await campus.top_up(ann, 200)

    async def refused_attempt() -> Any:
        for delivery in await deliveries(webhooks, campus.tenant_id, created.endpoint.endpoint_id):
            full = (await webhooks.stub.GetDelivery(pb.GetDeliveryRequest(
                tenant_id=campus.tenant_id, client_id="client-1", delivery_id=delivery.delivery_id))).delivery
            if any(a.error_kind == "target_refused" for a in full.attempt_log):
                return full
        return None

    full = await eventually(refused_attempt, what="an attempt refused at delivery")
    assert full.status == pb.DELIVERY_STATUS_PENDING
    assert len(receiver.requests) == 1


async def test_an_endpoint_failing_for_days_is_disabled_with_an_alarm_and_enabled_again_on_request(
        identity: RunningService, ledger: RunningService, webhooks: RunningService, receiver: Receiver,
        clock: MovableClock, nats_url: str) -> None:
    campus = await Campus(identity, ledger).open()
    created = await create_endpoint(webhooks, campus.tenant_id, receiver.url, event_types=["topup.booked"])
    endpoint_id = created.endpoint.endpoint_id
    await receiver.set_mode(FAIL)
    ann = await campus.member("A1")
    nc = await connect_nats(nats_url)
    try:
        alarms = await nc.jetstream().subscribe("webhooks.endpoint.disabled", stream="WEBHOOKS")
        await campus.top_up(ann, 100)
        await eventually(lambda: _accepted_or_failed(receiver), what="a first failed attempt")

        async def disabled() -> Any:
            # A new event each simulated half-day keeps the endpoint failing after the first
            # delivery gives up (24 h).
            clock.advance(hours=12)
            await campus.top_up(ann, 1)
            answer = await webhooks.stub.GetEndpoint(pb.GetEndpointRequest(
                tenant_id=campus.tenant_id, client_id="client-1", endpoint_id=endpoint_id))
            return answer.endpoint if answer.endpoint.state == pb.ENDPOINT_STATE_DISABLED_FAILING else None

        endpoint = await eventually(disabled, what="the endpoint disabled", deadline_s=60)
        assert endpoint.disabled_reason and endpoint.HasField("disabled_at")
        alarm = await alarms.next_msg(timeout=10)
        body = json.loads(alarm.data)
        assert body["type"] == "webhooks.endpoint.disabled"
        assert body["data"]["endpoint_id"] == endpoint_id and body["data"]["client_id"] == "client-1"
    finally:
        await nc.close()

    given_up = [d for d in await deliveries(webhooks, campus.tenant_id, endpoint_id)
                if d.status == pb.DELIVERY_STATUS_FAILED]
    assert given_up, "the first delivery gave up after the retry window"

    await receiver.set_mode(OK)
    enabled = await webhooks.stub.UpdateEndpoint(pb.UpdateEndpointRequest(
        tenant_id=campus.tenant_id, client_id="client-1", caller_scopes=ALL_READ, endpoint_id=endpoint_id,
        enabled=True))
    assert enabled.endpoint.state == pb.ENDPOINT_STATE_ENABLED and not enabled.endpoint.HasField("failing_since")
    before = len(receiver.accepted())
    await campus.top_up(ann, 300)
    await eventually(lambda: _accepted(receiver, before + 1), what="a delivery after enabling")


async def _accepted_or_failed(receiver: Receiver) -> bool:
    return bool(receiver.requests)


async def test_a_delivery_is_redelivered_on_request_with_the_same_webhook_id(
        identity: RunningService, ledger: RunningService, webhooks: RunningService, receiver: Receiver) -> None:
    campus = await Campus(identity, ledger).open()
    created = await create_endpoint(webhooks, campus.tenant_id, receiver.url, event_types=["topup.booked"])
    ann = await campus.member("A1")
    await campus.top_up(ann, 100)
    first = await eventually(lambda: _accepted(receiver, 1), what="the delivery")
    (delivery,) = await deliveries(webhooks, campus.tenant_id, created.endpoint.endpoint_id)
    request = pb.RedeliverRequest(tenant_id=campus.tenant_id, client_id="client-1", delivery_id=delivery.delivery_id,
                                  idempotency_key="again-1", key_scope="client:client-1")
    again = await webhooks.stub.Redeliver(request)
    assert again.delivery.redelivery_of == delivery.delivery_id
    assert again.delivery.message_id == delivery.message_id
    # The same key answers the same redelivery.
    assert (await webhooks.stub.Redeliver(request)).delivery.delivery_id == again.delivery.delivery_id
    second = await eventually(lambda: _accepted(receiver, 2), what="the redelivery")
    assert second.headers["webhook-id"] == first.headers["webhook-id"]
    assert second.body == first.body
    assert len(await deliveries(webhooks, campus.tenant_id, created.endpoint.endpoint_id)) == 2
    # Another client sees none of it.
    code, reason = await refused(webhooks.stub.GetDelivery(pb.GetDeliveryRequest(
        tenant_id=campus.tenant_id, client_id="client-2", delivery_id=delivery.delivery_id)))
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "DELIVERY_NOT_FOUND")


async def test_event_types_are_limited_to_what_the_clients_scopes_read(webhooks: RunningService,
                                                                      receiver: Receiver) -> None:
    tenant_id = str(uuid.uuid4())
    for event_type, scopes in (("device.alarm", ["wallets:read", "webhooks:manage"]),
                               ("payment.booked", ["members:read", "webhooks:manage"]),
                               ("grant_batch.finished", ["wallets:read", "webhooks:manage"])):
        code, reason = await refused(create_endpoint(webhooks, tenant_id, receiver.url, event_types=[event_type],
                                                     scopes=scopes))
        assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "EVENT_TYPE_NOT_ALLOWED")
    code, reason = await refused(create_endpoint(webhooks, tenant_id, receiver.url, event_types=["payment.sent"]))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "UNKNOWN_EVENT_TYPE")
    ok = await create_endpoint(webhooks, tenant_id, receiver.url, event_types=["device.alarm"],
                               scopes=["devices:admin", "webhooks:manage"])
    assert list(ok.endpoint.event_types) == ["device.alarm"]


async def test_a_finished_grant_batch_reaches_a_client_with_ledger_admin(
        identity: RunningService, ledger: RunningService, webhooks: RunningService, receiver: Receiver) -> None:
    campus = await Campus(identity, ledger).open()
    created = await create_endpoint(webhooks, campus.tenant_id, receiver.url, event_types=["grant_batch.finished"],
                                    scopes=["ledger:admin", "webhooks:manage"])
    ann = await campus.member("A1")
    funding = await campus._account(lpb.OWNER_KIND_TENANT, "finance", lpb.PURSE_KIND_SUBSIDY_FUNDING)
    await campus.ledger.DefineProgram(lpb.DefineProgramRequest(tenant_id=campus.tenant_id,
                                                               purse_kind=lpb.PURSE_KIND_SUBSIDY, ref="meal",
                                                               funding_account_id=funding))
    started = await campus.ledger.StartGrantBatch(lpb.StartGrantBatchRequest(
        tenant_id=campus.tenant_id, bill_number="BILL-1", purse_kind=lpb.PURSE_KIND_SUBSIDY, ref="meal",
        rows=[lpb.GrantRow(member_id=ann, amount_fen=2_000)]))
    received = await eventually(lambda: _accepted(receiver, 1), what="the finished batch delivered")
    message = verify(created.secret, received)
    assert message["type"] == "grant_batch.finished"
    assert message["data"]["batch_id"] == started.batch.batch_id
    assert (message["data"]["bill_number"], message["data"]["granted_fen"]) == ("BILL-1", 2_000)


async def test_a_purse_falling_below_its_threshold_reaches_the_partner_once_per_crossing(
        identity: RunningService, ledger: RunningService, webhooks: RunningService, receiver: Receiver) -> None:
    """The ledger's ``ledger.balance.low`` (one per crossing, from the payment's own transaction) as
    the ``balance.low`` webhook a mini-program shows its member."""
    campus = await Campus(identity, ledger).open()
    created = await create_endpoint(webhooks, campus.tenant_id, receiver.url, event_types=["balance.low"],
                                    scopes=["wallets:read", "webhooks:manage"])
    ann = await campus.member("A1")
    await campus.top_up(ann, 5_000)
    await campus.ledger.SetLowBalanceThreshold(lpb.SetLowBalanceThresholdRequest(
        tenant_id=campus.tenant_id, account_id=campus.cash[ann], threshold_fen=2_000))
    await campus.pay(ann, 2_000)   # 3,000 left: above the threshold, nothing to say
    await campus.pay(ann, 1_500)   # 1,500 left: crossed
    await campus.pay(ann, 500)     # 1,000 left: still below, no second message
    received = await eventually(lambda: _accepted(receiver, 1), what="the low balance delivered")
    message = verify(created.secret, received)
    assert message["type"] == "balance.low"
    assert message["data"] == {"tenant_id": campus.tenant_id, "member_id": ann, "account_id": campus.cash[ann],
                               "purse_kind": "cash", "balance_fen": 1_500, "threshold_fen": 2_000}
    # Back above and below again: a second crossing, a second message.
    await campus.top_up(ann, 4_000)    # 5,000
    await campus.pay(ann, 3_500)       # 1,500: crossed again
    second = verify(created.secret, await eventually(lambda: _accepted(receiver, 2), what="the second crossing"))
    assert (second["type"], second["data"]["balance_fen"]) == ("balance.low", 1_500)
    assert len([d for d in await deliveries(webhooks, campus.tenant_id, created.endpoint.endpoint_id)]) == 2
