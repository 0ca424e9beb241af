"""pgbench on the bench's durable PostgreSQL: the baselines a payment is held against.

Both loads run in a database of their own on the durable server (``pgbench -i -s <clients>``, one
branch per client, made once a run and shared by the suites), with prepared statements as asyncpg
uses them, after a CHECKPOINT:

- **plain TPC-B**: pgbench's built-in ``tpcb-like`` script. Each transaction (three updates, a
  select, an insert) commits alone and waits for its own flush to disk.
- **batched TPC-B** (``batched_tpcb_script``): ``k`` TPC-B transactions' statements, each with
  fresh random values, between one BEGIN and one END, so ``k`` transactions share one commit and
  one flush, as the ledger's PayBatcher makes its payments share one. It counts ``k`` transactions
  per script run. One difference from the built-in script, so that ``k`` updates in one
  transaction do not deadlock on the few branch and teller rows: each client keeps to its own
  branch (``:client_id``; there is one per client) and that branch's tellers, where the built-in
  script picks both at random. Accounts stay random over all of them; the rare deadlock there is
  retried (``--max-tries``), and a transaction that failed for good stops the bench.

A run reports TPC-B transactions per second, the commits PostgreSQL counted on the pgbench
database per transaction (``pg_stat_database.xact_commit``, read once pgbench's backends are gone
and have published their counts), and the CPU seconds of the whole server (bench.harness
``postgres_cpu_s``) and of the pgbench process itself (its own rusage, from ``wait4``).
"""
from __future__ import annotations

import asyncio
import os
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.harness import database_commits, postgres_cpu_s, require_durable
from devstack.servers import POSTGRES_BIN_PATH, Postgres

PGBENCH_DATABASE = "pgbench"
INIT_TIMEOUT_S = 300.0
# Beyond the run's own length: connecting, and the last transactions finishing.
RUN_SLACK_S = 60.0
# A batched transaction that deadlocks on two account rows is tried again, up to this many times.
MAX_TRIES = 20
# The ledger's PayBatcher books at most 64 payments a transaction (services.ledger settings allow
# up to 1000): the batched baseline is held to the same bounds.
MAX_TRANSACTIONS_PER_COMMIT = 1000
# Waiting for pgbench's backends to exit (and so publish their statistics).
BACKENDS_GONE_TIMEOUT_S = 10.0
BACKENDS_POLL_S = 0.05
TPS_LINE = re.compile(r"^tps = ([0-9.]+)", re.MULTILINE)
PROCESSED_LINE = re.compile(r"^number of transactions actually processed: (\d+)", re.MULTILINE)
FAILED_LINE = re.compile(r"^number of failed transactions: (\d+)", re.MULTILINE)

# One TPC-B transaction's statements, as pgbench's built-in tpcb-like script has them, with the
# branch fixed per client (see the module's docstring).
_TPCB_BODY = """\\set aid random(1, 100000 * :scale)
\\set tid 10 * (:bid - 1) + random(1, 10)
\\set delta random(-5000, 5000)
UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
UPDATE pgbench_tellers SET tbalance = tbalance + :delta WHERE tid = :tid;
UPDATE pgbench_branches SET bbalance = bbalance + :delta WHERE bid = :bid;
INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (:tid, :bid, :aid, :delta, CURRENT_TIMESTAMP);
"""


def batched_tpcb_script(transactions_per_commit: int) -> str:
    """A pgbench script committing ``transactions_per_commit`` TPC-B transactions at once, each
    with values drawn afresh, all on the client's own branch."""
    if not 1 <= transactions_per_commit <= MAX_TRANSACTIONS_PER_COMMIT:
        raise ValueError(f"transactions_per_commit must be in [1, {MAX_TRANSACTIONS_PER_COMMIT}], "
                         f"got {transactions_per_commit}")
    return ("\\set bid :client_id % :scale + 1\nBEGIN;\n" + _TPCB_BODY * transactions_per_commit + "END;\n")


