"""Evaluate and DryRun against a real ledger: the member's purses and counters come from it, the
plan names the member's ledger accounts, and its guards, paid with LedgerService.Pay, hold the
caps even when many payments race."""

from __future__ import annotations

import asyncio
import uuid

import grpc

from onecard.ledger.v1 import ledger_pb2 as lpb
from onecard.policy.v1 import policy_pb2 as pb
from tests.policy_service.support import (
    BREAKFAST,
    DINNER,
    LUNCH,
    add_voucher,
    campus,
    document,
    eventually,
    payment,
    publish,
    refused,
    university,
)


async def test_evaluate_plans_from_the_members_purses_with_their_account_ids(policy, ledger):
    c = await campus(ledger.stub, cash_fen=50_000)
    version = await publish(policy.stub, c.tenant_id, university(canteen_merchant_id=c.merchant_id))
    plan = (await policy.stub.Evaluate(pb.EvaluateRequest(
        tenant_id=c.tenant_id, request=payment(c, amount_fen=1200, at=LUNCH)))).plan
    assert (plan.approved, plan.reason, plan.amount_fen, plan.charged_fen) == (True, "APPROVED", 1200, 1200)
    assert [(leg.purse_kind, leg.ref, leg.account_id, leg.amount_fen) for leg in plan.legs] == [
        (lpb.PURSE_KIND_CASH, "", c.cash_id, 1200)]
    assert (plan.scene, plan.meal_period, plan.service_date) == ("canteen", "lunch", "2026-11-26")
    assert (plan.rule_set_version, plan.pin_required) == (version, False)
    limits = {g.counter_key.split(":")[1]: (g.increment, g.limit) for g in plan.guards}
    assert limits == {"daily-canteen": (1200, 10000), "student-daily": (1200, 20000), "meals-per-period": (1, 3)}
    assert {u.counter_key for u in plan.counters} == {g.counter_key for g in plan.guards}
    assert all(u.value == 0 for u in plan.counters)


async def test_a_voucher_at_dinner_and_counters_already_used_come_from_the_ledger(policy, ledger):
    c = await campus(ledger.stub, cash_fen=50_000)
    await add_voucher(ledger.stub, c, 3000)
    await publish(policy.stub, c.tenant_id, university(canteen_merchant_id=c.merchant_id))
    plan = (await policy.stub.Evaluate(pb.EvaluateRequest(
        tenant_id=c.tenant_id, request=payment(c, amount_fen=2000, at=DINNER)))).plan
    assert plan.approved
    assert [(leg.purse_kind, leg.ref, leg.account_id, leg.amount_fen) for leg in plan.legs] == [
        (lpb.PURSE_KIND_VOUCHER, "dinner-voucher", c.voucher_id, 1500), (lpb.PURSE_KIND_CASH, "", c.cash_id, 500)]
    # Pay it; the voucher's once-a-day counter is now used, so the next dinner is all cash.
    await ledger.stub.Pay(lpb.PayRequest(
        tenant_id=c.tenant_id, idempotency_key=str(uuid.uuid4()), merchant_account_id=c.merchant_id,
        legs=[lpb.PayLeg(account_id=leg.account_id, amount_fen=leg.amount_fen) for leg in plan.legs],
        guards=plan.guards))
    # Evaluate may answer from policy's member-state cache until the payment's event reaches it.
    async def voucher_used() -> pb.Plan | None:
        plan = (await policy.stub.Evaluate(pb.EvaluateRequest(
            tenant_id=c.tenant_id, request=payment(c, amount_fen=2000, at=DINNER)))).plan
        return plan if [leg.purse_kind for leg in plan.legs] == [lpb.PURSE_KIND_CASH] else None

    again = await eventually(voucher_used, what="the voucher's counter seen used")
    assert [(leg.purse_kind, leg.amount_fen) for leg in again.legs] == [(lpb.PURSE_KIND_CASH, 2000)]
    used = {u.counter_key.split(":")[1]: u.value for u in again.counters}
    assert used["daily-canteen"] == 2000 and used["dinner-voucher"] == 1


