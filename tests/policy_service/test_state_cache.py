"""The member-state cache of Evaluate and DryRun, against a real ledger and its events: a cached
state is dropped by the ledger's events (a top-up, a payment, a freeze, a hold), a read racing an
invalidation is not kept, a max age of 0 reads every time, and Pay never reads from it.

The replicas here keep a state for 60 s, so a change that shows up within the few seconds a test
waits was brought by the ledger's event, not by the entry ageing out."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from prometheus_client import REGISTRY

from onecard.ledger.v1 import ledger_pb2 as lpb
from onecard.policy.v1 import policy_pb2 as pb
from onecard.policy.v1 import policy_pb2_grpc
from runtime.events import Event
from services.policy.app import build_app
from services.policy.domain import MemberPurse
from services.policy.ledger_client import LedgerClient
from services.policy.state_cache import MemberStateCache
from tests.conftest import RunningService
from tests.policy_service.conftest import policy_settings
from tests.policy_service.support import (
    DINNER,
    LUNCH,
    Campus,
    add_voucher,
    campus,
    eventually as support_eventually,
    payment,
    publish,
    top_up,
    university,
)

DEADLINE_S = 5.0
LONG_CACHE_S = 60.0


def cache_count(result: str) -> float:
    return REGISTRY.get_sample_value("onecard_policy_member_state_cache_lookups_total", {"result": result}) or 0.0


def discarded_reads() -> float:
    return REGISTRY.get_sample_value("onecard_policy_member_state_cache_discarded_reads_total") or 0.0


def ledger_events_seen() -> float:
    return REGISTRY.get_sample_value("onecard_policy_member_state_cache_events_total") or 0.0


def cache_detail() -> str:
    lookups = {r: cache_count(r) for r in ("hit", "absent", "expired", "keys", "off")}
    return f"(cache lookups: {lookups}, discarded reads: {discarded_reads()}, ledger events: {ledger_events_seen()})"


async def eventually(check: Callable[[], Awaitable[Any]], *, what: str) -> Any:
    return await support_eventually(check, what=what, deadline_s=DEADLINE_S, detail=cache_detail)


@pytest.fixture
async def cached_policy(launch, database_url: str, nats_url: str, ledger: RunningService) -> RunningService:
    """A policy replica that keeps member states for 60 s: only events can refresh them in a test."""
    app = build_app(policy_settings(database_url=database_url, nats_url=nats_url, ledger_target=ledger.target,
                                    member_state_cache_s=LONG_CACHE_S))
    return await launch(app, stub_cls=policy_pb2_grpc.PolicyServiceStub)


async def evaluate(policy: RunningService, c: Campus, **kwargs: Any) -> pb.Plan:
    kwargs.setdefault("amount_fen", 1200)
    kwargs.setdefault("at", LUNCH)
    return (await policy.stub.Evaluate(pb.EvaluateRequest(tenant_id=c.tenant_id, request=payment(c, **kwargs)))).plan


async def cached(policy: RunningService, c: Campus, **kwargs: Any) -> pb.Plan:
    """Evaluate until the answer came from the cache (the replica follows the ledger's events
    once it is up; until then it reads the ledger every time)."""
    async def hit() -> pb.Plan | None:
        before = cache_count("hit")
        plan = await evaluate(policy, c, **kwargs)
        return plan if cache_count("hit") > before else None

    return await eventually(hit, what="an Evaluate answered from the cache")


async def test_a_cached_evaluate_sees_a_top_up_when_its_event_arrives(cached_policy, ledger):
    c = await campus(ledger.stub, cash_fen=500)
    await publish(cached_policy.stub, c.tenant_id, university(canteen_merchant_id=c.merchant_id))
    poor = await cached(cached_policy, c)
    assert (poor.approved, poor.reason) == (False, "INSUFFICIENT_FUNDS")

    await top_up(ledger.stub, c, c.cash_id, 5000)

    async def approved() -> pb.Plan | None:
        plan = await evaluate(cached_policy, c)
        return plan if plan.approved else None

    plan = await eventually(approved, what="the top-up seen by Evaluate")
    assert [(leg.account_id, leg.amount_fen) for leg in plan.legs] == [(c.cash_id, 1200)]
    # And it is cached again, with the new balance.
    assert (await cached(cached_policy, c)).approved


async def test_a_cached_evaluate_sees_a_payment_its_counters_and_balance(cached_policy, ledger):
    c = await campus(ledger.stub, cash_fen=50_000)
    await add_voucher(ledger.stub, c, 3000)
    await publish(cached_policy.stub, c.tenant_id, university(canteen_merchant_id=c.merchant_id))
    plan = await cached(cached_policy, c, amount_fen=2000, at=DINNER)
    assert [(leg.purse_kind, leg.amount_fen) for leg in plan.legs] == [
        (lpb.PURSE_KIND_VOUCHER, 1500), (lpb.PURSE_KIND_CASH, 500)]

    # Paid with the plan's guards, straight to the ledger: its event names the purses and counters.
    await ledger.stub.Pay(lpb.PayRequest(
        tenant_id=c.tenant_id, idempotency_key=str(uuid.uuid4()), merchant_account_id=c.merchant_id,
        legs=[lpb.PayLeg(account_id=leg.account_id, amount_fen=leg.amount_fen) for leg in plan.legs],
        guards=plan.guards))

    async def voucher_used() -> pb.Plan | None:
        again = await evaluate(cached_policy, c, amount_fen=2000, at=DINNER)
        return again if [leg.purse_kind for leg in again.legs] == [lpb.PURSE_KIND_CASH] else None

    again = await eventually(voucher_used, what="the voucher's once-a-day counter seen used")
    used = {u.counter_key.split(":")[1]: u.value for u in again.counters}
    assert used["daily-canteen"] == 2000 and used["dinner-voucher"] == 1

    # A payment through PolicyService.Pay is seen the same way.
    paid = await cached_policy.stub.Pay(pb.PayRequest(tenant_id=c.tenant_id, idempotency_key="lunch-1",
                                                      request=payment(c, amount_fen=1200, at=LUNCH)))
    assert paid.paid

    async def lunch_counted() -> bool:
        lunch = await evaluate(cached_policy, c)
        return {u.counter_key.split(":")[1]: u.value for u in lunch.counters}["daily-canteen"] == 3200

    await eventually(lunch_counted, what="PolicyService.Pay's counters seen by Evaluate")


async def test_a_cached_evaluate_sees_a_freeze_and_a_hold(cached_policy, ledger):
    c = await campus(ledger.stub, cash_fen=5000)
    await publish(cached_policy.stub, c.tenant_id, university(canteen_merchant_id=c.merchant_id))
    assert (await cached(cached_policy, c)).approved

    await ledger.stub.FreezeAccount(lpb.FreezeAccountRequest(tenant_id=c.tenant_id, account_id=c.cash_id))

    async def declined() -> bool:
        return (await evaluate(cached_policy, c)).reason == "INSUFFICIENT_FUNDS"

    await eventually(declined, what="the frozen cash purse seen by Evaluate")
    await ledger.stub.UnfreezeAccount(lpb.UnfreezeAccountRequest(tenant_id=c.tenant_id, account_id=c.cash_id))

    async def approved() -> bool:
        return (await evaluate(cached_policy, c)).approved

    await eventually(approved, what="the unfrozen cash purse seen by Evaluate")
    assert (await cached(cached_policy, c)).approved

    # A hold reserves 4,000 of the 5,000: 1,200 no longer fits.
    await ledger.stub.CreateHold(lpb.CreateHoldRequest(
        tenant_id=c.tenant_id, idempotency_key=str(uuid.uuid4()), account_id=c.cash_id,
        merchant_account_id=c.merchant_id, amount_fen=4000))
    await eventually(declined, what="the hold seen by Evaluate")


async def test_dry_run_reads_through_the_cache_too(cached_policy, ledger):
    c = await campus(ledger.stub, cash_fen=500)
    version = await publish(cached_policy.stub, c.tenant_id, university(canteen_merchant_id=c.merchant_id))
    request = payment(c, amount_fen=1200, at=LUNCH)

    async def dry_run() -> pb.Plan:
        return (await cached_policy.stub.DryRun(pb.DryRunRequest(tenant_id=c.tenant_id, version=version,
                                                                 request=request))).plan

    async def hit() -> bool:
        before = cache_count("hit")
        plan = await dry_run()
        return cache_count("hit") > before and plan.reason == "INSUFFICIENT_FUNDS"

    await eventually(hit, what="a DryRun answered from the cache")
    await top_up(ledger.stub, c, c.cash_id, 5000)

    async def approved() -> bool:
        return (await dry_run()).approved

    await eventually(approved, what="the top-up seen by DryRun")


async def test_max_age_zero_reads_the_ledger_every_time(launch, database_url, nats_url, ledger):
    app = build_app(policy_settings(database_url=database_url, nats_url=nats_url, ledger_target=ledger.target,
                                    member_state_cache_s=0))
    policy = await launch(app, stub_cls=policy_pb2_grpc.PolicyServiceStub)
    c = await campus(ledger.stub, cash_fen=0)
    await publish(policy.stub, c.tenant_id, university(canteen_merchant_id=c.merchant_id))
    lookups = {r: cache_count(r) for r in ("hit", "absent", "expired", "keys", "off")}
    for n in range(1, 6):
        await top_up(ledger.stub, c, c.cash_id, 500)
        # No waiting: each Evaluate reads the balance the top-up just left.
        plan = await evaluate(policy, c, amount_fen=500 * n)
        assert plan.approved, (n, plan.reason)
        assert (await evaluate(policy, c, amount_fen=500 * n + 1)).reason == "INSUFFICIENT_FUNDS"
    # The cache was never asked.
    assert {r: cache_count(r) for r in lookups} == lookups


async def test_a_read_racing_an_invalidation_is_answered_but_not_kept(cached_policy, ledger, monkeypatch):
    c = await campus(ledger.stub, cash_fen=5000)
    await publish(cached_policy.stub, c.tenant_id, university(canteen_merchant_id=c.merchant_id))
    # The replica follows the ledger's events (a cached answer says so).
    assert (await cached(cached_policy, c)).approved
    other = await campus(ledger.stub, cash_fen=5000, tenant_id=c.tenant_id)

    # The next read of `other` (not cached yet, so its accounts are unknown to the cache) is held
    # after the ledger answered it, until a payment of theirs has been booked and its event seen.
    answered, release = asyncio.Event(), asyncio.Event()
    real = LedgerClient.member_state

    async def held(self: LedgerClient, **kwargs: Any) -> Any:
        answer = await real(self, **kwargs)
        if kwargs["member_id"] == other.member_id and not release.is_set():
            answered.set()
            await release.wait()
        return answer

    monkeypatch.setattr(LedgerClient, "member_state", held)
    first = asyncio.ensure_future(evaluate(cached_policy, other, amount_fen=4000))
    await asyncio.wait_for(answered.wait(), DEADLINE_S)
    events = ledger_events_seen()
    await ledger.stub.Pay(lpb.PayRequest(
        tenant_id=c.tenant_id, idempotency_key=str(uuid.uuid4()), merchant_account_id=c.merchant_id,
        legs=[lpb.PayLeg(account_id=other.cash_id, amount_fen=3000)]))

    async def event_seen() -> bool:
        return ledger_events_seen() > events

    await eventually(event_seen, what="the payment's event seen by the replica")
    discarded = discarded_reads()
    release.set()
    stale = await first
    # The caller got what the ledger said when asked (5,000 fen covered 4,000) ...
    assert stale.approved
    assert discarded_reads() == discarded + 1
    # ... but it was not kept: the next Evaluate reads again and sees 2,000 left, at once.
    assert (await evaluate(cached_policy, other, amount_fen=4000)).reason == "INSUFFICIENT_FUNDS"


async def test_pay_reads_the_ledger_not_the_cache(cached_policy, ledger):
    c = await campus(ledger.stub, cash_fen=5000)
    await publish(cached_policy.stub, c.tenant_id, university(canteen_merchant_id=c.merchant_id))
    assert (await cached(cached_policy, c, amount_fen=4000)).approved
    # Drain the purse behind the replica's back and pay at once, before any event can arrive
    # or not: Pay plans on the ledger's balance now either way.
    await ledger.stub.Pay(lpb.PayRequest(
        tenant_id=c.tenant_id, idempotency_key=str(uuid.uuid4()), merchant_account_id=c.merchant_id,
        legs=[lpb.PayLeg(account_id=c.cash_id, amount_fen=3000)]))
    answer = await cached_policy.stub.Pay(pb.PayRequest(tenant_id=c.tenant_id, idempotency_key="after-drain",
                                                        request=payment(c, amount_fen=4000, at=LUNCH)))
    assert (answer.paid, answer.reason) == (False, "INSUFFICIENT_FUNDS")


# --- the cache alone ----------------------------------------------------------------------------

TENANT = uuid.UUID(int=1)


def purse(account_id: str, fen: int = 1000) -> MemberPurse:
    return MemberPurse(kind="cash", ref="", account_id=account_id, available_fen=fen, usable=True)


def live_cache(**kwargs: Any) -> MemberStateCache:
    return MemberStateCache(max_age_s=kwargs.pop("max_age_s", 2.0), feed=lambda: 1, **kwargs)


def posted(*accounts: str, guards: tuple[str, ...] = ()) -> Event:
    return Event(event_id=str(uuid.uuid4()), type="ledger.transfer.posted", tenant_id=str(TENANT),
                 occurred_at="", subject="ledger.transfer.posted",
                 data={"postings": [{"account_id": a, "amount_fen": 1, "pending_fen": 0} for a in accounts],
                       "guards": [{"counter_key": k, "increment": 1, "limit": 9, "value_after": 1} for k in guards]})


def test_the_cache_keeps_a_read_until_an_event_touches_its_accounts_or_counters():
    cache = live_cache()
    key = (TENANT, "m1")
    ticket = cache.begin(key, now=0.0)
    assert cache.finish(ticket, purses=[purse("a1")], counters={"k1": 0}) is not None
    assert cache.get(key, now=1.0) is not None
    assert cache.on_ledger_event(posted("merchant", "someone-else")) == 0
    assert cache.get(key, now=1.0) is not None
    assert cache.on_ledger_event(posted("a1", "merchant")) == 1
    assert cache.get(key, now=1.0) is None
    # A counter shared with another member's payment drops it too.
    cache.finish(cache.begin(key, now=1.0), purses=[purse("a1")], counters={"tenant-wide": 5})
    assert cache.on_ledger_event(posted("a2", "merchant", guards=("tenant-wide",))) == 1
    assert cache.get(key, now=1.5) is None


def test_the_cache_never_serves_past_its_max_age_nor_while_the_feed_is_down():
    feed = {"value": 1}
    cache = MemberStateCache(max_age_s=2.0, feed=lambda: feed["value"])
    key = (TENANT, "m1")
    # The age counts from before the read was sent.
    cache.finish(cache.begin(key, now=10.0), purses=[purse("a1")], counters={})
    assert cache.get(key, now=11.99) is not None
    assert cache.get(key, now=12.0) is None
    cache.finish(cache.begin(key, now=20.0), purses=[purse("a1")], counters={})
    feed["value"] = 0
    assert cache.get(key, now=20.5) is None
    feed["value"] = 2  # subscribed anew: what was held before the gap is gone
    assert cache.get(key, now=20.5) is None
    # A read begun before the feed was re-made is not kept either.
    ticket = cache.begin(key, now=21.0)
    feed["value"] = 3
    assert cache.finish(ticket, purses=[purse("a1")], counters={}) is None
    assert MemberStateCache(max_age_s=0, feed=lambda: 1).get(key, now=0.0) is None


def test_a_read_in_flight_is_not_kept_when_an_invalidation_of_its_member_arrives():
    cache = live_cache()
    key = (TENANT, "m1")
    # Known member (an entry holds its accounts): the per-member generation catches it.
    cache.finish(cache.begin(key, now=0.0), purses=[purse("a1")], counters={"k1": 0})
    ticket = cache.begin(key, now=0.5)  # say, an evaluation needing a counter the entry lacks
    cache.on_ledger_event(posted("a1"))
    assert cache.finish(ticket, purses=[purse("a1", 0)], counters={"k1": 0, "k2": 0}) is None
    assert cache.get(key, now=0.6) is None
    # Unknown member (first read): the invalidations seen while reads are in flight catch it,
    # by account or by counter; an unrelated one does not.
    for event in (posted("a1"), posted("x", guards=("k1",))):
        ticket = cache.begin(key, now=1.0)
        cache.on_ledger_event(posted("unrelated"))
        cache.on_ledger_event(event)
        assert cache.finish(ticket, purses=[purse("a1")], counters={"k1": 0}) is None
    ticket = cache.begin(key, now=1.0)
    cache.on_ledger_event(posted("unrelated", guards=("k9",)))
    assert cache.finish(ticket, purses=[purse("a1")], counters={"k1": 0}) is not None
    # An event seen before the read began does not stop it.
    other = (TENANT, "m2")
    cache.on_ledger_event(posted("b1"))
    assert cache.finish(cache.begin(other, now=2.0), purses=[purse("b1")], counters={}) is not None
    # Nothing stays recorded once no read is in flight.
    assert cache._recent == [] and cache._reading == {} and cache._started_seqs == {}


def test_the_cache_is_bounded_and_freezes_drop_by_owner():
    cache = live_cache(size=2)
    for n in range(3):
        cache.finish(cache.begin((TENANT, f"m{n}"), now=0.0), purses=[purse(f"a{n}")], counters={})
    assert len(cache) == 2 and cache.get((TENANT, "m0"), now=0.1) is None
    frozen = Event(event_id="e", type="ledger.account.frozen", tenant_id=str(TENANT), occurred_at="",
                   subject="ledger.account.frozen",
                   data={"account_id": "a-new", "owner_kind": "member", "owner_id": "m2", "status": "frozen"})
    assert cache.on_ledger_event(frozen) == 1
    assert cache.get((TENANT, "m2"), now=0.1) is None and cache.get((TENANT, "m1"), now=0.1) is not None
    ended = Event(event_id="f", type="ledger.program.ended", tenant_id=str(TENANT), occurred_at="",
                  subject="ledger.program.ended", data={"tenant_id": str(TENANT)})
    assert cache.on_ledger_event(ended) == 1 and len(cache) == 0


def test_a_failed_read_keeps_nothing_and_leaves_no_read_in_flight():
    cache = live_cache()
    ticket = cache.begin((TENANT, "m1"), now=0.0)
    assert cache.finish(ticket) is None
    assert cache._reading == {} and cache._started_seqs == {} and len(cache) == 0
