"""Timeout reversals: a payment whose answer never reached its till is undone exactly once; a
reversal that arrives first closes the key, so the payment never happens."""
from __future__ import annotations

import asyncio

import asyncpg
import grpc

from onecard.ledger.v1 import ledger_pb2 as pb
from tests.conftest import RunningService
from tests.ledger.support import balance, campus, check_books, refused, top_up

TILL = "device:pos-1"


async def _pay(stub, c, amount_fen: int, key: str, *, guards: tuple[tuple[str, int, int], ...] = ()):  # noqa: ANN001, ANN202
    return await stub.Pay(pb.PayRequest(
        tenant_id=c.tenant_id, idempotency_key=key, key_scope=TILL, merchant_account_id=c.merchant_id,
        legs=[pb.PayLeg(account_id=c.cash[0], amount_fen=amount_fen)], device_id="pos-1",
        guards=[pb.Guard(counter_key=k, increment=i, limit=lim) for k, i, lim in guards]))


async def _reverse(stub, c, key: str, *, scope: str = TILL) -> pb.ReversePaymentResponse:  # noqa: ANN001
    return await stub.ReversePayment(pb.ReversePaymentRequest(tenant_id=c.tenant_id, idempotency_key=key,
                                                              key_scope=scope, reason="ANSWER_NOT_RECEIVED"))


async def test_a_booked_payment_is_reversed_once_with_its_caps_given_back(
        ledger: RunningService, ledger_db: asyncpg.Connection) -> None:
    stub = ledger.stub
    c = await campus(stub)
    await top_up(stub, c, c.cash[0], 1_000)
    paid = await _pay(stub, c, 300, "sale-1", guards=(("meals:m0:d1", 1, 3),))
    first = await _reverse(stub, c, "sale-1")
    assert first.outcome == pb.REVERSAL_OUTCOME_REVERSED
    assert first.payment.transfer_id == paid.transfer.transfer_id
    assert first.refund.kind == pb.TRANSFER_KIND_REFUND and first.refund.amount_fen == 300
    assert first.refund.original_transfer_id == paid.transfer.transfer_id
    assert (await balance(stub, c.tenant_id, c.cash[0])).posted_fen == 1_000
    counters = await stub.GetUsageCounters(pb.GetUsageCountersRequest(tenant_id=c.tenant_id,
                                                                      counter_keys=["meals:m0:d1"]))
    assert counters.counters[0].value == 0

    again = await _reverse(stub, c, "sale-1")
    assert again.outcome == pb.REVERSAL_OUTCOME_REVERSED and again.refund.transfer_id == first.refund.transfer_id
    assert await ledger_db.fetchval("SELECT count(*) FROM transfers WHERE kind = 'refund'") == 1
    # The payment's key still answers the payment (it did happen, and was undone).
    repeat = await _pay(stub, c, 300, "sale-1", guards=(("meals:m0:d1", 1, 3),))
    assert repeat.transfer.transfer_id == paid.transfer.transfer_id
    assert (await balance(stub, c.tenant_id, c.cash[0])).posted_fen == 1_000
    await check_books(ledger_db)


async def test_a_reversal_that_arrives_first_means_the_payment_never_happens(
        ledger: RunningService, ledger_db: asyncpg.Connection) -> None:
    stub = ledger.stub
    c = await campus(stub)
    await top_up(stub, c, c.cash[0], 1_000)
    prevented = await _reverse(stub, c, "late-sale")
    assert prevented.outcome == pb.REVERSAL_OUTCOME_PREVENTED
    assert not prevented.HasField("payment") and not prevented.HasField("refund")
    assert await refused(_pay(stub, c, 300, "late-sale")) == (grpc.StatusCode.FAILED_PRECONDITION,
                                                              "PAYMENT_REVERSED")
    assert (await _reverse(stub, c, "late-sale")).outcome == pb.REVERSAL_OUTCOME_PREVENTED
    assert (await balance(stub, c.tenant_id, c.cash[0])).posted_fen == 1_000
    assert await ledger_db.fetchval("SELECT count(*) FROM transfers WHERE kind = 'payment'") == 0
    # The key is the till's: another owner's payment under the same text is its own.
    other = await stub.Pay(pb.PayRequest(
        tenant_id=c.tenant_id, idempotency_key="late-sale", key_scope="device:pos-2", merchant_account_id=c.merchant_id,
        legs=[pb.PayLeg(account_id=c.cash[0], amount_fen=300)], device_id="pos-2"))
    assert other.transfer.amount_fen == 300
    await check_books(ledger_db)


async def test_a_payment_and_its_reversal_racing_end_with_no_charge_exactly_once(
        ledger: RunningService, ledger_db: asyncpg.Connection) -> None:
    stub = ledger.stub
    c = await campus(stub)
    await top_up(stub, c, c.cash[0], 100_000)
    outcomes = []
    for n in range(20):
        key = f"race-{n}"
        pay, reverse = await asyncio.gather(_pay(stub, c, 100, key), _reverse(stub, c, key), return_exceptions=True)
        assert not isinstance(reverse, BaseException), reverse
        if reverse.outcome == pb.REVERSAL_OUTCOME_PREVENTED:
            assert isinstance(pay, grpc.aio.AioRpcError) and pay.code() == grpc.StatusCode.FAILED_PRECONDITION
        else:
            assert reverse.refund.amount_fen == 100 and not isinstance(pay, BaseException)
        outcomes.append(reverse.outcome)
    assert (await balance(stub, c.tenant_id, c.cash[0])).posted_fen == 100_000
    payments = await ledger_db.fetchval("SELECT count(*) FROM transfers WHERE kind = 'payment'")
    refunds = await ledger_db.fetchval("SELECT count(*) FROM transfers WHERE kind = 'refund'")
    assert payments == refunds == outcomes.count(pb.REVERSAL_OUTCOME_REVERSED)
    await check_books(ledger_db)


async def test_only_a_payment_can_be_reversed_and_only_by_its_owner(ledger: RunningService) -> None:
    stub = ledger.stub
    c = await campus(stub)
    await top_up(stub, c, c.cash[0], 1_000, key="a-top-up", key_scope="client:oc_bank")
    await _pay(stub, c, 100, "mine")
    # Another till's reversal of "mine" is about its own key: it closes that, and leaves mine paid.
    assert (await _reverse(stub, c, "mine", scope="device:pos-9")).outcome == pb.REVERSAL_OUTCOME_PREVENTED
    assert (await balance(stub, c.tenant_id, c.cash[0])).posted_fen == 900
    # The hub speaks for terminals, not for the bank: it cannot reverse the bank's write.
    assert await refused(_reverse(stub, c, "a-top-up", scope="client:oc_bank")) == (
        grpc.StatusCode.PERMISSION_DENIED, "KEY_SCOPE_NOT_ALLOWED")
