"""The bank test, in the style of Jepsen's: many concurrent clients pay, refund and top up while
the ledger process is killed with SIGKILL and restarted. A client whose call ends in doubt
(UNAVAILABLE, deadline, reset) retries it with the same idempotency key once the ledger is back,
until it gets a definite answer. At the end every acknowledged transfer is there exactly once,
nothing exists that was never asked for, and every total holds.

The test makes sure its fault landed where it matters: a kill is sent only while writes are in
flight, and the ledger is killed again (at least ``MIN_KILLS`` times, at most ``MAX_KILLS``) until
at least ``MIN_IN_DOUBT_OPS`` writes were left in doubt by a kill. It then asserts that writes
were in doubt and retried, and that every one of them got a definite answer that the books hold
exactly once; a run where no kill hit an in-flight write fails instead of passing quietly."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devstack.servers import free_port
from onecard.ledger.v1 import ledger_pb2 as pb
from onecard.ledger.v1 import ledger_pb2_grpc
from runtime.grpc_client import error_info
from tests.mesh import AllowedCallerChannel, authorizer_for, service_values
from tests.ledger.support import allow_credit, check_books

# alone: the run counts what twelve workers get done between kills; other tests beside it would starve it.
pytestmark = [pytest.mark.slow, pytest.mark.alone]

REPO = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"

MEMBERS = 20
MERCHANTS = 3
WORKERS = 12
# The first kill after this much of the run, each next one this long after the last restart; the
# workers go on for AFTER_LAST_RESTART_S after the last one, so its in-doubt writes are retried.
FIRST_KILL_S = 4.0
KILL_GAP_S = 3.0
AFTER_LAST_RESTART_S = 3.0
MIN_KILLS = 2
MAX_KILLS = 6
# Kills go on until this many writes were left in doubt by them; a kill waits for this many writes
# in flight (bounded: at most KILL_WAIT_S, then it is sent anyway).
MIN_IN_DOUBT_OPS = 5
MIN_IN_FLIGHT = WORKERS // 2
KILL_WAIT_S = 5.0
INITIAL_FEN = 20_000
MAX_PAY_FEN = 3_000
MAX_TOP_UP_FEN = 5_000
MAX_OPS_PER_WORKER = 5_000

CALL_TIMEOUT_S = 5.0
MAX_ATTEMPTS = 30
# How long a worker waits for the ledger to come back before it gives up on a call (left in doubt).
UP_WAIT_S = 30.0
START_TIMEOUT_S = 30.0
MAX_HISTORY_PAGES = 200

# An outcome we cannot know: the call may or may not have been applied.
IN_DOUBT = frozenset({
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
})


# Every write of this bank is filed under its own key scope, whichever service sends it.
SCOPE = "client:bank-under-test"


class LedgerProcess:
    """``python -m services.ledger`` as a child process on a fixed loopback port."""

    def __init__(self, *, database_url: str, nats_url: str, port: int, log_path: Path):
        self.port = port
        self.log_path = log_path
        self.env = {
            **os.environ,
            "ONECARD_DATABASE_URL": service_values("ledger", database_url)["database_url"],
            "ONECARD_NATS_URL": nats_url,
            "ONECARD_GRPC_HOST": HOST,
            "ONECARD_GRPC_PORT": str(port),
            "ONECARD_METRICS_PORT": "0",
            "ONECARD_HEALTH_INTERVAL_S": "0.2",
            "ONECARD_LOG_LEVEL": "warning",
            "ONECARD_TLS_DIR": str(service_values("ledger")["tls_dir"]),
            "ONECARD_NATS_SEED": service_values("ledger")["nats_seed"],
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None
        with self.log_path.open("ab") as log:
            log.write(f"--- start {self.starts + 1}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "services.ledger"], cwd=REPO, env=self.env,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )
        self.starts += 1

    def kill(self) -> None:
        """SIGKILL, no grace; waits for the process to be gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""

    async def wait_serving(self, channel: grpc.aio.Channel, timeout_s: float = START_TIMEOUT_S) -> None:
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"the ledger exited with {self.proc.returncode}\n{self.log_tail()}")
            try:
                answer = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.05)
        raise AssertionError(f"the ledger was not SERVING within {timeout_s}s\n{self.log_tail()}")


