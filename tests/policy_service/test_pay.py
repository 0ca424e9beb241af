"""A payment end to end: PolicyService.Pay evaluates the published rules and pays the plan in one
ledger transfer with its guards (and, for a benefit, the tenant's funding as sponsor)."""

from __future__ import annotations

import asyncio
import uuid

import grpc

from onecard.ledger.v1 import ledger_pb2 as lpb
from onecard.policy.v1 import policy_pb2 as pb
from tests.conftest import RunningService
from tests.policy_service.support import (
    BREAKFAST,
    DINNER,
    LUNCH,
    add_voucher,
    campus,
    payment,
    publish,
    refused,
    university,
)


async def balance(ledger: RunningService, tenant_id: str, account_id: str) -> int:
    answer = await ledger.stub.GetBalances(lpb.GetBalancesRequest(tenant_id=tenant_id, account_ids=[account_id]))
    return answer.accounts[0].balance.available_fen


async def test_lunch_is_paid_from_cash(policy: RunningService, ledger: RunningService) -> None:
    c = await campus(ledger.stub, cash_fen=10_000)
    await publish(policy.stub, c.tenant_id, university(canteen_merchant_id=c.merchant_id))
    answer = await policy.stub.Pay(pb.PayRequest(tenant_id=c.tenant_id, idempotency_key="lunch-1",
                                                 request=payment(c, amount_fen=1200, at=LUNCH),
                                                 external_ref="order-77"))
    assert (answer.paid, answer.reason, answer.repeated) == (True, "APPROVED", False)
    assert [(leg.account_id, leg.amount_fen) for leg in answer.plan.legs] == [(c.cash_id, 1200)]
    assert answer.transfer.kind == lpb.TRANSFER_KIND_PAYMENT and answer.transfer.external_ref == "order-77"
    assert {p.account_id: p.amount_fen for p in answer.transfer.postings} == {c.cash_id: -1200, c.merchant_id: 1200}
    assert await balance(ledger, c.tenant_id, c.cash_id) == 8_800
    # The plan's guards went with it: the ledger raised the counters.
    counters = await ledger.stub.GetUsageCounters(lpb.GetUsageCountersRequest(
        tenant_id=c.tenant_id, counter_keys=[g.counter_key for g in answer.plan.guards]))
    assert all(counter.value > 0 for counter in counters.counters)
    # The same key again answers the same payment; nothing moves twice.
    again = await policy.stub.Pay(pb.PayRequest(tenant_id=c.tenant_id, idempotency_key="lunch-1",
                                                request=payment(c, amount_fen=1200, at=LUNCH), external_ref="order-77"))
    assert again.paid and again.repeated and again.transfer.transfer_id == answer.transfer.transfer_id
    assert await balance(ledger, c.tenant_id, c.cash_id) == 8_800
    # The key at another merchant is another request.
    other = payment(c, amount_fen=1200, at=LUNCH)
    other.merchant_id = c.bank_id
    assert (await refused(policy.stub.Pay(pb.PayRequest(tenant_id=c.tenant_id, idempotency_key="lunch-1",
                                                        request=other))))[:2] == (grpc.StatusCode.ABORTED,
                                                                                  "IDEMPOTENCY_KEY_REUSED")


async def test_free_breakfast_is_paid_by_the_tenant_once(policy: RunningService, ledger: RunningService) -> None:
    c = await campus(ledger.stub, cash_fen=10_000)
    await publish(policy.stub, c.tenant_id, university(canteen_merchant_id=c.merchant_id))
    employee = {"role": "employee"}
    first = await policy.stub.Pay(pb.PayRequest(tenant_id=c.tenant_id, idempotency_key="bf-1",
                                                request=payment(c, amount_fen=800, at=BREAKFAST, groups=employee)))
    assert first.paid and first.plan.benefit == "free-breakfast" and first.plan.charged_fen == 0
    assert first.plan.benefit_funding_fen == 800 and not first.plan.legs
    # The member paid nothing; the tenant's benefit funding paid the merchant.
    assert await balance(ledger, c.tenant_id, c.cash_id) == 10_000
    legs = {p.account_id: p.amount_fen for p in first.transfer.postings}
    assert legs[c.merchant_id] == 800 and sorted(legs.values()) == [-800, 800]
    # A second breakfast the same morning is the member's own (the benefit is once per breakfast).
    second = await policy.stub.Pay(pb.PayRequest(tenant_id=c.tenant_id, idempotency_key="bf-2",
                                                 request=payment(c, amount_fen=800, at=BREAKFAST, groups=employee)))
    assert second.paid and not second.plan.benefit and second.plan.charged_fen == 800
    assert await balance(ledger, c.tenant_id, c.cash_id) == 9_200


async def test_the_dinner_voucher_covers_part(policy: RunningService, ledger: RunningService) -> None:
    c = await campus(ledger.stub, cash_fen=10_000)
    await add_voucher(ledger.stub, c, 3000)
    await publish(policy.stub, c.tenant_id, university(canteen_merchant_id=c.merchant_id))
    answer = await policy.stub.Pay(pb.PayRequest(tenant_id=c.tenant_id, idempotency_key="dinner-1",
                                                 request=payment(c, amount_fen=2000, at=DINNER)))
    assert answer.paid
    legs = {leg.account_id: leg.amount_fen for leg in answer.plan.legs}
    assert legs[c.voucher_id] == 1500 and legs[c.cash_id] == 500
    assert await balance(ledger, c.tenant_id, c.voucher_id) == 1500


