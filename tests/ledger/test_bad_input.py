"""Bad input is refused with a typed error and writes nothing."""

from __future__ import annotations

import uuid

import asyncpg
import grpc
import pytest

from onecard.ledger.v1 import ledger_pb2 as pb
from tests.conftest import RunningService
from tests.ledger.support import balance, campus, check_books, open_account, pay, refused, top_up


async def _counts(db: asyncpg.Connection) -> tuple[int, int, int]:
    return (await db.fetchval("SELECT count(*) FROM transfers"), await db.fetchval("SELECT count(*) FROM postings"),
            await db.fetchval("SELECT count(*) FROM idempotency_keys"))


async def test_zero_negative_and_huge_amounts_are_refused(ledger: RunningService, ledger_db) -> None:
    stub = ledger.stub
    c = await campus(stub)
    await top_up(stub, c, c.cash[0], 1000)
    before = await _counts(ledger_db)
    for amount_fen in (0, -1, -100, 100_000_001):
        for call in (top_up(stub, c, c.cash[0], amount_fen), pay(stub, c, [(c.cash[0], amount_fen)]),
                     pay(stub, c, [(c.cash[0], 100), (c.subsidy[0], amount_fen)])):
            code, reason = await refused(call)
            assert code == grpc.StatusCode.INVALID_ARGUMENT and reason in ("INVALID_AMOUNT", "AMOUNT_TOO_LARGE")
        hold = stub.CreateHold(pb.CreateHoldRequest(tenant_id=c.tenant_id, idempotency_key="h",
                                                    account_id=c.cash[0], merchant_account_id=c.merchant_id,
                                                    amount_fen=amount_fen))
        assert (await refused(hold))[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert await _counts(ledger_db) == before
    assert (await refused(top_up(stub, c, c.cash[0], 2**62)))[1] == "AMOUNT_TOO_LARGE"


async def test_unknown_and_other_tenants_accounts_are_not_found(ledger: RunningService, ledger_db) -> None:
    stub = ledger.stub
    c = await campus(stub)
    other = await campus(stub)
    await top_up(stub, c, c.cash[0], 1000)
    await top_up(stub, other, other.cash[0], 1000)
    before = await _counts(ledger_db)
    for legs in ([(str(uuid.uuid4()), 100)], [(other.cash[0], 100)], [("not-a-uuid", 100)]):
        assert await refused(pay(stub, c, legs)) == (grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND")
    code, _ = await refused(stub.GetBalances(pb.GetBalancesRequest(tenant_id=c.tenant_id,
                                                                   account_ids=[other.cash[0]])))
    assert code == grpc.StatusCode.NOT_FOUND
    code, _ = await refused(stub.Refund(pb.RefundRequest(tenant_id=c.tenant_id, idempotency_key="x",
                                                         payment_transfer_id=str(uuid.uuid4()))))
    assert code == grpc.StatusCode.NOT_FOUND
    assert await _counts(ledger_db) == before
    assert (await balance(stub, other.tenant_id, other.cash[0])).posted_fen == 1000


async def test_a_frozen_purse_cannot_pay_until_unfrozen_and_still_takes_refunds(ledger: RunningService,
                                                                                ledger_db) -> None:
    stub = ledger.stub
    c = await campus(stub)
    await top_up(stub, c, c.cash[0], 1000)
    paid = await pay(stub, c, [(c.cash[0], 300)])
    frozen = await stub.FreezeAccount(pb.FreezeAccountRequest(tenant_id=c.tenant_id, account_id=c.cash[0]))
    assert frozen.account.account.status == pb.ACCOUNT_STATUS_FROZEN
    before = await _counts(ledger_db)
    assert await refused(pay(stub, c, [(c.cash[0], 100)])) == (grpc.StatusCode.FAILED_PRECONDITION, "ACCOUNT_FROZEN")
    assert await refused(top_up(stub, c, c.cash[0], 100)) == (grpc.StatusCode.FAILED_PRECONDITION, "ACCOUNT_FROZEN")
    assert await _counts(ledger_db) == before
    await stub.Refund(pb.RefundRequest(tenant_id=c.tenant_id, idempotency_key="r",
                                       payment_transfer_id=paid.transfer.transfer_id))
    await stub.UnfreezeAccount(pb.UnfreezeAccountRequest(tenant_id=c.tenant_id, account_id=c.cash[0]))
    await pay(stub, c, [(c.cash[0], 100)])
    assert (await balance(stub, c.tenant_id, c.cash[0])).posted_fen == 900
    await check_books(ledger_db)


async def test_bad_requests_name_what_is_wrong(ledger: RunningService) -> None:
    stub = ledger.stub
    c = await campus(stub)
    await top_up(stub, c, c.cash[0], 1000)
    no_key = stub.Pay(pb.PayRequest(tenant_id=c.tenant_id, merchant_account_id=c.merchant_id,
                                    legs=[pb.PayLeg(account_id=c.cash[0], amount_fen=1)]))
    assert await refused(no_key) == (grpc.StatusCode.INVALID_ARGUMENT, "IDEMPOTENCY_KEY_REQUIRED")
    assert await refused(pay(stub, c, [])) == (grpc.StatusCode.INVALID_ARGUMENT, "NO_LEGS")
    assert await refused(pay(stub, c, [(c.cash[0], 1), (c.cash[0], 1)])) == (grpc.StatusCode.INVALID_ARGUMENT,
                                                                               "DUPLICATE_LEG")
    # A member cannot pay a bank clearing account as if it were a merchant.
    wrong = stub.Pay(pb.PayRequest(tenant_id=c.tenant_id, idempotency_key="w", merchant_account_id=c.bank_id,
                                   legs=[pb.PayLeg(account_id=c.cash[0], amount_fen=1)]))
    assert await refused(wrong) == (grpc.StatusCode.INVALID_ARGUMENT, "WRONG_ACCOUNT_KIND")
    bad_tenant = stub.TrialBalance(pb.TrialBalanceRequest(tenant_id="nope"))
    assert await refused(bad_tenant) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_TENANT_ID")
    member_bank = stub.OpenAccount(pb.OpenAccountRequest(tenant_id=c.tenant_id, owner_kind=pb.OWNER_KIND_MEMBER,
                                                         owner_id="m0", purse_kind=pb.PURSE_KIND_BANK_CLEARING))
    assert await refused(member_bank) == (grpc.StatusCode.INVALID_ARGUMENT, "PURSE_KIND_NOT_ALLOWED")
    no_program = stub.OpenAccount(pb.OpenAccountRequest(tenant_id=c.tenant_id, owner_kind=pb.OWNER_KIND_MEMBER,
                                                        owner_id="m0", purse_kind=pb.PURSE_KIND_SUBSIDY))
    assert await refused(no_program) == (grpc.StatusCode.INVALID_ARGUMENT, "REF_REQUIRED")


async def test_opening_an_account_twice_answers_the_first(ledger: RunningService) -> None:
    stub = ledger.stub
    tenant_id = str(uuid.uuid4())
    first = await open_account(stub, tenant_id, owner_kind=pb.OWNER_KIND_MEMBER, owner_id="m1",
                               purse_kind=pb.PURSE_KIND_CASH)
    again = await stub.OpenAccount(pb.OpenAccountRequest(tenant_id=tenant_id, owner_kind=pb.OWNER_KIND_MEMBER,
                                                         owner_id="m1", purse_kind=pb.PURSE_KIND_CASH))
    assert again.account.account.account_id == first and not again.created
    # Member purses never overdraw, whatever the flag said.
    assert again.account.account.no_overdraft


async def test_the_database_refuses_to_change_or_delete_a_transfer_or_posting(ledger: RunningService,
                                                                              ledger_db) -> None:
    stub = ledger.stub
    c = await campus(stub)
    await top_up(stub, c, c.cash[0], 1000)
    for statement in ("UPDATE transfers SET amount_fen = 1", "DELETE FROM transfers",
                      "UPDATE postings SET amount_fen = amount_fen * 2", "DELETE FROM postings",
                      "TRUNCATE postings CASCADE"):
        with pytest.raises(asyncpg.RestrictViolationError, match="immutable"):
            await ledger_db.execute(statement)
    await check_books(ledger_db)


async def test_the_database_refuses_an_unbalanced_transfer(ledger: RunningService, ledger_db) -> None:
    stub = ledger.stub
    c = await campus(stub)
    transfer_id = uuid.uuid4()
    with pytest.raises(asyncpg.CheckViolationError, match="unbalanced"):
        async with ledger_db.transaction():
            seq = await ledger_db.fetchval(
                "INSERT INTO transfers (transfer_id, tenant_id, kind, idempotency_key, amount_fen, event_time)"
                " VALUES ($1, $2, 'top_up', 'forged', 100, now()) RETURNING seq", transfer_id, uuid.UUID(c.tenant_id))
            await ledger_db.execute(
                "INSERT INTO postings (transfer_id, account_id, tenant_id, seq, leg, amount_fen)"
                " VALUES ($1, $2, $3, $4, 0, 100)", transfer_id, uuid.UUID(c.cash[0]), uuid.UUID(c.tenant_id), seq)
    assert await ledger_db.fetchval("SELECT count(*) FROM transfers WHERE transfer_id = $1", transfer_id) == 0
