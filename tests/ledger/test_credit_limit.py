"""A bank's clearing account has a credit limit: the attack was a bank topping up any amount from
a clearing account that could go negative without end, creating money. Now a new clearing account
may owe nothing, the tenant sets how much it may, and the limit holds under concurrency."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import grpc
import pytest

from onecard.ledger.v1 import ledger_pb2 as pb
from runtime.grpc_client import error_info
from tests.conftest import RunningService
from tests.ledger.support import allow_credit, balance, check_books, open_account, refused


async def _bank_and_member(stub, *, tenant_id: str | None = None) -> tuple[str, str, str]:  # noqa: ANN001
    tenant_id = tenant_id or str(uuid.uuid4())
    bank = await open_account(stub, tenant_id, owner_kind=pb.OWNER_KIND_TENANT, owner_id=tenant_id,
                              purse_kind=pb.PURSE_KIND_BANK_CLEARING, ref="bank-client-1")
    cash = await open_account(stub, tenant_id, owner_kind=pb.OWNER_KIND_MEMBER, owner_id="m0",
                              purse_kind=pb.PURSE_KIND_CASH)
    return tenant_id, bank, cash


def _top_up(stub, tenant_id: str, bank: str, cash: str, amount_fen: int, key: str | None = None):  # noqa: ANN001, ANN202
    return stub.TopUp(pb.TopUpRequest(tenant_id=tenant_id, idempotency_key=key or str(uuid.uuid4()),
                                      from_account_id=bank, to_account_id=cash, amount_fen=amount_fen))


async def test_a_new_clearing_account_may_owe_nothing_so_its_top_up_is_refused(ledger: RunningService,
                                                                               ledger_db) -> None:
    stub = ledger.stub
    tenant_id, bank, cash = await _bank_and_member(stub)
    account = (await stub.GetBalances(pb.GetBalancesRequest(tenant_id=tenant_id, account_ids=[bank]))).accounts[0]
    assert account.account.HasField("credit_limit_fen") and account.account.credit_limit_fen == 0
    # Other accounts have no credit limit at all.
    purse = (await stub.GetBalances(pb.GetBalancesRequest(tenant_id=tenant_id, account_ids=[cash]))).accounts[0]
    assert not purse.account.HasField("credit_limit_fen")

    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _top_up(stub, tenant_id, bank, cash, 100_000_000, key="mint")
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    reason, metadata = error_info(info.value)
    assert reason == "CREDIT_LIMIT_EXCEEDED"
    assert (metadata["credit_limit_fen"], metadata["available_credit_fen"]) == ("0", "0")
    assert (await balance(stub, tenant_id, cash)).posted_fen == 0
    assert (await balance(stub, tenant_id, bank)).posted_fen == 0
    # The key stays free: once the tenant allows it, the same top-up goes through under it.
    await allow_credit(stub, tenant_id, bank, credit_limit_fen=100_000_000)
    assert (await _top_up(stub, tenant_id, bank, cash, 100_000_000, key="mint")).transfer.amount_fen == 100_000_000
    await check_books(ledger_db)


async def test_top_ups_reach_the_limit_exactly_and_not_one_fen_past_it(ledger: RunningService, ledger_db) -> None:
    stub = ledger.stub
    tenant_id, bank, cash = await _bank_and_member(stub)
    await allow_credit(stub, tenant_id, bank, credit_limit_fen=10_000)
    await _top_up(stub, tenant_id, bank, cash, 6_000)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _top_up(stub, tenant_id, bank, cash, 4_001)
    reason, metadata = error_info(info.value)
    assert reason == "CREDIT_LIMIT_EXCEEDED" and metadata["available_credit_fen"] == "4000"
    await _top_up(stub, tenant_id, bank, cash, 4_000)
    assert (await balance(stub, tenant_id, bank)).available_fen == -10_000
    assert await refused(_top_up(stub, tenant_id, bank, cash, 1)) == (grpc.StatusCode.FAILED_PRECONDITION,
                                                                      "CREDIT_LIMIT_EXCEEDED")
    await check_books(ledger_db)


async def test_concurrent_top_ups_never_take_the_clearing_account_past_its_limit(ledger: RunningService,
                                                                                  ledger_db) -> None:
    stub = ledger.stub
    tenant_id, bank, _ = await _bank_and_member(stub)
    members = [await open_account(stub, tenant_id, owner_kind=pb.OWNER_KIND_MEMBER, owner_id=f"m{n}",
                                  purse_kind=pb.PURSE_KIND_CASH) for n in range(8)]
    await allow_credit(stub, tenant_id, bank, credit_limit_fen=25_000)
    calls = [_top_up(stub, tenant_id, bank, members[n % 8], 1_000) for n in range(40)]
    results = await asyncio.gather(*calls, return_exceptions=True)
    booked = [r for r in results if not isinstance(r, BaseException)]
    refusals = [error_info(r)[0] for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(booked) == 25 and refusals == ["CREDIT_LIMIT_EXCEEDED"] * 15
    assert (await balance(stub, tenant_id, bank)).posted_fen == -25_000
    await check_books(ledger_db)


async def test_the_tenant_lowers_a_limit_to_what_is_owed_but_not_below(ledger: RunningService, ledger_db) -> None:
    stub = ledger.stub
    tenant_id, bank, cash = await _bank_and_member(stub)
    await allow_credit(stub, tenant_id, bank, credit_limit_fen=50_000)
    await _top_up(stub, tenant_id, bank, cash, 30_000)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await allow_credit(stub, tenant_id, bank, credit_limit_fen=29_999)
    reason, metadata = error_info(info.value)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert reason == "CREDIT_LIMIT_BELOW_USE" and metadata["credit_used_fen"] == "30000"
    lowered = await allow_credit(stub, tenant_id, bank, credit_limit_fen=30_000)
    assert lowered.account.account.credit_limit_fen == 30_000
    assert lowered.account.balance.available_fen == -30_000
    assert (await refused(_top_up(stub, tenant_id, bank, cash, 1)))[1] == "CREDIT_LIMIT_EXCEEDED"
    await check_books(ledger_db)


async def test_a_credit_limit_is_only_for_a_clearing_account_of_the_tenant(ledger: RunningService) -> None:
    stub = ledger.stub
    tenant_id, bank, cash = await _bank_and_member(stub)
    merchant = await open_account(stub, tenant_id, owner_kind=pb.OWNER_KIND_MERCHANT, owner_id="canteen",
                                  purse_kind=pb.PURSE_KIND_MERCHANT_SETTLEMENT)
    for account in (cash, merchant):
        assert await refused(allow_credit(stub, tenant_id, account)) == (grpc.StatusCode.INVALID_ARGUMENT,
                                                                         "WRONG_ACCOUNT_KIND")
    for limit in (-1, 10**15 + 1):
        assert await refused(allow_credit(stub, tenant_id, bank, credit_limit_fen=limit)) == (
            grpc.StatusCode.INVALID_ARGUMENT, "INVALID_CREDIT_LIMIT")
    other_tenant = str(uuid.uuid4())
    assert await refused(allow_credit(stub, other_tenant, bank)) == (grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND")
    assert (await stub.GetBalances(pb.GetBalancesRequest(tenant_id=tenant_id, account_ids=[bank]))
            ).accounts[0].account.credit_limit_fen == 0


async def test_the_row_itself_refuses_a_balance_below_the_limit(ledger: RunningService, ledger_db) -> None:
    stub = ledger.stub
    tenant_id, bank, cash = await _bank_and_member(stub)
    await allow_credit(stub, tenant_id, bank, credit_limit_fen=1_000)
    await _top_up(stub, tenant_id, bank, cash, 1_000)
    with pytest.raises(asyncpg.CheckViolationError, match="accounts_within_credit_limit"):
        await ledger_db.execute("UPDATE accounts SET posted_fen = posted_fen - 1 WHERE account_id = $1",
                                uuid.UUID(bank))
    with pytest.raises(asyncpg.CheckViolationError, match="accounts_within_credit_limit"):
        await ledger_db.execute("UPDATE accounts SET sharded = true WHERE account_id = $1", uuid.UUID(bank))
    await check_books(ledger_db)
