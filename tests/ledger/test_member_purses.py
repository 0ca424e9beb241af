"""A member created in identity has a cash purse in the ledger soon after, opened by the ledger's
consumer of identity's events (once, however often the event arrives)."""

from __future__ import annotations

import asyncio

import asyncpg

from onecard.ledger.v1 import ledger_pb2 as pb
from tests.conftest import RunningService
from tests.identity.support import create_member, create_tenant


async def test_a_new_member_gets_a_cash_purse(ledger: RunningService, identity: RunningService,
                                              ledger_db: asyncpg.Connection) -> None:
    tenant_id = await create_tenant(identity.stub)
    members = [await create_member(identity.stub, tenant_id, f"S{n}") for n in range(3)]
    deadline = asyncio.get_running_loop().time() + 20
    for member in members:
        while True:
            owned = await ledger.stub.GetBalances(pb.GetBalancesRequest(
                tenant_id=tenant_id, owner_kind=pb.OWNER_KIND_MEMBER, owner_id=member.member_id))
            if owned.accounts:
                break
            assert asyncio.get_running_loop().time() < deadline, "no purse opened"
            await asyncio.sleep(0.1)
        [purse] = owned.accounts
        assert (purse.account.purse_kind, purse.account.no_overdraft, purse.balance.posted_fen) == (
            pb.PURSE_KIND_CASH, True, 0)
    # Opening it again (a bank's first top-up does) finds the same purse.
    again = await ledger.stub.OpenAccount(pb.OpenAccountRequest(
        tenant_id=tenant_id, owner_kind=pb.OWNER_KIND_MEMBER, owner_id=members[0].member_id,
        purse_kind=pb.PURSE_KIND_CASH))
    assert not again.created
    assert await ledger_db.fetchval("SELECT count(*) FROM accounts") == 3
