"""The reads on a payment's path can use their indexes, however many transfers the tenant has.

transfers' indexes by code, by idempotency key and by device are partial (only rows that have
one); a query must say so (``code_credential_id <> ''`` ...) or the planner cannot use them and
scans every transfer — once per payment by code, in one found case, until the bench saw it. Each
query the store sends is captured as sent (asyncpg's query logger) and explained with sequential
scans made as costly as PostgreSQL allows: a query that can use an index then shows none on
transfers."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import asyncpg

from onecard.ledger.v1 import ledger_pb2 as pb
from runtime.db import _init_connection as init_connection
from services.ledger.domain import CodeRef
from services.ledger.store import LedgerStore, TenantTx
from tests.conftest import RunningService
from tests.ledger.support import campus, top_up


def _scans(plan: object) -> list[str]:
    """The relations the plan reads by sequential scan."""
    found = []
    if isinstance(plan, dict):
        if plan.get("Node Type") == "Seq Scan":
            found.append(plan.get("Relation Name", ""))
        for value in plan.values():
            found += _scans(value)
    elif isinstance(plan, list):
        for value in plan:
            found += _scans(value)
    return found


async def test_payment_path_reads_find_transfers_by_index(ledger: RunningService, database_url: str) -> None:
    stub = ledger.stub
    c = await campus(stub)
    await top_up(stub, c, c.cash[0], 10_000)
    cred, other = str(uuid.uuid4()), str(uuid.uuid4())
    for n in range(3):
        await stub.Pay(pb.PayRequest(tenant_id=c.tenant_id, idempotency_key=f"coded-{n}", merchant_account_id=c.merchant_id,
                                     legs=[pb.PayLeg(account_id=c.cash[0], amount_fen=10)], device_id="pos-1",
                                     code=pb.CodeRef(credential_id=cred, counter=n + 1)))
    sent: list[asyncpg.connection.LoggedQuery] = []

    async def init(conn: asyncpg.Connection) -> None:
        await init_connection(conn)  # the service's own codecs
        conn.add_query_logger(sent.append)

    tenant = uuid.UUID(c.tenant_id)
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=1, init=init,
                                     server_settings={"search_path": "ledger"})
    try:
        async with pool.acquire() as conn:
            tx = TenantTx(conn, tenant_id=tenant)
            async with conn.transaction():
                await tx.read_for_payments(claims=[], account_ids=[uuid.UUID(c.cash[0])], counter_keys=[],
                                           codes=[CodeRef(cred, 1), CodeRef(other, 9)])
                await tx.transfers_by_code([CodeRef(cred, 2)])
                await tx.transfer_by_key("coded-1")
                now = datetime.now(UTC)
                await tx.statement_lines(merchant_account_id=None, device_id="pos-1", start=now - timedelta(days=1),
                                         end=now + timedelta(days=1), after_seq=None, limit=10)
                await tx.statement_totals(merchant_account_id=None, device_id="pos-1",
                                          start=now - timedelta(days=1), end=now + timedelta(days=1))
        await LedgerStore(pool).member_states([(tenant, "m0", [], "coded-2")])
        queries = [q for q in sent if "transfers" in q.query]
        assert len(queries) >= 6, [q.query[:80] for q in queries]
        async with pool.acquire() as conn:
            await conn.execute("SET enable_seqscan = off")
            for q in queries:
                plan = await conn.fetchval("EXPLAIN (FORMAT JSON) " + q.query, *q.args)  # decoded by the codec
                assert "transfers" not in _scans(plan), q.query
    finally:
        await pool.close()
