"""Small helpers shared by the ledger tests: opening a campus's accounts and checking the books."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import asyncpg
import grpc
import pytest

from onecard.ledger.v1 import ledger_pb2 as pb
from runtime.grpc_client import error_info


async def refused(call: Any) -> tuple[grpc.StatusCode, str | None]:
    """The status code and ErrorInfo reason of a call that must fail."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    reason, _ = error_info(info.value)
    return info.value.code(), reason


async def open_account(stub: Any, tenant_id: str, *, owner_kind: int, owner_id: str, purse_kind: int,
                       ref: str = "", no_overdraft: bool = False) -> str:
    response = await stub.OpenAccount(pb.OpenAccountRequest(
        tenant_id=tenant_id, owner_kind=owner_kind, owner_id=owner_id, purse_kind=purse_kind, ref=ref,
        no_overdraft=no_overdraft,
    ))
    return response.account.account.account_id


# What a test campus's bank may owe (its clearing account's credit limit): more than any test tops
# up, so only the tests of the limit itself meet it.
TEST_CREDIT_LIMIT_FEN = 10**12


async def allow_credit(stub: Any, tenant_id: str, account_id: str, *,
                       credit_limit_fen: int = TEST_CREDIT_LIMIT_FEN) -> pb.SetCreditLimitResponse:
    """Let a bank clearing account top up: a new one may owe nothing (prefunded only)."""
    return await stub.SetCreditLimit(pb.SetCreditLimitRequest(tenant_id=tenant_id, account_id=account_id,
                                                              credit_limit_fen=credit_limit_fen))


@dataclass
class Campus:
    """One tenant with a bank clearing account, a canteen and members' cash and subsidy purses."""

    tenant_id: str
    bank_id: str
    funding_id: str
    merchant_id: str
    cash: list[str]
    subsidy: list[str]


async def campus(stub: Any, *, members: int = 2) -> Campus:
    tenant_id = str(uuid.uuid4())
    bank_id = await open_account(stub, tenant_id, owner_kind=pb.OWNER_KIND_TENANT, owner_id="bank",
                                 purse_kind=pb.PURSE_KIND_BANK_CLEARING)
    await allow_credit(stub, tenant_id, bank_id)
    funding_id = await open_account(stub, tenant_id, owner_kind=pb.OWNER_KIND_TENANT, owner_id="school",
                                    purse_kind=pb.PURSE_KIND_SUBSIDY_FUNDING, ref="meal-2026")
    merchant_id = await open_account(stub, tenant_id, owner_kind=pb.OWNER_KIND_MERCHANT, owner_id="canteen-1",
                                     purse_kind=pb.PURSE_KIND_MERCHANT_SETTLEMENT)
    cash, subsidy = [], []
    for n in range(members):
        cash.append(await open_account(stub, tenant_id, owner_kind=pb.OWNER_KIND_MEMBER, owner_id=f"m{n}",
                                       purse_kind=pb.PURSE_KIND_CASH))
        subsidy.append(await open_account(stub, tenant_id, owner_kind=pb.OWNER_KIND_MEMBER, owner_id=f"m{n}",
                                          purse_kind=pb.PURSE_KIND_SUBSIDY, ref="meal-2026"))
    return Campus(tenant_id=tenant_id, bank_id=bank_id, funding_id=funding_id, merchant_id=merchant_id, cash=cash,
                  subsidy=subsidy)


async def top_up(stub: Any, c: Campus, account_id: str, amount_fen: int, *, key: str | None = None,
                 key_scope: str = "") -> pb.TopUpResponse:
    return await stub.TopUp(pb.TopUpRequest(
        tenant_id=c.tenant_id, idempotency_key=key or str(uuid.uuid4()), key_scope=key_scope, from_account_id=c.bank_id,
        to_account_id=account_id, amount_fen=amount_fen,
    ))


async def grant(stub: Any, c: Campus, account_id: str, amount_fen: int) -> pb.TopUpResponse:
    return await stub.TopUp(pb.TopUpRequest(
        tenant_id=c.tenant_id, idempotency_key=str(uuid.uuid4()), from_account_id=c.funding_id,
        to_account_id=account_id, amount_fen=amount_fen,
    ))


async def pay(stub: Any, c: Campus, legs: list[tuple[str, int]], *, key: str | None = None,
              key_scope: str = "") -> pb.PayResponse:
    return await stub.Pay(pb.PayRequest(
        tenant_id=c.tenant_id, idempotency_key=key or str(uuid.uuid4()), key_scope=key_scope,
        merchant_account_id=c.merchant_id,
        legs=[pb.PayLeg(account_id=a, amount_fen=f) for a, f in legs], device_id="pos-1",
    ))


async def balance(stub: Any, tenant_id: str, account_id: str) -> pb.Balance:
    response = await stub.GetBalances(pb.GetBalancesRequest(tenant_id=tenant_id, account_ids=[account_id]))
    return response.accounts[0].balance


def balances_by_id(balances: Any) -> dict[str, tuple[int, int, int]]:
    return {b.account_id: (b.posted_fen, b.pending_fen, b.available_fen) for b in balances}


async def check_books(db: asyncpg.Connection) -> None:
    """The invariants of the whole ledger, checked on its tables: every transfer's postings sum
    to zero, all postings sum to zero, every balance cache equals its postings, no purse that
    forbids overdraft is below zero and no clearing account is below its credit limit."""
    unbalanced = await db.fetch("SELECT transfer_id FROM postings GROUP BY transfer_id HAVING sum(amount_fen) <> 0")
    assert not unbalanced, f"unbalanced transfers: {unbalanced}"
    assert await db.fetchval("SELECT COALESCE(sum(amount_fen), 0) FROM postings") == 0
    drift = await db.fetch(
        "SELECT a.account_id, a.posted_fen + COALESCE((SELECT sum(posted_fen) FROM account_shards s"
        "  WHERE s.account_id = a.account_id), 0) AS cached, a.pending_fen AS cached_pending,"
        " COALESCE((SELECT sum(amount_fen) FROM postings p WHERE p.account_id = a.account_id), 0) AS posted,"
        " COALESCE((SELECT sum(pending_fen) FROM postings p WHERE p.account_id = a.account_id), 0) AS pending"
        " FROM accounts a"
    )
    for row in drift:
        assert row["cached"] == row["posted"], f"posted cache drifted: {dict(row)}"
        assert row["cached_pending"] == row["pending"], f"pending cache drifted: {dict(row)}"
    overdrawn = await db.fetch("SELECT account_id FROM accounts WHERE no_overdraft AND posted_fen - pending_fen < 0")
    assert not overdrawn, f"overdrawn purses: {overdrawn}"
    past_limit = await db.fetch("SELECT account_id FROM accounts WHERE credit_limit_fen IS NOT NULL"
                                " AND (sharded OR posted_fen - pending_fen < -credit_limit_fen)")
    assert not past_limit, f"clearing accounts past their credit limit: {past_limit}"
