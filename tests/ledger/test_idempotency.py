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


BANK = "client:oc_bank"


async def test_the_same_key_with_another_request_is_refused_and_changes_nothing(
        ledger: RunningService, ledger_db) -> None:
    stub = ledger.stub
    c = await campus(stub)
    await top_up(stub, c, c.cash[0], 1000)
    await pay(stub, c, [(c.cash[0], 100)], key="k", key_scope=BANK)
    transfers_before = await ledger_db.fetchval("SELECT count(*) FROM transfers")
    assert await refused(pay(stub, c, [(c.cash[0], 101)], key="k", key_scope=BANK)) == (
        grpc.StatusCode.ABORTED, "IDEMPOTENCY_KEY_REUSED")
    # A key is its owner's, whatever the operation and whichever service passes it on: a top-up
    # (from the gateway) cannot reuse the client's payment key (from policy).
    assert await refused(top_up(stub, c, c.cash[0], 100, key="k", key_scope=BANK)) == (
        grpc.StatusCode.ABORTED, "IDEMPOTENCY_KEY_REUSED")
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
    paid = await pay(stub, c, [(c.cash[0], 100)], key="ambiguous-1", key_scope=BANK)
    found = await stub.LookupTransfer(pb.LookupTransferRequest(tenant_id=c.tenant_id, idempotency_key="ambiguous-1",
                                                               key_scope=BANK))
    assert found.found and found.transfer.transfer_id == paid.transfer.transfer_id
    assert found.transfer.amount_fen == 100
    missing = await stub.LookupTransfer(pb.LookupTransferRequest(tenant_id=c.tenant_id, idempotency_key="never",
                                                                 key_scope=BANK))
    assert not missing.found
    other = await campus(stub)
    elsewhere = await stub.LookupTransfer(pb.LookupTransferRequest(tenant_id=other.tenant_id,
                                                                    idempotency_key="ambiguous-1", key_scope=BANK))
    assert not elsewhere.found


async def test_keys_are_their_callers_own_and_one_cannot_occupy_or_read_anothers(
        ledger: RunningService, ledger_db) -> None:
    """The same key text in two scopes is two writes; a partner's key never names a device's
    offline record, and a lookup answers only the caller's own keys."""
    stub = ledger.stub
    c = await campus(stub)
    await top_up(stub, c, c.cash[0], 1000)
    device_key = "dev:pos-1:7"
    mine = await pay(stub, c, [(c.cash[0], 100)], key=device_key, key_scope="device:pos-1")
    theirs = await pay(stub, c, [(c.cash[0], 300)], key=device_key, key_scope=BANK)
    assert mine.transfer.transfer_id != theirs.transfer.transfer_id
    assert (mine.transfer.key_scope, theirs.transfer.key_scope) == ("device:pos-1", BANK)
    assert mine.transfer.idempotency_key == theirs.transfer.idempotency_key == device_key
    found = await stub.LookupTransfer(pb.LookupTransferRequest(tenant_id=c.tenant_id, idempotency_key=device_key,
                                                               key_scope=BANK))
    assert found.found and found.transfer.transfer_id == theirs.transfer.transfer_id
    other = await stub.LookupTransfer(pb.LookupTransferRequest(tenant_id=c.tenant_id, idempotency_key=device_key,
                                                               key_scope="client:oc_someone_else"))
    assert not other.found
    # The calling service's own scope when none is named: the gateway's keys are not policy's.
    assert not (await stub.LookupTransfer(pb.LookupTransferRequest(tenant_id=c.tenant_id,
                                                                   idempotency_key=device_key))).found
    await check_books(ledger_db)


async def test_a_service_names_only_the_owners_it_speaks_for(ledger: RunningService) -> None:
    """The gateway files keys for API clients, never for a terminal; a malformed scope is refused."""
    stub = ledger.stub
    c = await campus(stub)
    assert await refused(top_up(stub, c, c.cash[0], 100, key_scope="device:pos-1")) == (
        grpc.StatusCode.PERMISSION_DENIED, "KEY_SCOPE_NOT_ALLOWED")
    assert await refused(top_up(stub, c, c.cash[0], 100, key_scope="mesh:policy")) == (
        grpc.StatusCode.PERMISSION_DENIED, "KEY_SCOPE_NOT_ALLOWED")
    for bad in ("client:", "bank:x", "client:a/b", "client"):
        assert await refused(top_up(stub, c, c.cash[0], 100, key_scope=bad)) == (
            grpc.StatusCode.INVALID_ARGUMENT, "INVALID_KEY_SCOPE"), bad
