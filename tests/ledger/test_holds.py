"""Holds: money reserved, then captured (in part, the rest released), voided or expired; exactly
one of the three settles each hold."""

from __future__ import annotations

import asyncio
import time
import uuid

import grpc

from onecard.ledger.v1 import ledger_pb2 as pb
from tests.conftest import RunningService
from tests.ledger.support import Campus, balance, balances_by_id, campus, check_books, refused, top_up


async def hold(stub, c: Campus, amount_fen: int, *, timeout_s: int = 60) -> pb.CreateHoldResponse:  # noqa: ANN001
    return await stub.CreateHold(pb.CreateHoldRequest(
        tenant_id=c.tenant_id, idempotency_key=str(uuid.uuid4()), account_id=c.cash[0],
        merchant_account_id=c.merchant_id, amount_fen=amount_fen, timeout_s=timeout_s,
    ))


def capture(stub, c: Campus, hold_id: str, amount_fen: int = 0):  # noqa: ANN001, ANN201
    return stub.CaptureHold(pb.CaptureHoldRequest(tenant_id=c.tenant_id, idempotency_key=str(uuid.uuid4()),
                                                  hold_id=hold_id, amount_fen=amount_fen))


def void(stub, c: Campus, hold_id: str):  # noqa: ANN001, ANN201
    return stub.VoidHold(pb.VoidHoldRequest(tenant_id=c.tenant_id, idempotency_key=str(uuid.uuid4()),
                                            hold_id=hold_id))


async def test_a_hold_reserves_money_and_a_partial_capture_releases_the_rest(ledger: RunningService,
                                                                             ledger_db) -> None:
    stub = ledger.stub
    c = await campus(stub)
    await top_up(stub, c, c.cash[0], 1000)
    held = await hold(stub, c, 400)
    assert held.hold.status == pb.HOLD_STATUS_PENDING
    assert balances_by_id(held.balances)[c.cash[0]] == (1000, 400, 600)
    captured = await capture(stub, c, held.hold.hold_id, 250)
    assert captured.hold.status == pb.HOLD_STATUS_CAPTURED
    assert captured.transfer.kind == pb.TRANSFER_KIND_CAPTURE and captured.transfer.amount_fen == 250
    got = balances_by_id(captured.balances)
    assert got[c.cash[0]] == (750, 0, 750)
    assert got[c.merchant_id] == (250, 0, 250)
    assert await refused(capture(stub, c, held.hold.hold_id)) == (grpc.StatusCode.FAILED_PRECONDITION,
                                                                  "HOLD_NOT_PENDING")
    await check_books(ledger_db)


async def test_a_hold_cannot_reserve_more_than_is_available(ledger: RunningService) -> None:
    stub = ledger.stub
    c = await campus(stub)
    await top_up(stub, c, c.cash[0], 500)
    await hold(stub, c, 400)
    assert (await refused(hold(stub, c, 101)))[1] == "INSUFFICIENT_FUNDS"
    assert (await refused(capture(stub, c, str(uuid.uuid4()))))[1] == "HOLD_NOT_FOUND"


async def test_void_releases_everything_and_capture_cannot_exceed_the_hold(ledger: RunningService,
                                                                           ledger_db) -> None:
    stub = ledger.stub
    c = await campus(stub)
    await top_up(stub, c, c.cash[0], 1000)
    held = await hold(stub, c, 400)
    assert await refused(capture(stub, c, held.hold.hold_id, 401)) == (grpc.StatusCode.FAILED_PRECONDITION,
                                                                       "CAPTURE_EXCEEDS_HOLD")
    voided = await void(stub, c, held.hold.hold_id)
    assert voided.hold.status == pb.HOLD_STATUS_VOIDED
    assert balances_by_id(voided.balances)[c.cash[0]] == (1000, 0, 1000)
    await check_books(ledger_db)


async def test_an_expired_hold_releases_its_money_and_refuses_capture(ledger: RunningService, ledger_db) -> None:
    stub = ledger.stub
    c = await campus(stub)
    await top_up(stub, c, c.cash[0], 1000)
    held = await hold(stub, c, 300, timeout_s=1)
    deadline = time.monotonic() + 10
    while (await balance(stub, c.tenant_id, c.cash[0])).pending_fen != 0:
        assert time.monotonic() < deadline, "the hold never expired"
        await asyncio.sleep(0.1)
    assert (await balance(stub, c.tenant_id, c.cash[0])).available_fen == 1000
    assert await refused(capture(stub, c, held.hold.hold_id)) == (grpc.StatusCode.FAILED_PRECONDITION,
                                                                  "HOLD_NOT_PENDING")
    assert await ledger_db.fetchval("SELECT status FROM holds WHERE hold_id = $1",
                                    uuid.UUID(held.hold.hold_id)) == "expired"
    await check_books(ledger_db)


async def test_capture_void_and_expiry_race_and_exactly_one_wins(ledger: RunningService, ledger_db) -> None:
    stub = ledger.stub
    c = await campus(stub)
    await top_up(stub, c, c.cash[0], 100_000)
    rounds = 20
    holds = [await hold(stub, c, 100, timeout_s=1) for _ in range(rounds)]
    # Let the last few get close to their expiry, so the sweep joins the race.
    await asyncio.sleep(0.9)
    calls = []
    for held in holds:
        calls += [capture(stub, c, held.hold.hold_id), void(stub, c, held.hold.hold_id)]
    results = await asyncio.gather(*calls, return_exceptions=True)
    for n, held in enumerate(holds):
        pair = results[2 * n: 2 * n + 2]
        wins = [r for r in pair if not isinstance(r, Exception)]
        for r in pair:
            if isinstance(r, grpc.aio.AioRpcError):
                assert r.code() == grpc.StatusCode.FAILED_PRECONDITION, r
        assert len(wins) <= 1
        settled = await ledger_db.fetch(
            "SELECT kind FROM transfers WHERE original_transfer_id = $1", uuid.UUID(held.hold.hold_id))
        # Capture, void or (when neither won in time) expiry: one settlement, never two.
        deadline = time.monotonic() + 10
        while not settled:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
            settled = await ledger_db.fetch(
                "SELECT kind FROM transfers WHERE original_transfer_id = $1", uuid.UUID(held.hold.hold_id))
        assert len(settled) == 1, settled
        if wins:
            assert settled[0]["kind"] in ("capture", "void")
    captured = await ledger_db.fetchval("SELECT count(*) FROM transfers WHERE kind = 'capture'")
    assert (await balance(stub, c.tenant_id, c.cash[0])).posted_fen == 100_000 - 100 * captured
    assert (await balance(stub, c.tenant_id, c.cash[0])).pending_fen == 0
    await check_books(ledger_db)