@dataclass
class Op:
    """One write as the client asked for it, and what the client learnt of its outcome."""

    key: str
    kind: str  # "pay", "refund", "top_up"
    member: int
    amount_fen: int  # as asked; 0 for a refund of the rest
    merchant: int = -1
    payment_transfer_id: str = ""  # refunds
    outcome: str = "unknown"  # "ok", "refused", "unknown"
    reason: str | None = None
    transfer_id: str = ""
    booked_fen: int = 0  # the amount the ledger answered (ok only)
    attempts: int = 0
    # A timed-out attempt may still be running in the ledger, so a later refusal is not final.
    timed_out: bool = False
    # Some attempt ended in doubt (the call was in flight when the ledger died, or came while it was away).
    doubted: bool = False


@dataclass
class Stats:
    in_doubt_errors: Counter = field(default_factory=Counter)
    retried_ops: int = 0
    # Writes with an attempt ended in doubt.
    in_doubt_ops: int = 0
    # Retried ops answered with a transfer booked before their first in-doubt failure: the first
    # attempt had committed and the retry got its result back by key.
    replayed: int = 0
    kills: int = 0
    in_flight_at_kills: list[int] = field(default_factory=list)
    restart_s: list[float] = field(default_factory=list)


@dataclass
class Books:
    tenant_id: str
    bank: str
    merchants: list[str]
    cash: list[str]


class Client:
    def __init__(self, stub: Any, books: Books, up: asyncio.Event, stats: Stats):
        self.stub = stub
        self.books = books
        self.up = up
        self.stats = stats
        self.ops: dict[str, Op] = {}
        # Calls sent and not answered yet: what a kill can catch.
        self.in_flight = 0

    def request(self, op: Op) -> tuple[Any, Any]:
        b = self.books
        if op.kind == "pay":
            return self.stub.Pay, pb.PayRequest(
                tenant_id=b.tenant_id, idempotency_key=op.key, key_scope=SCOPE,
                merchant_account_id=b.merchants[op.merchant],
                legs=[pb.PayLeg(account_id=b.cash[op.member], amount_fen=op.amount_fen)], device_id="pos-1")
        if op.kind == "refund":
            return self.stub.Refund, pb.RefundRequest(
                tenant_id=b.tenant_id, idempotency_key=op.key, key_scope=SCOPE,
                payment_transfer_id=op.payment_transfer_id,
                amount_fen=op.amount_fen)
        return self.stub.TopUp, pb.TopUpRequest(
            tenant_id=b.tenant_id, idempotency_key=op.key, key_scope=SCOPE, from_account_id=b.bank,
            to_account_id=b.cash[op.member],
            amount_fen=op.amount_fen)

    async def run(self, op: Op) -> Op:
        """Send ``op`` until a definite answer, always with the same key and the same request."""
        self.ops[op.key] = op
        method, request = self.request(op)
        first_doubt: float | None = None
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                await asyncio.wait_for(self.up.wait(), UP_WAIT_S)
            except TimeoutError:
                break
            op.attempts = attempt
            self.in_flight += 1
            try:
                answer = await method(request, timeout=CALL_TIMEOUT_S)
            except grpc.aio.AioRpcError as exc:
                if exc.code() in IN_DOUBT:
                    self.stats.in_doubt_errors[exc.code().name] += 1
                    if not op.doubted:
                        op.doubted = True
                        self.stats.in_doubt_ops += 1
                    first_doubt = first_doubt or time.time()
                    op.timed_out |= exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                    await asyncio.sleep(0.02 * attempt)
                    continue
                op.outcome, op.reason = "refused", error_info(exc)[0] or exc.code().name
                break
            finally:
                self.in_flight -= 1
            op.outcome, op.transfer_id, op.booked_fen = "ok", answer.transfer.transfer_id, answer.transfer.amount_fen
            if first_doubt is not None and answer.transfer.booked_at.ToDatetime(tzinfo=UTC).timestamp() < first_doubt:
                self.stats.replayed += 1
            break
        if op.attempts > 1:
            self.stats.retried_ops += 1
        return op