def transactions_per_commit_of(payments: int, commits: int) -> int:
    """The whole number of transactions per commit a batched baseline should use to match
    ``payments`` booked in ``commits`` transactions (at least one)."""
    if payments <= 0 or commits <= 0:
        raise ValueError(f"need payments and commits, got {payments} payments in {commits} commits")
    return max(1, min(MAX_TRANSACTIONS_PER_COMMIT, round(payments / commits)))


@dataclass(frozen=True)
class PgbenchRun:
    """One measured pgbench run. ``transactions`` counts TPC-B transactions (script runs times
    ``transactions_per_commit``)."""

    transactions: int
    transactions_per_commit: int
    tps: float
    elapsed_s: float
    commits: int
    postgres_cpu_s: float
    client_cpu_s: float

    @property
    def commits_per_transaction(self) -> float:
        return self.commits / self.transactions if self.transactions else 0.0

    @property
    def cpu_ms_per_transaction(self) -> float:
        """PostgreSQL's and pgbench's CPU per TPC-B transaction: all the processes doing the work."""
        return (self.postgres_cpu_s + self.client_cpu_s) * 1000 / self.transactions if self.transactions else 0.0


def parse_output(out: str, *, transactions_per_commit: int) -> tuple[int, float]:
    """(TPC-B transactions, TPC-B transactions/s) from pgbench's summary; a run with transactions
    that failed for good is refused."""
    processed, tps = PROCESSED_LINE.search(out), TPS_LINE.search(out)
    if processed is None or tps is None:
        raise RuntimeError(f"no transaction count or tps in pgbench's output:\n{out}")
    failed = FAILED_LINE.search(out)
    if failed is not None and int(failed.group(1)):
        raise RuntimeError(f"pgbench had {failed.group(1)} failed transactions:\n{out}")
    return int(processed.group(1)) * transactions_per_commit, float(tps.group(1)) * transactions_per_commit


def _argv(postgres: Postgres, *args: str) -> list[str]:
    return [str(POSTGRES_BIN_PATH / "pgbench"), "-h", postgres.host, "-p", str(postgres.port), "-U", "postgres",
            *args, PGBENCH_DATABASE]


def _env(postgres: Postgres) -> dict[str, str]:
    return {**os.environ, "PGPASSWORD": postgres.password or ""}


def _pgbench(postgres: Postgres, *args: str, timeout_s: float) -> str:
    argv = _argv(postgres, *args)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, check=False, env=_env(postgres))
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return done.stdout


def _pgbench_with_rusage(postgres: Postgres, *args: str, timeout_s: float) -> tuple[str, float]:
    """pgbench's output and the CPU seconds of that process alone (``wait4``'s rusage, so no
    other child of the bench reaped meanwhile is counted)."""
    argv = _argv(postgres, *args)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        process = subprocess.Popen(argv, stdout=out, stderr=err, env=_env(postgres))
        deadline = time.monotonic() + timeout_s
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                process.kill()
                os.wait4(process.pid, 0)
                raise RuntimeError(f"{' '.join(argv)} ran past {timeout_s:.0f}s")
            time.sleep(0.05)
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        text = out.read().decode(errors="replace")
        if process.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({process.returncode}):\n"
                               f"{err.read().decode(errors='replace')[-2000:]}")
    return text, usage.ru_utime + usage.ru_stime


def run_argv(*, clients: int, duration_s: float, scale: int, script: Path | None = None) -> list[str]:
    """Prepared statements, as the ledger's asyncpg uses; a whole number of seconds, at least one.
    The built-in TPC-B, or ``script`` (then the scale is given, as pgbench reads it only from the
    tables for its built-in scripts, and deadlocks are retried)."""
    argv = ["-c", str(clients), "-j", str(clients), "-T", str(max(1, round(duration_s))), "-M", "prepared", "-n"]
    if script is not None:
        argv += ["-f", str(script), "-s", str(scale), f"--max-tries={MAX_TRIES}"]
    return argv


