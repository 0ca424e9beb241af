"""Every write under a client key: a repeat answers the first result, a different request under
the key is refused and changes nothing, and "did this pay?" finds a transfer by its key."""

from __future__ import annotations

import asyncio

import grpc

from onecard.ledger.v1 import ledger_pb2 as pb
from tests.conftest import RunningService
from tests.ledger.support import balance, balances_by_id, campus, check_books, pay, refused, top_up


async def test_the_same_key_and_request_answers_the_first_result_with_the_balances_then(
        ledger: RunningService, ledger_db) -> None:
    stub = ledger.stub
    c = await campus(stub)
    await top_up(stub, c, c.cash[0], 1000)
    first = await pay(stub, c, [(c.cash[0], 100)], key="pos-1/42")
    await pay(stub, c, [(c.cash[0], 100)])
    again = await pay(stub, c, [(c.cash[0], 100)], key="pos-1/42")
    assert again.transfer.transfer_id == first.transfer.transfer_id
    assert balances_by_id(again.balances) == balances_by_id(first.balances)
    assert (await balance(stub, c.tenant_id, c.cash[0])).posted_fen == 800
    assert await ledger_db.fetchval("SELECT count(*) FROM transfers WHERE kind = 'payment'") == 2


async def test_the_same_key_with_another_request_is_refused_and_changes_nothing(
        ledger: RunningService, ledger_db) -> None:
    stub = ledger.stub
    c = await campus(stub)
    await top_up(stub, c, c.cash[0], 1000)
    await pay(stub, c, [(c.cash[0], 100)], key="k")
    transfers_before = await ledger_db.fetchval("SELECT count(*) FROM transfers")
    assert await refused(pay(stub, c, [(c.cash[0], 101)], key="k")) == (grpc.StatusCode.ABORTED,
                                                                          "IDEMPOTENCY_KEY_REUSED")
    # A key is the tenant's, whatever the operation: a top-up cannot reuse a payment's key.
    assert await refused(top_up(stub, c, c.cash[0], 100, key="k")) == (grpc.StatusCode.ABORTED,
                                                                         "IDEMPOTENCY_KEY_REUSED")
    assert await ledger_db.fetchval("SELECT count(*) FROM transfers") == transfers_before
    assert (await balance(stub, c.tenant_id, c.cash[0])).posted_fen == 900


async def test_concurrent_repeats_of_one_key_book_one_transfer(ledger: RunningService, ledger_db) -> None:
    stub = ledger.stub
    c = await campus(stub)
    await top_up(stub, c, c.cash[0], 1000)
    results = await asyncio.gather(*(pay(stub, c, [(c.cash[0], 100)], key="same") for _ in range(10)))
    assert len({r.transfer.transfer_id for r in results}) == 1
    assert (await balance(stub, c.tenant_id, c.cash[0])).posted_fen == 900
    await check_books(ledger_db)


async def test_a_refused_write_leaves_its_key_free(ledger: RunningService) -> None:
    stub = ledger.stub
    c = await campus(stub)
    code, reason = await refused(pay(stub, c, [(c.cash[0], 100)], key="retry-me"))
    assert reason == "INSUFFICIENT_FUNDS"
    await top_up(stub, c, c.cash[0], 100)
    paid = await pay(stub, c, [(c.cash[0], 100)], key="retry-me")
    assert paid.transfer.idempotency_key == "retry-me"


async def test_lookup_by_key_answers_did_this_pay(ledger: RunningService) -> None:
    stub = ledger.stub
    c = await campus(stub)
    await top_up(stub, c, c.cash[0], 100)
    paid = await pay(stub, c, [(c.cash[0], 100)], key="ambiguous-1")
    found = await stub.LookupTransfer(pb.LookupTransferRequest(tenant_id=c.tenant_id, idempotency_key="ambiguous-1"))
    assert found.found and found.transfer.transfer_id == paid.transfer.transfer_id
    assert found.transfer.amount_fen == 100
    missing = await stub.LookupTransfer(pb.LookupTransferRequest(tenant_id=c.tenant_id, idempotency_key="never"))
    assert not missing.found
    other = await campus(stub)
    elsewhere = await stub.LookupTransfer(pb.LookupTransferRequest(tenant_id=other.tenant_id,
                                                                    idempotency_key="ambiguous-1"))
    assert not elsewhere.found
