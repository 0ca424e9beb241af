"""Concurrent writers: no overdraft, no lost update, no deadlock, and a busy canteen does not
turn into a queue."""

from __future__ import annotations

import asyncio

import grpc

from onecard.ledger.v1 import ledger_pb2 as pb
from runtime.grpc_client import error_info
from tests.conftest import RunningService
from tests.ledger.support import balance, campus, check_books, pay, top_up


async def test_fifty_payments_from_a_purse_that_affords_twenty_let_exactly_twenty_through(
        ledger: RunningService, ledger_db) -> None:
    stub = ledger.stub
    c = await campus(stub)
    await top_up(stub, c, c.cash[0], 20 * 150)
    results = await asyncio.gather(*(pay(stub, c, [(c.cash[0], 150)]) for _ in range(50)), return_exceptions=True)
    ok = [r for r in results if isinstance(r, pb.PayResponse)]
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(ok) == 20 and len(refused) == 30, [r for r in results if not isinstance(r, pb.PayResponse)][:3]
    # Only "insufficient funds": no deadlock, no serialization failure, no internal error.
    assert {r.code() for r in refused} == {grpc.StatusCode.FAILED_PRECONDITION}
    got = await balance(stub, c.tenant_id, c.cash[0])
    assert (got.posted_fen, got.available_fen) == (0, 0)
    assert (await balance(stub, c.tenant_id, c.merchant_id)).posted_fen == 20 * 150
    await check_books(ledger_db)


async def test_many_members_paying_one_canteen_at_once_all_succeed(ledger: RunningService, ledger_db) -> None:
    stub = ledger.stub
    members = 30
    c = await campus(stub, members=members)
    for account_id in c.cash:
        await top_up(stub, c, account_id, 1000)
    results = await asyncio.gather(*(pay(stub, c, [(account_id, 700)]) for account_id in c.cash for _ in range(1)))
    assert len(results) == members
    assert (await balance(stub, c.tenant_id, c.merchant_id)).posted_fen == members * 700
    # The canteen's money is spread over shard rows, not one hot row.
    shards = await ledger_db.fetchval("SELECT count(*) FROM account_shards WHERE account_id = $1::uuid", c.merchant_id)
    assert shards > 1
    await check_books(ledger_db)


async def test_crossing_payments_and_refunds_finish_without_deadlock(ledger: RunningService, ledger_db) -> None:
    stub = ledger.stub
    c = await campus(stub, members=4)
    for n in range(4):
        await top_up(stub, c, c.cash[n], 10_000)
        await stub.TopUp(pb.TopUpRequest(tenant_id=c.tenant_id, idempotency_key=f"g{n}", from_account_id=c.funding_id,
                                         to_account_id=c.subsidy[n], amount_fen=10_000))
    # Legs listed in both orders, so a naive lock order would deadlock.
    paid = await asyncio.gather(*(
        pay(stub, c, [(c.cash[n % 4], 100), (c.subsidy[n % 4], 100)] if n % 2 else
            [(c.subsidy[n % 4], 100), (c.cash[n % 4], 100)])
        for n in range(40)
    ))
    refunds = [stub.Refund(pb.RefundRequest(tenant_id=c.tenant_id, idempotency_key=f"r{n}",
                                            payment_transfer_id=p.transfer.transfer_id))
               for n, p in enumerate(paid[:20])]
    await asyncio.gather(*refunds, *(pay(stub, c, [(c.cash[n % 4], 50)]) for n in range(20)))
    await check_books(ledger_db)


async def test_concurrent_payments_share_commits_and_each_answers_alone(ledger: RunningService, ledger_db) -> None:
    """Payments arriving together are booked in shared transactions (same booking time), and a
    payment refused inside such a batch (funds, a frozen purse, a reused key) is refused alone."""
    stub = ledger.stub
    c = await campus(stub, members=6)
    for n in range(5):
        await top_up(stub, c, c.cash[n], 1000)
    await stub.FreezeAccount(pb.FreezeAccountRequest(tenant_id=c.tenant_id, account_id=c.cash[5]))
    # Each of members 0..4 tries 8 payments of 200 (affords 5); member 5 is frozen.
    attempts = [(n, k) for k in range(8) for n in range(6)]
    answers = await asyncio.gather(*(pay(stub, c, [(c.cash[n], 200)], key=f"p-{n}-{k}") for n, k in attempts),
                                   return_exceptions=True)
    reasons: dict[int, list[str]] = {n: [] for n in range(6)}
    for (n, _), answer in zip(attempts, answers, strict=True):
        if isinstance(answer, grpc.aio.AioRpcError):
            reasons[n].append(error_info(answer)[0] or "")
        else:
            reasons[n].append("ok")
    for n in range(5):
        assert sorted(reasons[n]) == ["INSUFFICIENT_FUNDS"] * 3 + ["ok"] * 5, reasons[n]
        assert (await balance(stub, c.tenant_id, c.cash[n])).posted_fen == 0
    assert reasons[5] == ["ACCOUNT_FROZEN"] * 8
    booked = await ledger_db.fetch("SELECT booked_at FROM transfers WHERE kind = 'payment'")
    assert len(booked) == 25
    # Shared commits: fewer booking times than payments (a batch books at its transaction's time).
    assert len({r["booked_at"] for r in booked}) < 25
    # The refused ones left their keys free: paid again once funded, they go through.
    refused_key = next(f"p-0-{k}" for (n, k), answer in zip(attempts, answers, strict=True)
                       if n == 0 and isinstance(answer, grpc.aio.AioRpcError))
    await top_up(stub, c, c.cash[0], 200)
    assert (await pay(stub, c, [(c.cash[0], 200)], key=refused_key)).transfer.amount_fen == 200
    await check_books(ledger_db)