async def open_account(stub: Any, tenant_id: str, **kw: Any) -> str:
    answer = await stub.OpenAccount(pb.OpenAccountRequest(tenant_id=tenant_id, **kw), timeout=CALL_TIMEOUT_S)
    return answer.account.account.account_id


async def history_ids(stub: Any, tenant_id: str, account_id: str) -> list[str]:
    ids: list[str] = []
    token = ""
    for _ in range(MAX_HISTORY_PAGES):
        page = await stub.ListTransfers(pb.ListTransfersRequest(tenant_id=tenant_id, account_id=account_id,
                                                                page_size=200, page_token=token),
                                        timeout=CALL_TIMEOUT_S)
        ids.extend(t.transfer_id for t in page.transfers)
        token = page.next_page_token
        if not token:
            return ids
    raise AssertionError(f"history of {account_id} longer than {MAX_HISTORY_PAGES} pages")


async def worker(n: int, client: Client, stop: asyncio.Event, rng: random.Random) -> None:
    # Payments this worker may still refund: transfer id -> (op, fen not yet refunded).
    refundable: dict[str, list[Any]] = {}
    for i in range(MAX_OPS_PER_WORKER):
        if stop.is_set():
            return
        key = f"w{n}-{i}-{uuid.uuid4().hex[:8]}"
        roll = rng.random()
        candidates = [tid for tid, (_, left) in refundable.items() if left > 0]
        if roll < 0.25 and candidates:
            tid = rng.choice(candidates)
            payment, left = refundable[tid]
            amount = 0 if rng.random() < 0.3 else rng.randint(1, left)
            op = await client.run(Op(key=key, kind="refund", member=payment.member, merchant=payment.merchant,
                                     amount_fen=amount, payment_transfer_id=tid))
            if op.outcome == "ok":
                refundable[tid][1] = left - op.booked_fen
            else:
                # In doubt for good, or refused: how much is left is not known here any more.
                refundable[tid][1] = 0
        elif roll < 0.45:
            await client.run(Op(key=key, kind="top_up", member=rng.randrange(MEMBERS),
                                amount_fen=rng.randint(1, MAX_TOP_UP_FEN)))
        else:
            op = await client.run(Op(key=key, kind="pay", member=rng.randrange(MEMBERS),
                                     merchant=rng.randrange(MERCHANTS), amount_fen=rng.randint(1, MAX_PAY_FEN)))
            if op.outcome == "ok":
                refundable[op.transfer_id] = [op, op.booked_fen]


async def kill_while_writes_in_flight(ledger: LedgerProcess, client: Client) -> int:
    """SIGKILL the ledger once ``MIN_IN_FLIGHT`` writes are in flight (or after ``KILL_WAIT_S``
    with as many as there are): answers how many were in flight at the kill."""
    deadline = time.monotonic() + KILL_WAIT_S
    while client.in_flight < MIN_IN_FLIGHT and time.monotonic() < deadline:
        await asyncio.sleep(0.001)
    # No await between the count and the kill: these calls are outstanding when the process dies.
    in_flight = client.in_flight
    ledger.kill()
    return in_flight