async def test_a_declined_plan_moves_nothing_and_pin_is_asked_above_the_threshold(
        policy: RunningService, ledger: RunningService) -> None:
    c = await campus(ledger.stub, cash_fen=100_000)
    await publish(policy.stub, c.tenant_id, university(canteen_merchant_id=c.merchant_id))
    too_much = await policy.stub.Pay(pb.PayRequest(tenant_id=c.tenant_id, idempotency_key="big",
                                                   request=payment(c, amount_fen=20_000, at=LUNCH)))
    assert not too_much.paid and too_much.reason.startswith("LIMIT_EXCEEDED") and not too_much.transfer.transfer_id
    asked = payment(c, amount_fen=6000, at=LUNCH)
    needs_pin = await policy.stub.Pay(pb.PayRequest(tenant_id=c.tenant_id, idempotency_key="pin", request=asked))
    assert (needs_pin.paid, needs_pin.reason) == (False, "PIN_REQUIRED") and needs_pin.plan.pin_required
    assert await balance(ledger, c.tenant_id, c.cash_id) == 100_000
    asked.pin_verified = True
    verified = await policy.stub.Pay(pb.PayRequest(tenant_id=c.tenant_id, idempotency_key="pin", request=asked))
    assert verified.paid
    assert await balance(ledger, c.tenant_id, c.cash_id) == 94_000
    assert await refused(policy.stub.Pay(pb.PayRequest(tenant_id=c.tenant_id, idempotency_key="",
                                                       request=asked))) == (
        grpc.StatusCode.INVALID_ARGUMENT, "INVALID_IDEMPOTENCY_KEY", {})


async def test_concurrent_payments_never_pass_the_daily_cap(policy: RunningService, ledger: RunningService) -> None:
    """100 concurrent app payments of 700 fen at lunch against the 10,000-fen daily canteen cap:
    the plans are made on counters read before the others paid, and the ledger's guards keep the
    total within the cap anyway."""
    c = await campus(ledger.stub, cash_fen=1_000_000)
    rules = university(canteen_merchant_id=c.merchant_id)
    # Without the three-meals-per-period count, so the spending cap is the one that binds.
    rules["limits"] = [limit for limit in rules["limits"] if limit["name"] != "meals-per-period"]
    await publish(policy.stub, c.tenant_id, rules)

    async def one(n: int) -> bool:
        try:
            answer = await policy.stub.Pay(pb.PayRequest(tenant_id=c.tenant_id, idempotency_key=f"c-{n}",
                                                         request=payment(c, amount_fen=700, at=LUNCH)))
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error
            return False
        return answer.paid

    paid = sum(await asyncio.gather(*(one(n) for n in range(100))))
    spent = 1_000_000 - await balance(ledger, c.tenant_id, c.cash_id)
    assert spent == 700 * paid and spent <= 10_000 and paid == 10_000 // 700


async def test_pay_needs_a_published_rule_set(policy: RunningService, ledger: RunningService) -> None:
    c = await campus(ledger.stub, cash_fen=1000)
    code, reason, _ = await refused(policy.stub.Pay(pb.PayRequest(
        tenant_id=c.tenant_id, idempotency_key=str(uuid.uuid4()), request=payment(c, amount_fen=100, at=LUNCH))))
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "NO_PUBLISHED_RULE_SET")


async def test_pay_many_plans_books_and_answers_each_payment_alone(policy: RunningService,
                                                                   ledger: RunningService) -> None:
    """PolicyService.PayMany (the device hub's batches): a paid one, a declined plan, a refused
    request and a repeat in one call, each answered as Pay would have answered it, in order."""
    from runtime.batching import item_refusal
    from runtime.grpc_client import error_info

    c = await campus(ledger.stub, cash_fen=100_000)
    await publish(policy.stub, c.tenant_id, university(canteen_merchant_id=c.merchant_id))
    lunch = pb.PayRequest(tenant_id=c.tenant_id, idempotency_key="many-1", request=payment(c, amount_fen=1200, at=LUNCH))
    answer = await policy.stub.PayMany(pb.PayManyRequest(payments=[
        lunch,
        pb.PayRequest(tenant_id=c.tenant_id, idempotency_key="many-2", request=payment(c, amount_fen=20_000, at=LUNCH)),
        pb.PayRequest(tenant_id=c.tenant_id, idempotency_key="", request=payment(c, amount_fen=100, at=LUNCH)),
    ]))
    first, declined, bad = answer.results
    assert first.paid.paid and first.paid.reason == "APPROVED"
    assert not declined.paid.paid and declined.paid.reason.startswith("LIMIT_EXCEEDED")
    refusal = item_refusal(bad.error)
    assert (refusal.code(), error_info(refusal)[0]) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_IDEMPOTENCY_KEY")
    assert await balance(ledger, c.tenant_id, c.cash_id) == 100_000 - 1200
    again = await policy.stub.PayMany(pb.PayManyRequest(payments=[lunch]))
    assert again.results[0].paid.repeated
    assert again.results[0].paid.transfer.transfer_id == first.paid.transfer.transfer_id
    assert await balance(ledger, c.tenant_id, c.cash_id) == 100_000 - 1200
    assert (await refused(policy.stub.PayMany(pb.PayManyRequest())))[:2] == (grpc.StatusCode.INVALID_ARGUMENT,
                                                                            "INVALID_BATCH")
