"""Guards: caps on usage counters, checked and raised in the payment's own transaction, so no
interleaving of payments takes a counter past its limit, and a refused guard writes nothing."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import asyncpg
import grpc
import pytest

from onecard.ledger.v1 import ledger_pb2 as pb
from runtime.grpc_client import error_info
from tests.mesh import connect_nats
from tests.conftest import RunningService
from tests.ledger.support import Campus, balance, campus, check_books, refused, top_up

DAY = "2026-11-26"


def canteen_day(member: str) -> str:
    return f"member:{member}:scene:canteen:day:{DAY}"


async def guarded_pay(stub: Any, c: Campus, account_id: str, amount_fen: int, guards: list[tuple[str, int, int]], *,
                      key: str | None = None) -> pb.PayResponse:
    return await stub.Pay(pb.PayRequest(
        tenant_id=c.tenant_id, idempotency_key=key or str(uuid.uuid4()), merchant_account_id=c.merchant_id,
        legs=[pb.PayLeg(account_id=account_id, amount_fen=amount_fen)], device_id="pos-1",
        guards=[pb.Guard(counter_key=k, increment=inc, limit=lim) for k, inc, lim in guards],
    ))


async def counters(stub: Any, c: Campus, *keys: str) -> list[int]:
    response = await stub.GetUsageCounters(pb.GetUsageCountersRequest(tenant_id=c.tenant_id, counter_keys=keys))
    assert [u.counter_key for u in response.counters] == list(keys)
    return [u.value for u in response.counters]


async def _state(db: asyncpg.Connection) -> tuple[int, ...]:
    """Counts of the tables a payment writes, and the sum of all counters."""
    return tuple([
        await db.fetchval("SELECT count(*) FROM transfers"), await db.fetchval("SELECT count(*) FROM postings"),
        await db.fetchval("SELECT count(*) FROM payments"), await db.fetchval("SELECT count(*) FROM idempotency_keys"),
        await db.fetchval("SELECT count(*) FROM transfer_guards"), await db.fetchval("SELECT count(*) FROM usage_counters"),
        await db.fetchval("SELECT COALESCE(sum(value), 0) FROM usage_counters"),
    ])


async def test_a_hundred_concurrent_payments_never_pass_a_daily_spending_cap(ledger: RunningService,
                                                                              ledger_db) -> None:
    stub = ledger.stub
    c = await campus(stub, members=1)
    await top_up(stub, c, c.cash[0], 1_000_000)
    cap = (canteen_day("m0"), 100, 5000)
    results = await asyncio.gather(*(guarded_pay(stub, c, c.cash[0], 100, [cap]) for _ in range(100)),
                                   return_exceptions=True)
    ok = [r for r in results if isinstance(r, pb.PayResponse)]
    failed = [r for r in results if not isinstance(r, pb.PayResponse)]
    assert len(ok) == 50 and len(failed) == 50, failed[:3]
    for error in failed:
        assert isinstance(error, grpc.aio.AioRpcError) and error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_info(error) == ("GUARD_EXCEEDED", {"counter_key": canteen_day("m0")})
    assert await counters(stub, c, canteen_day("m0")) == [5000]
    assert (await balance(stub, c.tenant_id, c.cash[0])).posted_fen == 1_000_000 - 5000
    assert (await balance(stub, c.tenant_id, c.merchant_id)).posted_fen == 5000
    # Each successful payment records the guard it applied, with the value it left: 100..5000.
    after = sorted(r["value_after"] for r in await ledger_db.fetch("SELECT value_after FROM transfer_guards"))
    assert after == list(range(100, 5001, 100))
    await check_books(ledger_db)


async def test_one_shared_cap_across_many_members_in_crossing_key_orders(ledger: RunningService,
                                                                         ledger_db) -> None:
    # A tenant-wide counter (e.g. the canteen's free breakfasts today) shared by members paying
    # from different purses, each payment also carrying its own member cap, keys given in both
    # orders: no deadlock, no lost update, the shared cap exact.
    stub = ledger.stub
    members = 20
    c = await campus(stub, members=members)
    for account_id in c.cash:
        await top_up(stub, c, account_id, 10_000)
    shared = f"scene:canteen:free-breakfast:day:{DAY}"

    def guards(n: int) -> list[tuple[str, int, int]]:
        own = (canteen_day(f"m{n}"), 1, 2)
        return [own, (shared, 1, 25)] if n % 2 else [(shared, 1, 25), own]

    results = await asyncio.gather(*(guarded_pay(stub, c, c.cash[n], 300, guards(n))
                                     for n in range(members) for _ in range(3)), return_exceptions=True)
    ok = [r for r in results if isinstance(r, pb.PayResponse)]
    reasons = {error_info(r)[0] for r in results if isinstance(r, grpc.aio.AioRpcError)}
    assert len(ok) == 25 and reasons == {"GUARD_EXCEEDED"}, [r for r in results if not isinstance(r, pb.PayResponse)][:3]
    assert await counters(stub, c, shared) == [25]
    per_member = await counters(stub, c, *(canteen_day(f"m{n}") for n in range(members)))
    assert all(v <= 2 for v in per_member) and sum(per_member) == 25
    assert (await balance(stub, c.tenant_id, c.merchant_id)).posted_fen == 25 * 300
    await check_books(ledger_db)


async def test_one_free_breakfast_per_day(ledger: RunningService, ledger_db) -> None:
    stub = ledger.stub
    c = await campus(stub, members=1)
    await top_up(stub, c, c.cash[0], 10_000)
    breakfast = f"member:m0:free-breakfast:day:{DAY}"
    await guarded_pay(stub, c, c.cash[0], 1, [(breakfast, 1, 1)])
    assert await refused(guarded_pay(stub, c, c.cash[0], 1, [(breakfast, 1, 1)])) == (
        grpc.StatusCode.FAILED_PRECONDITION, "GUARD_EXCEEDED")
    # Tomorrow is another counter; an unguarded payment is not limited at all.
    await guarded_pay(stub, c, c.cash[0], 1, [("member:m0:free-breakfast:day:2026-11-27", 1, 1)])
    await guarded_pay(stub, c, c.cash[0], 1, [])
    assert await counters(stub, c, breakfast, "member:m0:free-breakfast:day:2026-11-27", "never-used") == [1, 1, 0]
    # A limit of 0 forbids even the first use, and creates no counter.
    assert (await refused(guarded_pay(stub, c, c.cash[0], 1, [("blocked", 1, 0)])))[1] == "GUARD_EXCEEDED"
    assert await ledger_db.fetchval("SELECT count(*) FROM usage_counters WHERE counter_key = 'blocked'") == 0
    await check_books(ledger_db)


async def test_a_refused_guard_writes_nothing_and_frees_the_key(ledger: RunningService, ledger_db) -> None:
    stub = ledger.stub
    c = await campus(stub, members=1)
    await top_up(stub, c, c.cash[0], 10_000)
    await guarded_pay(stub, c, c.cash[0], 4000, [(canteen_day("m0"), 4000, 5000)])
    before = await _state(ledger_db)
    purse, merchant = (await balance(stub, c.tenant_id, c.cash[0]), await balance(stub, c.tenant_id, c.merchant_id))
    code, reason = await refused(guarded_pay(stub, c, c.cash[0], 1500, [(canteen_day("m0"), 1500, 5000)], key="k1"))
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "GUARD_EXCEEDED")
    assert await _state(ledger_db) == before
    assert await balance(stub, c.tenant_id, c.cash[0]) == purse
    assert await balance(stub, c.tenant_id, c.merchant_id) == merchant
    assert await counters(stub, c, canteen_day("m0")) == [4000]
    # The key rolled back with the payment: the same key may be used for a smaller payment.
    await guarded_pay(stub, c, c.cash[0], 1000, [(canteen_day("m0"), 1000, 5000)], key="k1")
    assert await counters(stub, c, canteen_day("m0")) == [5000]
    await check_books(ledger_db)


async def test_insufficient_funds_leaves_the_counter_alone(ledger: RunningService, ledger_db) -> None:
    stub = ledger.stub
    c = await campus(stub, members=1)
    await top_up(stub, c, c.cash[0], 100)
    assert (await refused(guarded_pay(stub, c, c.cash[0], 500, [(canteen_day("m0"), 500, 5000)])))[1] == (
        "INSUFFICIENT_FUNDS")
    assert await counters(stub, c, canteen_day("m0")) == [0]


async def test_an_idempotent_repeat_does_not_count_twice(ledger: RunningService, ledger_db) -> None:
    stub = ledger.stub
    c = await campus(stub, members=1)
    await top_up(stub, c, c.cash[0], 10_000)
    cap = [(canteen_day("m0"), 300, 5000), ("member:m0:meals:day", 1, 3)]
    first = await guarded_pay(stub, c, c.cash[0], 300, cap, key="meal-1")
    # Concurrent and later repeats, guards in another order: the same request, the same answer.
    repeats = await asyncio.gather(*(guarded_pay(stub, c, c.cash[0], 300, cap[::-1], key="meal-1")
                                     for _ in range(5)))
    assert {r.transfer.transfer_id for r in repeats} == {first.transfer.transfer_id}
    assert await counters(stub, c, canteen_day("m0"), "member:m0:meals:day") == [300, 1]
    # The same key with other guards is another request.
    code, reason = await refused(guarded_pay(stub, c, c.cash[0], 300, [(canteen_day("m0"), 300, 9000)], key="meal-1"))
    assert (code, reason) == (grpc.StatusCode.ABORTED, "IDEMPOTENCY_KEY_REUSED")
    assert await counters(stub, c, canteen_day("m0"), "member:m0:meals:day") == [300, 1]
    assert (await balance(stub, c.tenant_id, c.cash[0])).posted_fen == 10_000 - 300


async def test_several_guards_hold_all_or_none(ledger: RunningService, ledger_db) -> None:
    stub = ledger.stub
    c = await campus(stub, members=1)
    await top_up(stub, c, c.cash[0], 10_000)
    amount, count = canteen_day("m0"), f"member:m0:scene:canteen:count:{DAY}"
    await guarded_pay(stub, c, c.cash[0], 1000, [(amount, 1000, 5000), (count, 1, 2)])
    await guarded_pay(stub, c, c.cash[0], 1000, [(amount, 1000, 5000), (count, 1, 2)])
    before = await _state(ledger_db)
    # The amount cap has room, the count cap does not (and sorts after it, so it is raised
    # second): the first counter's raise rolls back too.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await guarded_pay(stub, c, c.cash[0], 1000, [(count, 1, 2), (amount, 1000, 5000)])
    code, (reason, metadata) = info.value.code(), error_info(info.value)
    assert (code, reason, metadata) == (grpc.StatusCode.FAILED_PRECONDITION, "GUARD_EXCEEDED", {"counter_key": count})
    assert await _state(ledger_db) == before
    assert await counters(stub, c, amount, count) == [2000, 2]
    # A refund gives no counter back (documented): the day's count and spending stand.
    paid = await ledger_db.fetchval("SELECT transfer_id::text FROM payments LIMIT 1")
    await stub.Refund(pb.RefundRequest(tenant_id=c.tenant_id, idempotency_key="r1", payment_transfer_id=paid))
    assert await counters(stub, c, amount, count) == [2000, 2]
    await check_books(ledger_db)


async def test_a_guarded_payment_says_what_it_raised_in_its_event(ledger: RunningService, nats_url: str) -> None:
    stub = ledger.stub
    c = await campus(stub, members=1)
    await top_up(stub, c, c.cash[0], 1000)
    paid = await guarded_pay(stub, c, c.cash[0], 400, [("b-count", 1, 3), ("a-amount", 400, 5000)])
    # Read as any outside consumer would: the operator's ordered consumer over the stream.
    nc = await connect_nats(nats_url)
    try:
        sub = await nc.jetstream().subscribe("ledger.transfer.posted", stream="LEDGER", ordered_consumer=True)
        found = None
        while found is None:
            msg = await sub.next_msg(timeout=10)
            data = json.loads(msg.data)["data"]
            if data["transfer_id"] == paid.transfer.transfer_id:
                found = data
    finally:
        await nc.close()
    assert found is not None and found["guards"] == [
        {"counter_key": "a-amount", "increment": 400, "limit": 5000, "value_after": 400},
        {"counter_key": "b-count", "increment": 1, "limit": 3, "value_after": 1},
    ]


async def test_counters_are_per_tenant(ledger: RunningService, ledger_db) -> None:
    stub = ledger.stub
    c, other = await campus(stub, members=1), await campus(stub, members=1)
    await top_up(stub, c, c.cash[0], 1000)
    await guarded_pay(stub, c, c.cash[0], 700, [("shared-name", 700, 1000)])
    assert await counters(stub, c, "shared-name") == [700]
    assert await counters(stub, other, "shared-name") == [0]


_BAD_GUARDS: list[tuple[list[tuple[str, int, int]], str]] = [
    ([("", 1, 1)], "INVALID_COUNTER_KEY"),
    ([("has space", 1, 1)], "INVALID_COUNTER_KEY"),
    ([("x" * 201, 1, 1)], "INVALID_COUNTER_KEY"),
    ([("k\u00e9", 1, 1)], "INVALID_COUNTER_KEY"),
    ([("k", 0, 1)], "INVALID_GUARD_INCREMENT"),
    ([("k", -5, 1)], "INVALID_GUARD_INCREMENT"),
    ([("k", 100_000_001, 10**9)], "INVALID_GUARD_INCREMENT"),
    ([("k", 1, -1)], "INVALID_GUARD_LIMIT"),
    ([("k", 1, 10**15 + 1)], "INVALID_GUARD_LIMIT"),
    ([("k", 1, 5), ("k", 2, 5)], "DUPLICATE_GUARD"),
    ([(f"k{n}", 1, 5) for n in range(9)], "TOO_MANY_GUARDS"),
]


async def test_bad_guards_are_refused_and_change_nothing(ledger: RunningService, ledger_db) -> None:
    stub = ledger.stub
    c = await campus(stub, members=1)
    await top_up(stub, c, c.cash[0], 1000)
    before = await _state(ledger_db)
    for guards, reason in _BAD_GUARDS:
        got = await refused(guarded_pay(stub, c, c.cash[0], 100, guards))
        assert got == (grpc.StatusCode.INVALID_ARGUMENT, reason), (guards, got)
    assert await _state(ledger_db) == before
    assert (await balance(stub, c.tenant_id, c.cash[0])).posted_fen == 1000


async def test_eight_guards_and_a_200_character_key_are_fine(ledger: RunningService, ledger_db) -> None:
    stub = ledger.stub
    c = await campus(stub, members=1)
    await top_up(stub, c, c.cash[0], 1000)
    keys = ["x" * 200, *(f"k{n}" for n in range(7))]
    await guarded_pay(stub, c, c.cash[0], 100, [(k, 100, 100) for k in keys])
    assert await counters(stub, c, *keys) == [100] * 8


async def test_bad_counter_reads_are_refused(ledger: RunningService) -> None:
    stub = ledger.stub
    for keys in ([], ["ok", "bad key"], [f"k{n}" for n in range(101)]):
        code, _ = await refused(stub.GetUsageCounters(pb.GetUsageCountersRequest(
            tenant_id=str(uuid.uuid4()), counter_keys=keys)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, keys