async def chaos(ledger: LedgerProcess, channel: grpc.aio.Channel, client: Client, up: asyncio.Event,
                stop: asyncio.Event, stats: Stats, started: float) -> None:
    """Kill and restart the ledger until at least MIN_KILLS kills left MIN_IN_DOUBT_OPS writes in
    doubt (at most MAX_KILLS), then let the workers retry for a while and stop them."""
    await asyncio.sleep(max(0.0, started + FIRST_KILL_S - time.monotonic()))
    while stats.kills < MAX_KILLS:
        up.clear()  # new calls wait; calls already in flight die with the process
        stats.in_flight_at_kills.append(await kill_while_writes_in_flight(ledger, client))
        stats.kills += 1
        t0 = time.monotonic()
        await asyncio.sleep(0.2)
        ledger.start()
        await ledger.wait_serving(channel)
        stats.restart_s.append(time.monotonic() - t0)
        up.set()
        if stats.kills >= MIN_KILLS and stats.in_doubt_ops >= MIN_IN_DOUBT_OPS:
            break
        await asyncio.sleep(KILL_GAP_S)
    await asyncio.sleep(AFTER_LAST_RESTART_S)
    stop.set()


async def test_acknowledged_transfers_survive_sigkill_exactly_once_and_the_books_balance(
        database_url: str, nats_url: str, tmp_path: Path) -> None:
    ledger = LedgerProcess(database_url=database_url, nats_url=nats_url, port=free_port(HOST),
                           log_path=tmp_path / "ledger.log")
    channel = AllowedCallerChannel(f"{HOST}:{ledger.port}", server_name="ledger",
                                   authorizer=authorizer_for("onecard.ledger.v1.LedgerService"), options=[
        ("grpc.initial_reconnect_backoff_ms", 50),
        ("grpc.min_reconnect_backoff_ms", 50),
        ("grpc.max_reconnect_backoff_ms", 300),
    ])
    db: asyncpg.Connection | None = None
    try:
        ledger.start()
        await ledger.wait_serving(channel)
        stub = ledger_pb2_grpc.LedgerServiceStub(channel)

        # --- one campus: a bank, three merchants, twenty funded members --------------------------
        tenant_id = str(uuid.uuid4())
        bank = await open_account(stub, tenant_id, owner_kind=pb.OWNER_KIND_TENANT, owner_id="bank",
                                  purse_kind=pb.PURSE_KIND_BANK_CLEARING)
        await allow_credit(stub, tenant_id, bank)
        merchants = [await open_account(stub, tenant_id, owner_kind=pb.OWNER_KIND_MERCHANT, owner_id=f"shop-{m}",
                                        purse_kind=pb.PURSE_KIND_MERCHANT_SETTLEMENT) for m in range(MERCHANTS)]
        cash = [await open_account(stub, tenant_id, owner_kind=pb.OWNER_KIND_MEMBER, owner_id=f"m{m}",
                                   purse_kind=pb.PURSE_KIND_CASH, no_overdraft=True) for m in range(MEMBERS)]
        books = Books(tenant_id=tenant_id, bank=bank, merchants=merchants, cash=cash)
        stats = Stats()
        up = asyncio.Event()
        up.set()
        client = Client(stub, books, up, stats)
        for m in range(MEMBERS):
            op = await client.run(Op(key=f"setup-{m}", kind="top_up", member=m, amount_fen=INITIAL_FEN))
            assert op.outcome == "ok", op

        # --- the run: workers against SIGKILLs sent while writes are in flight --------------------
        started = time.monotonic()
        stop = asyncio.Event()
        seed = random.randrange(2**32)
        print(f"\nbank test seed {seed}")
        rngs = [random.Random(seed + n) for n in range(WORKERS)]
        tasks = [asyncio.create_task(worker(n, client, stop, rngs[n])) for n in range(WORKERS)]
        chaos_task = asyncio.create_task(chaos(ledger, channel, client, up, stop, stats, started))
        chaos_bound_s = FIRST_KILL_S + MAX_KILLS * (KILL_WAIT_S + START_TIMEOUT_S + KILL_GAP_S) + AFTER_LAST_RESTART_S
        try:
            await asyncio.wait_for(chaos_task, chaos_bound_s)
            await asyncio.wait_for(asyncio.gather(*tasks), UP_WAIT_S + MAX_ATTEMPTS * CALL_TIMEOUT_S)
        finally:
            for task in [*tasks, chaos_task]:
                task.cancel()
            await asyncio.gather(*tasks, chaos_task, return_exceptions=True)
        run_s = time.monotonic() - started
        await ledger.wait_serving(channel)

        # --- the fault landed: kills caught writes in flight, which were retried -------------------
        assert MIN_KILLS <= stats.kills <= MAX_KILLS
        assert any(stats.in_flight_at_kills), f"no kill caught a write in flight: {stats.in_flight_at_kills}"
        assert stats.in_doubt_ops >= MIN_IN_DOUBT_OPS, (
            f"{MAX_KILLS} kills left only {stats.in_doubt_ops} writes in doubt (in flight at the kills: "
            f"{stats.in_flight_at_kills})")
        assert stats.retried_ops > 0

        ops = client.ops
        by_outcome = Counter(op.outcome for op in ops.values())
        by_kind = Counter((op.kind, op.outcome) for op in ops.values())
        assert by_outcome["ok"] > 100, by_kind
        unexpected = [op for op in ops.values() if op.outcome == "refused" and op.reason != "INSUFFICIENT_FUNDS"]
        assert not unexpected, f"refusals other than INSUFFICIENT_FUNDS: {unexpected[:5]}"
        assert all(op.kind == "pay" for op in ops.values() if op.outcome == "refused")

        # --- what the database holds, straight from the ledger schema ---------------------------
        db = await asyncpg.connect(database_url, server_settings={"search_path": "ledger"})
        rows = await db.fetch(
            "SELECT idempotency_key, count(*) AS n, min(transfer_id::text) AS transfer_id, min(kind) AS kind,"
            " min(amount_fen) AS amount_fen FROM transfers WHERE tenant_id = $1 GROUP BY idempotency_key",
            uuid.UUID(tenant_id))
        # Stored under the client's scope (runtime.idempotency): the keys the client sent, filed as its own.
        stored = {r["idempotency_key"].removeprefix(f"{SCOPE}/"): r for r in rows}
        duplicated = [dict(r) for r in rows if r["n"] != 1]
        assert not duplicated, f"keys booked more than once: {duplicated[:5]}"
        strangers = sorted(set(stored) - set(ops))
        assert not strangers, f"transfers under keys no client ever sent: {strangers[:5]}"
        keys_saved = await db.fetchval("SELECT count(*) FROM idempotency_keys WHERE tenant_id = $1",
                                       uuid.UUID(tenant_id))
        assert keys_saved == len(stored)

        # --- every acknowledged transfer is there once; refused ones are not; doubtful ones decide --
        committed: list[Op] = []
        in_doubt_committed = in_doubt_absent = 0
        lookups = asyncio.Semaphore(16)

        async def lookup(key: str) -> pb.LookupTransferResponse:
            async with lookups:
                return await stub.LookupTransfer(pb.LookupTransferRequest(tenant_id=tenant_id, idempotency_key=key,
                                                                          key_scope=SCOPE),
                                                 timeout=CALL_TIMEOUT_S)

        keys = list(ops)
        found = dict(zip(keys, await asyncio.gather(*(lookup(k) for k in keys)), strict=True))
        kind_names = {"pay": "payment", "refund": "refund", "top_up": "top_up"}
        for key, op in ops.items():
            answer, row = found[key], stored.get(key)
            assert answer.found == (row is not None), (op, answer)
            if op.outcome == "ok":
                assert row is not None, f"acknowledged transfer lost: {op}"
                assert row["transfer_id"] == op.transfer_id == answer.transfer.transfer_id, op
                assert row["amount_fen"] == op.booked_fen, op
                committed.append(op)
            elif op.outcome == "refused" and not op.timed_out:
                assert row is None, f"refused write was booked: {op} {dict(row)}"
            elif row is not None:
                op.transfer_id, op.booked_fen = row["transfer_id"], row["amount_fen"]
                committed.append(op)
                in_doubt_committed += 1
            else:
                in_doubt_absent += 1
            if row is not None:
                assert answer.transfer.transfer_id == row["transfer_id"], (op, dict(row))
                assert row["kind"] == kind_names[op.kind], (op, dict(row))
                if op.amount_fen:
                    assert row["amount_fen"] == op.amount_fen, (op, dict(row))

        # --- every write left in doubt was retried to a definite answer, booked exactly once ------
        doubted = [op for op in ops.values() if op.doubted]
        assert len(doubted) == stats.in_doubt_ops
        undecided = [op for op in doubted if op.outcome == "unknown"]
        assert not undecided, f"writes still in doubt after the ledger came back: {undecided[:5]}"
        assert all(op.attempts > 1 for op in doubted), "a write in doubt was not retried"
        for op in doubted:
            row = stored.get(op.key)
            if op.outcome == "ok":
                # The retry answered the one transfer the key booked (a replay if the first attempt
                # had committed), and the key booked one transfer only (checked above for all keys).
                assert row is not None and row["n"] == 1 and row["transfer_id"] == op.transfer_id, op
                assert found[op.key].transfer.transfer_id == op.transfer_id, op
            elif not op.timed_out:
                assert row is None, f"a write in doubt, refused on retry, was booked: {op}"

        # --- the totals the clients expect, from what was booked ---------------------------------
        member_fen = [0] * MEMBERS
        merchant_fen = [0] * MERCHANTS
        bank_fen = 0
        touching: dict[str, set[str]] = defaultdict(set)
        for op in committed:
            if op.kind == "top_up":
                member_fen[op.member] += op.booked_fen
                bank_fen -= op.booked_fen
            elif op.kind == "pay":
                member_fen[op.member] -= op.booked_fen
                merchant_fen[op.merchant] += op.booked_fen
            else:
                member_fen[op.member] += op.booked_fen
                merchant_fen[op.merchant] -= op.booked_fen
            touching[cash[op.member]].add(op.transfer_id)
            if op.kind == "top_up":
                touching[bank].add(op.transfer_id)
            else:
                touching[merchants[op.merchant]].add(op.transfer_id)
        assert len(stored) == len(committed)

        got = await stub.GetBalances(pb.GetBalancesRequest(tenant_id=tenant_id, account_ids=[bank, *merchants, *cash]),
                                     timeout=CALL_TIMEOUT_S)
        posted = {a.balance.account_id: a.balance.posted_fen for a in got.accounts}
        assert [posted[a] for a in cash] == member_fen
        assert all(fen >= 0 for fen in member_fen)
        assert [posted[a] for a in merchants] == merchant_fen
        assert posted[bank] == bank_fen

        for account_id in [bank, *merchants, *cash]:
            ids = await history_ids(stub, tenant_id, account_id)
            repeated = [i for i, n in Counter(ids).items() if n > 1]
            assert not repeated, f"history of {account_id} repeats {repeated[:5]}"
            assert set(ids) == touching[account_id], account_id

        trial = await stub.TrialBalance(pb.TrialBalanceRequest(tenant_id=tenant_id), timeout=CALL_TIMEOUT_S)
        assert trial.balanced and trial.postings_sum_fen == 0 and trial.balances_sum_fen == 0, trial
        await check_books(db)

        print(f"bank test: {len(ops)} writes in {run_s:.1f}s by {WORKERS} workers "
              f"({', '.join(f'{k}/{o}={n}' for (k, o), n in sorted(by_kind.items()))}); "
              f"outcomes {dict(by_outcome)}; kills {stats.kills} (writes in flight at each: "
              f"{stats.in_flight_at_kills}), restarts took "
              f"{', '.join(f'{s:.1f}s' for s in stats.restart_s)}; writes in doubt {stats.in_doubt_ops}, "
              f"retried ops {stats.retried_ops} "
              f"(of which answered by a replay of a committed first attempt: {stats.replayed}), "
              f"in-doubt errors {dict(stats.in_doubt_errors)}; in doubt at the end: committed {in_doubt_committed}, "
              f"absent {in_doubt_absent}")
    finally:
        ledger.kill()
        await channel.close()
        if db is not None:
            await db.close()