# The durable servers whose pgbench database is made, and at what scale.
_prepared: list[tuple[Postgres, int]] = []


async def prepare(postgres: Postgres, *, clients: int) -> int:
    """The pgbench database on ``postgres``, made once (``-s`` one branch per client, at least
    ``clients``); answers its scale. A baseline for money is taken on a durable server only
    (``NotDurable`` otherwise), as the money it is held against is."""
    require_durable(postgres)
    for server, scale in _prepared:
        if server is postgres and scale >= clients:
            return scale
    scale = max(1, clients)
    started = time.perf_counter()
    if not postgres._psql(f"SELECT 1 FROM pg_database WHERE datname = '{PGBENCH_DATABASE}'"):
        postgres.create_database(PGBENCH_DATABASE)
    await asyncio.to_thread(_pgbench, postgres, "-i", "-s", str(scale), "-I", "dtGvp", "-q",
                            timeout_s=INIT_TIMEOUT_S)
    print(f"  pgbench -i -s {scale} in {time.perf_counter() - started:.1f}s", flush=True)
    _prepared[:] = [(server, s) for server, s in _prepared if server is not postgres]
    _prepared.append((postgres, scale))
    return scale


async def _backends_gone(postgres: Postgres) -> None:
    """pgbench's backends have exited, so their commit counts are published."""
    deadline = time.monotonic() + BACKENDS_GONE_TIMEOUT_S
    query = f"SELECT count(*) FROM pg_stat_activity WHERE datname = '{PGBENCH_DATABASE}' AND pid <> pg_backend_pid()"
    while time.monotonic() < deadline:
        if await asyncio.to_thread(postgres._psql, query) == "0":
            return
        await asyncio.sleep(BACKENDS_POLL_S)
    raise RuntimeError(f"pgbench's backends were still there {BACKENDS_GONE_TIMEOUT_S:.0f}s after it ended")


async def warm_up(postgres: Postgres, *, clients: int, duration_s: float, scale: int) -> None:
    await asyncio.to_thread(_pgbench, postgres, *run_argv(clients=clients, duration_s=duration_s, scale=scale),
                            timeout_s=duration_s + RUN_SLACK_S)


async def run(postgres: Postgres, *, clients: int, duration_s: float, scale: int, transactions_per_commit: int = 1,
              checkpoint: bool = True) -> PgbenchRun:
    """One measured run: plain TPC-B (``transactions_per_commit`` 1) or batched, after a
    CHECKPOINT so that it starts with as many full-page writes to make as the side it is held
    against."""
    with tempfile.TemporaryDirectory(prefix="onecard-pgbench-") as folder:
        script = None
        if transactions_per_commit > 1:
            script = Path(folder) / "batched_tpcb.sql"
            script.write_text(batched_tpcb_script(transactions_per_commit))
        if checkpoint:
            await asyncio.to_thread(postgres._psql, "CHECKPOINT")
        await _backends_gone(postgres)
        commits_before = await asyncio.to_thread(database_commits, postgres, PGBENCH_DATABASE)
        postgres_before = postgres_cpu_s(postgres)
        started = time.perf_counter()
        out, client_cpu_s = await asyncio.to_thread(
            _pgbench_with_rusage, postgres, *run_argv(clients=clients, duration_s=duration_s, scale=scale,
                                                      script=script),
            timeout_s=duration_s + RUN_SLACK_S)
        elapsed_s = time.perf_counter() - started
        postgres_spent_s = postgres_cpu_s(postgres) - postgres_before
    await _backends_gone(postgres)
    commits = await asyncio.to_thread(database_commits, postgres, PGBENCH_DATABASE) - commits_before
    transactions, tps = parse_output(out, transactions_per_commit=transactions_per_commit)
    return PgbenchRun(transactions=transactions, transactions_per_commit=transactions_per_commit, tps=tps,
                      elapsed_s=elapsed_s, commits=commits, postgres_cpu_s=postgres_spent_s,
                      client_cpu_s=client_cpu_s)
