"""Subsidy programs: grant batches under a bill number (in the background, with progress and a
result per row), the end of a program (its purses expire back to funding and close), clawback."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from onecard.ledger.v1 import ledger_pb2 as pb
from onecard.ledger.v1 import ledger_pb2_grpc
from runtime.db import create_pool
from runtime.grpc_client import error_info
from services.ledger.app import build_app
from services.ledger.domain import GRANT_CHUNK_ROWS, GrantRow, PurseKind
from services.ledger.operations import Ledger
from services.ledger.store import LedgerStore, TenantTx
from tests.conftest import Launch, RunningService
from tests.ledger.conftest import ledger_settings
from tests.ledger.support import Campus, balance, campus, check_books, pay, refused, top_up
from tests.streams import read_exactly

PROGRAM = "meal-2026"


def _stamp(value: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


async def define(stub, c: Campus, *, ends_at: datetime | None = None, ref: str = PROGRAM) -> pb.Program:
    response = await stub.DefineProgram(pb.DefineProgramRequest(
        tenant_id=c.tenant_id, purse_kind=pb.PURSE_KIND_SUBSIDY, ref=ref, funding_account_id=c.funding_id,
        ends_at=_stamp(ends_at) if ends_at else None,
    ))
    return response.program


async def start(stub, c: Campus, bill: str, rows: list[tuple[str, int]], *, ref: str = PROGRAM
                ) -> pb.StartGrantBatchResponse:
    return await stub.StartGrantBatch(pb.StartGrantBatchRequest(
        tenant_id=c.tenant_id, bill_number=bill, purse_kind=pb.PURSE_KIND_SUBSIDY, ref=ref,
        rows=[pb.GrantRow(member_id=m, amount_fen=f) for m, f in rows],
    ))


async def finished(stub, c: Campus, batch_id: str, *, timeout_s: float = 60) -> list[pb.GrantBatch]:
    """Poll the batch until it is done: every state seen on the way, the last one done."""
    seen = []
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        batch = (await stub.GetGrantBatch(pb.GetGrantBatchRequest(tenant_id=c.tenant_id, batch_id=batch_id))).batch
        seen.append(batch)
        if batch.status == pb.GRANT_BATCH_STATUS_DONE:
            return seen
        assert asyncio.get_running_loop().time() < deadline, f"batch still running: {batch}"
        await asyncio.sleep(0.05)


async def all_rows(stub, c: Campus, batch_id: str, status: int = 0) -> list[pb.GrantRowResult]:
    rows, token = [], ""
    while True:
        page = await stub.ListGrantBatchRows(pb.ListGrantBatchRowsRequest(
            tenant_id=c.tenant_id, batch_id=batch_id, status=status, page_size=700, page_token=token))
        rows.extend(page.rows)
        token = page.next_page_token
        if not token:
            return rows


async def test_a_batch_of_thousands_grants_each_member_once_with_progress(
        ledger: RunningService, ledger_db: asyncpg.Connection) -> None:
    stub = ledger.stub
    c = await campus(stub, members=1)
    await define(stub, c)
    # m0 has a frozen purse already: its row fails alone, the rest are granted.
    await stub.FreezeAccount(pb.FreezeAccountRequest(tenant_id=c.tenant_id, account_id=c.subsidy[0]))
    rows = [("m0", 500)] + [(f"student-{n}", 1000 + n % 7) for n in range(2999)]
    # A client takes the key the batch's second row will book under, before the batch starts.
    await top_up(stub, c, c.cash[0], 1, key="grant:BILL-2026-11:2", key_scope="client:oc_mallory")
    started = await start(stub, c, "BILL-2026-11", rows)
    assert started.created and started.batch.total_rows == 3000
    seen = await finished(stub, c, started.batch.batch_id)
    done = seen[-1]
    assert (done.done_rows, done.granted_rows, done.failed_rows) == (3000, 2999, 1)
    assert done.granted_fen == sum(f for _, f in rows[1:])
    # Progress was visible on the way (chunks of 500 commit one by one) and never went backwards.
    assert [b.done_rows for b in seen] == sorted(b.done_rows for b in seen)

    failed = await all_rows(stub, c, done.batch_id, pb.GRANT_ROW_STATUS_FAILED)
    assert [(r.line, r.member_id, r.reason) for r in failed] == [(1, "m0", "ACCOUNT_FROZEN")]
    granted = await all_rows(stub, c, done.batch_id, pb.GRANT_ROW_STATUS_GRANTED)
    assert len(granted) == 2999 and [r.line for r in granted] == list(range(2, 3001))
    sample = granted[1234]
    assert (await balance(stub, c.tenant_id, sample.account_id)).posted_fen == sample.amount_fen
    # Purses were opened on first use, one per member.
    assert await ledger_db.fetchval(
        "SELECT count(*) FROM accounts WHERE purse_kind = 'subsidy' AND ref = $1 AND owner_id LIKE 'student-%'",
        PROGRAM) == 2999

    # The same bill again: the same batch, nothing new booked. Other rows under it: refused.
    again = await start(stub, c, "BILL-2026-11", rows)
    assert not again.created and again.batch.batch_id == done.batch_id
    code, reason = await refused(start(stub, c, "BILL-2026-11", rows[:10]))
    assert (code, reason) == (grpc.StatusCode.ABORTED, "BILL_NUMBER_REUSED")
    assert await ledger_db.fetchval("SELECT count(*) FROM transfers WHERE kind = 'subsidy_grant'") == 2999
    # A grant's key is the batch's own, not any caller's: a client that sent the same text first
    # (to make the row fail later) only made a write of its own; the row was granted regardless.
    found = await stub.LookupTransfer(pb.LookupTransferRequest(tenant_id=c.tenant_id,
                                                               idempotency_key="grant:BILL-2026-11:2",
                                                               key_scope="client:oc_mallory"))
    assert found.found and found.transfer.kind == pb.TRANSFER_KIND_TOP_UP
    assert granted[0].line == 2 and granted[0].transfer_id != found.transfer.transfer_id
    await check_books(ledger_db)


async def test_a_bad_batch_is_refused_whole_and_names_the_line(ledger: RunningService,
                                                               ledger_db: asyncpg.Connection) -> None:
    stub = ledger.stub
    c = await campus(stub, members=0)
    await define(stub, c)
    cases = [
        ([("a", 100), ("b", 0)], "INVALID_AMOUNT", "2"),
        ([("a", 100), ("a", 100)], "DUPLICATE_MEMBER", "2"),
        ([("", 100)], "INVALID_MEMBER_ID", "1"),
    ]
    for rows, want, line in cases:
        with_info = start(stub, c, f"BAD-{want}", rows)
        try:
            await with_info
            raise AssertionError("accepted")
        except grpc.aio.AioRpcError as error:
            reason, metadata = error_info(error)
            assert (error.code(), reason, metadata.get("line")) == (grpc.StatusCode.INVALID_ARGUMENT, want, line)
    assert await refused(start(stub, c, "NOPROG", [("a", 1)], ref="no-such")) == (
        grpc.StatusCode.NOT_FOUND, "PROGRAM_NOT_FOUND")
    assert await refused(start(stub, c, "", [("a", 1)])) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_BILL_NUMBER")
    assert await ledger_db.fetchval("SELECT count(*) FROM grant_batches") == 0


async def test_a_program_ends_its_purses_expire_to_funding_and_close(ledger: RunningService,
                                                                      ledger_db: asyncpg.Connection,
                                                                      nats_url: str) -> None:
    stub = ledger.stub
    c = await campus(stub, members=3)
    program = await define(stub, c, ends_at=datetime.now(UTC) + timedelta(days=30))
    assert program.status == pb.PROGRAM_STATUS_ACTIVE
    batch = (await start(stub, c, "B1", [("m0", 1000), ("m1", 2000), ("m2", 300)])).batch
    await finished(stub, c, batch.batch_id)
    await pay(stub, c, [(c.subsidy[0], 400)])
    await pay(stub, c, [(c.subsidy[2], 300)])  # m2 spent it all: nothing to expire
    # A hold on m1's subsidy stays held through the end; only what is available expires.
    hold = await stub.CreateHold(pb.CreateHoldRequest(
        tenant_id=c.tenant_id, idempotency_key="h1", account_id=c.subsidy[1], merchant_account_id=c.merchant_id,
        amount_fen=500, timeout_s=3600))

    # Moving the end to now ends it: the worker expires the purses in the background.
    await define(stub, c, ends_at=datetime.now(UTC) - timedelta(seconds=1))
    deadline = asyncio.get_running_loop().time() + 30
    while (program := (await stub.GetProgram(pb.GetProgramRequest(
            tenant_id=c.tenant_id, purse_kind=pb.PURSE_KIND_SUBSIDY, ref=PROGRAM))).program).status \
            != pb.PROGRAM_STATUS_ENDED:
        assert asyncio.get_running_loop().time() < deadline, program
        await asyncio.sleep(0.1)
    assert (program.expired_purses, program.expired_fen) == (2, 600 + 1500)
    after = {a: await balance(stub, c.tenant_id, a) for a in c.subsidy}
    assert [(b.posted_fen, b.pending_fen) for b in after.values()] == [(0, 0), (500, 500), (0, 0)]
    statuses = await stub.GetBalances(pb.GetBalancesRequest(tenant_id=c.tenant_id, account_ids=c.subsidy))
    assert {a.account.status for a in statuses.accounts} == {pb.ACCOUNT_STATUS_CLOSED}
    # A closed purse takes no payment and no grant; the hold made before still captures.
    assert await refused(pay(stub, c, [(c.subsidy[1], 1)])) == (grpc.StatusCode.FAILED_PRECONDITION,
                                                                 "ACCOUNT_CLOSED")
    assert await refused(start(stub, c, "B2", [("m0", 1)])) == (grpc.StatusCode.FAILED_PRECONDITION, "PROGRAM_ENDED")
    await stub.CaptureHold(pb.CaptureHoldRequest(tenant_id=c.tenant_id, idempotency_key="cap",
                                                 hold_id=hold.hold.hold_id))
    expiries = await ledger_db.fetch("SELECT amount_fen, booked_at FROM transfers WHERE kind = 'subsidy_expiry'")
    assert sorted(r["amount_fen"] for r in expiries) == [600, 1500]
    messages = await read_exactly(nats_url, stream="LEDGER", subjects="ledger.program.ended", count=1)
    assert b'"expired_fen": 2100' in messages[0].data or b'"expired_fen":2100' in messages[0].data
    await check_books(ledger_db)


async def test_clawback_takes_money_back_to_funding(ledger: RunningService, ledger_db: asyncpg.Connection) -> None:
    stub = ledger.stub
    c = await campus(stub, members=1)
    await define(stub, c)
    batch = (await start(stub, c, "B1", [("m0", 1000)])).batch
    await finished(stub, c, batch.batch_id)

    def clawback(amount: int, key: str) -> object:
        return stub.Clawback(pb.ClawbackRequest(tenant_id=c.tenant_id, idempotency_key=key, account_id=c.subsidy[0],
                                                amount_fen=amount, external_ref="granted in error"))

    first = await clawback(300, "cb-1")
    assert first.transfer.kind == pb.TRANSFER_KIND_CLAWBACK
    assert {b.account_id: b.posted_fen for b in first.balances}[c.subsidy[0]] == 700
    assert (await clawback(300, "cb-1")).transfer.transfer_id == first.transfer.transfer_id
    assert await refused(clawback(701, "cb-2")) == (grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_FUNDS")
    rest = await clawback(0, "cb-3")
    assert rest.transfer.amount_fen == 700
    assert await refused(clawback(0, "cb-4")) == (grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_FUNDS")
    assert await refused(stub.Clawback(pb.ClawbackRequest(
        tenant_id=c.tenant_id, idempotency_key="cb-5", account_id=c.cash[0], amount_fen=1))) == (
        grpc.StatusCode.INVALID_ARGUMENT, "WRONG_ACCOUNT_KIND")
    assert await refused(stub.Clawback(pb.ClawbackRequest(
        tenant_id=str(uuid.uuid4()), idempotency_key="cb-6", account_id=c.subsidy[0], amount_fen=1))) == (
        grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND")
    await check_books(ledger_db)


async def test_a_crashed_chunk_is_done_again_exactly_once(launch: Launch, database_url: str, nats_url: str) -> None:
    """A worker that dies mid-chunk leaves nothing of that chunk; the next run books each row
    once. The crash: the chunk's transaction fails after its grants were written."""
    # The service's own worker sleeps for the whole test; this test drives the chunks itself.
    app = build_app(ledger_settings(database_url=database_url, nats_url=nats_url, program_interval_s=3600))
    service = await launch(app, stub_cls=ledger_pb2_grpc.LedgerServiceStub)
    stub = service.stub
    c = await campus(stub, members=0)
    await define(stub, c)
    rows = [GrantRow(member_id=f"s{n}", amount_fen=100) for n in range(1200)]
    pool = await create_pool(database_url, schema="ledger", min_size=1, max_size=2)

    class Crash(Exception):
        pass

    class CrashingStore(LedgerStore):
        @asynccontextmanager
        async def tenant_tx(self, tenant_id: uuid.UUID) -> AsyncIterator[TenantTx]:
            async with super().tenant_tx(tenant_id) as tx:
                yield tx
                written = await tx.conn.fetchval("SELECT count(*) FROM transfers WHERE external_ref = 'CRASH'")
                assert written == GRANT_CHUNK_ROWS, "the chunk wrote its grants before the crash"
                raise Crash()

    tenant_id = uuid.UUID(c.tenant_id)
    try:
        batch, _ = await Ledger(LedgerStore(pool)).start_grant_batch(
            tenant_id=tenant_id, bill_number="CRASH", purse_kind=PurseKind.SUBSIDY, ref=PROGRAM, rows=rows)
        with pytest.raises(Crash):
            await Ledger(CrashingStore(pool)).run_grant_chunk(tenant_id=tenant_id, batch_id=batch.batch_id)
        async with pool.acquire() as db:
            assert await db.fetchval("SELECT count(*) FROM transfers WHERE external_ref = 'CRASH'") == 0
            assert await db.fetchval("SELECT done_rows FROM grant_batches WHERE bill_number = 'CRASH'") == 0
        # The next worker (any replica) picks the batch up and finishes it.
        assert await Ledger(LedgerStore(pool)).run_grant_batches() == 2
        async with pool.acquire() as db:
            assert await db.fetchval("SELECT count(*) FROM transfers WHERE external_ref = 'CRASH'") == 1200
            assert await db.fetchval("SELECT count(DISTINCT idempotency_key) FROM transfers"
                                     " WHERE external_ref = 'CRASH'") == 1200
            await check_books(db)
    finally:
        await pool.close()
    done = (await finished(stub, c, str(batch.batch_id)))[-1]
    assert (done.granted_rows, done.failed_rows, done.granted_fen) == (1200, 0, 120_000)