async def test_a_free_breakfast_is_a_benefit_and_declines_say_why(policy, ledger):
    c = await campus(ledger.stub, cash_fen=500)
    await publish(policy.stub, c.tenant_id, university(canteen_merchant_id=c.merchant_id))
    free = (await policy.stub.Evaluate(pb.EvaluateRequest(tenant_id=c.tenant_id, request=payment(
        c, amount_fen=800, at=BREAKFAST, groups={"role": "employee"})))).plan
    assert (free.approved, free.benefit, free.benefit_funding_fen, free.charged_fen, list(free.legs)) == (
        True, "free-breakfast", 800, 0, [])
    poor = (await policy.stub.Evaluate(pb.EvaluateRequest(
        tenant_id=c.tenant_id, request=payment(c, amount_fen=800, at=LUNCH)))).plan
    assert (poor.approved, poor.reason, list(poor.legs), list(poor.guards)) == (False, "INSUFFICIENT_FUNDS", [], [])
    closed = (await policy.stub.Evaluate(pb.EvaluateRequest(
        tenant_id=c.tenant_id, request=payment(c, amount_fen=100, at=LUNCH.replace(hour=15))))).plan
    assert (closed.approved, closed.reason) == (False, "OUTSIDE_MEAL_PERIOD")
    code, reason, _ = await refused(policy.stub.Evaluate(pb.EvaluateRequest(
        tenant_id=c.tenant_id, request=payment(c, amount_fen=100, at=LUNCH, channel="carrier-pigeon"))))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "CHANNEL_INVALID")


async def test_no_published_rule_set_is_a_failed_precondition(policy, ledger):
    c = await campus(ledger.stub)
    code, reason, _ = await refused(policy.stub.Evaluate(pb.EvaluateRequest(
        tenant_id=c.tenant_id, request=payment(c, amount_fen=100, at=LUNCH))))
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "NO_PUBLISHED_RULE_SET")
    # A draft is not enough.
    await policy.stub.CreateRuleSetVersion(pb.CreateRuleSetVersionRequest(
        tenant_id=c.tenant_id, document=document(university())))
    code, reason, _ = await refused(policy.stub.Evaluate(pb.EvaluateRequest(
        tenant_id=c.tenant_id, request=payment(c, amount_fen=100, at=LUNCH))))
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "NO_PUBLISHED_RULE_SET")


async def test_dry_run_evaluates_a_draft_without_publishing_it(policy, ledger):
    c = await campus(ledger.stub)
    published = await publish(policy.stub, c.tenant_id, university(canteen_merchant_id=c.merchant_id))
    stricter = university(canteen_merchant_id=c.merchant_id)
    stricter["limits"][0]["max"] = 500  # canteen-per-payment
    draft = (await policy.stub.CreateRuleSetVersion(pb.CreateRuleSetVersionRequest(
        tenant_id=c.tenant_id, document=document(stricter)))).version.version
    request = payment(c, amount_fen=1200, at=LUNCH)
    tried = (await policy.stub.DryRun(pb.DryRunRequest(tenant_id=c.tenant_id, version=draft, request=request))).plan
    assert (tried.approved, tried.reason, tried.rule_set_version) == (
        False, "LIMIT_EXCEEDED:canteen-per-payment", draft)
    live = (await policy.stub.Evaluate(pb.EvaluateRequest(tenant_id=c.tenant_id, request=request))).plan
    assert (live.approved, live.rule_set_version) == (True, published)
    same = (await policy.stub.DryRun(pb.DryRunRequest(tenant_id=c.tenant_id, version=published,
                                                      request=request))).plan
    assert same == live
    code, reason, _ = await refused(policy.stub.DryRun(pb.DryRunRequest(tenant_id=c.tenant_id, version=42,
                                                                        request=request)))
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "RULE_SET_VERSION_NOT_FOUND")


async def test_the_plans_guards_hold_a_daily_cap_under_100_concurrent_evaluate_and_pay(policy, ledger):
    c = await campus(ledger.stub, cash_fen=100_000)
    doc = university(canteen_merchant_id=c.merchant_id)
    doc["limits"] = [lim for lim in doc["limits"] if lim["name"] != "meals-per-period"]
    next(lim for lim in doc["limits"] if lim["name"] == "daily-canteen")["max"] = 5000
    await publish(policy.stub, c.tenant_id, doc)
    outcomes: list[str] = []

    async def attempt() -> None:
        plan = (await policy.stub.Evaluate(pb.EvaluateRequest(
            tenant_id=c.tenant_id, request=payment(c, amount_fen=700, at=LUNCH)))).plan
        if not plan.approved:
            outcomes.append(plan.reason)
            return
        try:
            await ledger.stub.Pay(lpb.PayRequest(
                tenant_id=c.tenant_id, idempotency_key=str(uuid.uuid4()), merchant_account_id=c.merchant_id,
                legs=[lpb.PayLeg(account_id=leg.account_id, amount_fen=leg.amount_fen) for leg in plan.legs],
                guards=plan.guards))
            outcomes.append("PAID")
        except grpc.aio.AioRpcError as exc:
            outcomes.append(f"{exc.code().name}")

    await asyncio.gather(*(attempt() for _ in range(100)))
    assert len(outcomes) == 100
    assert outcomes.count("PAID") == 5000 // 700  # 7 x 700 = 4900 <= 5000 < 5600
    assert set(outcomes) <= {"PAID", "FAILED_PRECONDITION", "LIMIT_EXCEEDED:daily-canteen"}
    balances = await ledger.stub.GetBalances(lpb.GetBalancesRequest(tenant_id=c.tenant_id, account_ids=[c.cash_id]))
    assert balances.accounts[0].balance.posted_fen == 100_000 - 7 * 700

    async def capped() -> pb.Plan | None:
        plan = (await policy.stub.Evaluate(pb.EvaluateRequest(
            tenant_id=c.tenant_id, request=payment(c, amount_fen=700, at=LUNCH)))).plan
        return plan if not plan.approved else None

    after = await eventually(capped, what="the used cap seen by Evaluate")
    assert (after.approved, after.reason) == (False, "LIMIT_EXCEEDED:daily-canteen")
    assert {u.counter_key.split(":")[1]: u.value for u in after.counters}["daily-canteen"] == 4900


