"""LedgerService.PayMany: many payments in one call, each decided and answered exactly as by Pay."""

from __future__ import annotations

import uuid

import grpc

from onecard.ledger.v1 import ledger_pb2 as pb
from runtime.batching import item_refusal
from runtime.grpc_client import error_info
from tests.conftest import RunningService
from tests.ledger.support import balance, campus, check_books, refused, top_up


def _payment(c, legs: list[tuple[str, int]], *, key: str | None = None) -> pb.PayRequest:  # noqa: ANN001
    return pb.PayRequest(tenant_id=c.tenant_id, idempotency_key=key or str(uuid.uuid4()),
                         merchant_account_id=c.merchant_id, device_id="pos-1",
                         legs=[pb.PayLeg(account_id=a, amount_fen=f) for a, f in legs])


def _refusal(result: pb.PayManyResult) -> tuple[grpc.StatusCode, str | None]:
    assert result.WhichOneof("outcome") == "error", result
    error = item_refusal(result.error)
    reason, _ = error_info(error)
    return error.code(), reason


async def test_each_payment_of_a_batch_is_answered_alone_in_order(ledger: RunningService, ledger_db) -> None:
    stub = ledger.stub
    c = await campus(stub)
    await top_up(stub, c, c.cash[0], 1000)
    await top_up(stub, c, c.cash[1], 100)
    answer = await stub.PayMany(pb.PayManyRequest(payments=[
        _payment(c, [(c.cash[0], 300)], key="a"),
        _payment(c, [(c.cash[1], 500)], key="b"),  # more than the purse holds
        _payment(c, [(c.cash[0], 200)], key="c"),
        _payment(c, [(c.cash[0], 0)], key="d"),  # no amount
        _payment(c, [("not-an-account", 1)], key="d2"),
        _payment(c, [(c.cash[1], 100)], key="e"),
    ]))
    outcomes = [r.WhichOneof("outcome") for r in answer.results]
    assert outcomes == ["paid", "error", "paid", "error", "error", "paid"]
    assert _refusal(answer.results[1]) == (grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_FUNDS")
    assert _refusal(answer.results[3])[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert _refusal(answer.results[4]) == (grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND")
    assert [answer.results[i].paid.transfer.idempotency_key.rsplit(":", 1)[-1] for i in (0, 2, 5)] == ["a", "c", "e"]
    assert (await balance(stub, c.tenant_id, c.cash[0])).posted_fen == 500
    assert (await balance(stub, c.tenant_id, c.cash[1])).posted_fen == 0
    assert (await balance(stub, c.tenant_id, c.merchant_id)).posted_fen == 600
    await check_books(ledger_db)

    # The batch again: the same answers, nothing moves twice; one of its keys through Pay too.
    again = await stub.PayMany(pb.PayManyRequest(payments=[
        _payment(c, [(c.cash[0], 300)], key="a"), _payment(c, [(c.cash[0], 200)], key="c")]))
    assert [r.paid.transfer.transfer_id for r in again.results] == [
        answer.results[0].paid.transfer.transfer_id, answer.results[2].paid.transfer.transfer_id]
    alone = await stub.Pay(_payment(c, [(c.cash[1], 100)], key="e"))
    assert alone.transfer.transfer_id == answer.results[5].paid.transfer.transfer_id
    assert (await balance(stub, c.tenant_id, c.merchant_id)).posted_fen == 600
    assert await ledger_db.fetchval("SELECT count(*) FROM transfers WHERE kind = 'payment'") == 3


async def test_a_key_reused_for_another_payment_in_the_same_batch_is_refused(ledger: RunningService) -> None:
    stub = ledger.stub
    c = await campus(stub)
    await top_up(stub, c, c.cash[0], 1000)
    answer = await stub.PayMany(pb.PayManyRequest(payments=[
        _payment(c, [(c.cash[0], 300)], key="same"), _payment(c, [(c.cash[0], 400)], key="same")]))
    assert answer.results[0].WhichOneof("outcome") == "paid"
    assert _refusal(answer.results[1]) == (grpc.StatusCode.ABORTED, "IDEMPOTENCY_KEY_REUSED")
    assert (await balance(stub, c.tenant_id, c.cash[0])).posted_fen == 700


async def test_an_empty_or_oversized_batch_is_refused_whole(ledger: RunningService, ledger_db) -> None:
    stub = ledger.stub
    c = await campus(stub)
    await top_up(stub, c, c.cash[0], 1000)
    assert await refused(stub.PayMany(pb.PayManyRequest())) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_BATCH")
    too_many = [_payment(c, [(c.cash[0], 1)]) for _ in range(257)]
    assert await refused(stub.PayMany(pb.PayManyRequest(payments=too_many))) == (
        grpc.StatusCode.INVALID_ARGUMENT, "INVALID_BATCH")
    assert await ledger_db.fetchval("SELECT count(*) FROM transfers WHERE kind = 'payment'") == 0