async def test_evaluate_reads_only_the_tenants_own_purses(policy, ledger):
    a = await campus(ledger.stub, cash_fen=50_000)
    b_tenant = str(uuid.uuid4())
    await publish(policy.stub, a.tenant_id, university(canteen_merchant_id=a.merchant_id))
    await publish(policy.stub, b_tenant, university(canteen_merchant_id=a.merchant_id))
    # The same member id asked in tenant B: B's ledger holds no purse of theirs.
    plan = (await policy.stub.Evaluate(pb.EvaluateRequest(
        tenant_id=b_tenant, request=payment(a, amount_fen=1200, at=LUNCH)))).plan
    assert (plan.approved, plan.reason, list(plan.legs)) == (False, "INSUFFICIENT_FUNDS", [])


async def test_a_publication_takes_effect_at_once_here_and_within_the_cache_time_on_other_replicas(
        policy, ledger, launch, database_url, nats_url):
    from onecard.policy.v1 import policy_pb2_grpc
    from services.policy.app import build_app
    from tests.policy_service.conftest import policy_settings

    other = await launch(build_app(policy_settings(database_url=database_url, nats_url=nats_url,
                                                   ledger_target=ledger.target, published_cache_s=0.3)),
                         stub_cls=policy_pb2_grpc.PolicyServiceStub)
    c = await campus(ledger.stub)
    request = payment(c, amount_fen=1200, at=LUNCH)
    # No rule set yet, seen (and remembered) by both replicas.
    for stub in (policy.stub, other.stub):
        code, reason, _ = await refused(stub.Evaluate(pb.EvaluateRequest(tenant_id=c.tenant_id, request=request)))
        assert reason == "NO_PUBLISHED_RULE_SET"
    first = await publish(policy.stub, c.tenant_id, university(canteen_merchant_id=c.merchant_id))
    assert (await policy.stub.Evaluate(pb.EvaluateRequest(tenant_id=c.tenant_id,
                                                          request=request))).plan.rule_set_version == first
    stricter = university(canteen_merchant_id=c.merchant_id)
    stricter["limits"][0]["max"] = 500
    second = await publish(policy.stub, c.tenant_id, stricter)
    plan = (await policy.stub.Evaluate(pb.EvaluateRequest(tenant_id=c.tenant_id, request=request))).plan
    assert (plan.rule_set_version, plan.approved) == (second, False)
    await asyncio.sleep(0.35)
    plan = (await other.stub.Evaluate(pb.EvaluateRequest(tenant_id=c.tenant_id, request=request))).plan
    assert (plan.rule_set_version, plan.approved) == (second, False)


async def test_evaluations_arriving_together_each_get_their_own_member(policy, ledger) -> None:
    """Policy batches the ledger reads of concurrent evaluations; each still sees its own member."""
    from tests.policy_service.support import LUNCH, campus, payment, publish, university

    campuses = [await campus(ledger.stub, cash_fen=1000 + n) for n in range(12)]
    for c in campuses:
        await publish(policy.stub, c.tenant_id, university(canteen_merchant_id=c.merchant_id))
    plans = await asyncio.gather(*(policy.stub.Evaluate(pb.EvaluateRequest(
        tenant_id=c.tenant_id, request=payment(c, amount_fen=1000 + n, at=LUNCH)))
        for n, c in enumerate(campuses) for _ in range(3)))
    for i, answer in enumerate(plans):
        c = campuses[i // 3]
        assert answer.plan.approved, answer.plan.reason
        assert [(leg.account_id, leg.amount_fen) for leg in answer.plan.legs] == [(c.cash_id, 1000 + i // 3)]
