"""The bench cannot flatter: money is measured only on a durable server, the batched pgbench
baseline commits once per k transactions, and CPU per payment is summed over every process but
the load client's. Real PostgreSQL and real pgbench where they run; the arithmetic alone beside."""
from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import pgbench
from bench.harness import (
    GOALS,
    BenchContext,
    Goal,
    LoadSettings,
    NotDurable,
    cpu_ms_per_operation,
    durability_problem,
    format_goals,
    format_table,
    require_durable,
)


# --- CPU per payment --------------------------------------------------------------------------

def test_cpu_per_payment_sums_every_process_but_the_client_and_shows_each_share() -> None:
    cpu_s = {"ledger": 1.0, "policy": 0.5, "postgres": 2.0, "nats": 0.25, "client": 4.0}
    total_ms, per_process = cpu_ms_per_operation(cpu_s, 500, not_counted=("client",))
    assert total_ms == pytest.approx((1.0 + 0.5 + 2.0 + 0.25) * 1000 / 500)
    assert per_process == pytest.approx({"ledger": 2.0, "policy": 1.0, "postgres": 4.0, "nats": 0.5, "client": 8.0})


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A scratch folder with a short path: PostgreSQL puts its Unix socket in its data folder, and
    a socket path longer than 107 bytes (pytest's tmp_path under xdist can be) stops it."""
    folder = Path(tempfile.mkdtemp(prefix="ocb-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_cpu_per_payment_refuses_no_payments_and_an_unknown_process_left_out() -> None:
    with pytest.raises(ValueError, match="no operations"):
        cpu_ms_per_operation({"ledger": 1.0}, 0)
    with pytest.raises(ValueError, match="not measured"):
        cpu_ms_per_operation({"ledger": 1.0}, 10, not_counted=("client",))


# --- durability -------------------------------------------------------------------------------

def test_a_server_without_fsync_or_synchronous_commit_is_not_durable() -> None:
    assert durability_problem({"fsync": "on", "synchronous_commit": "on"}) is None
    assert "fsync=off" in durability_problem({"fsync": "off", "synchronous_commit": "on"})
    assert "synchronous_commit=off" in durability_problem({"fsync": "on", "synchronous_commit": "off"})
    assert "synchronous_commit=?" in durability_problem({"fsync": "on"})


async def test_the_harness_refuses_to_start_the_ledger_on_the_fsync_off_server(short_dir: Path) -> None:
    context = BenchContext(load=LoadSettings(duration_s=1), work_dir=short_dir)
    try:
        with pytest.raises(NotDurable, match="fsync=off"):
            await context.start_grpc_service(name="ledger", module="services.ledger")
        with pytest.raises(NotDurable):
            await context.start_grpc_service(name="ledger", module="services.ledger",
                                             database_url=context.fresh_database("money"))
        assert context.children == 0, "nothing was started on a server that does not flush its commits"
    finally:
        await context.close()


async def test_the_sessions_fsync_off_server_is_refused_and_no_pgbench_baseline_is_taken_on_it(
        postgres) -> None:  # noqa: ANN001
    with pytest.raises(NotDurable, match="fsync=off"):
        require_durable(postgres)
    with pytest.raises(NotDurable):
        await pgbench.prepare(postgres, clients=1)


# --- the batched pgbench baseline ---------------------------------------------------------------

def test_the_batched_script_runs_k_tpcb_transactions_in_one_commit_on_the_clients_branch() -> None:
    script = pgbench.batched_tpcb_script(3)
    lines = script.splitlines()
    assert lines[0] == "\\set bid :client_id % :scale + 1"
    assert lines.count("BEGIN;") == 1 and lines[1] == "BEGIN;" and lines[-1] == "END;"
    for statement in ("UPDATE pgbench_accounts", "SELECT abalance", "UPDATE pgbench_tellers",
                      "UPDATE pgbench_branches", "INSERT INTO pgbench_history"):
        assert sum(line.startswith(statement) for line in lines) == 3, statement
    # Fresh random values for each of the three.
    assert sum(line.startswith("\\set aid random(") for line in lines) == 3
    assert sum(line.startswith("\\set delta random(") for line in lines) == 3
    with pytest.raises(ValueError):
        pgbench.batched_tpcb_script(0)


def test_transactions_per_commit_follow_what_the_ledger_achieved() -> None:
    assert pgbench.transactions_per_commit_of(6400, 100) == 64
    assert pgbench.transactions_per_commit_of(1000, 400) == 2
    assert pgbench.transactions_per_commit_of(100, 300) == 1
    with pytest.raises(ValueError):
        pgbench.transactions_per_commit_of(100, 0)


def test_pgbench_output_counts_tpcb_transactions_and_refuses_failures() -> None:
    out = ("number of transactions actually processed: 250\nnumber of failed transactions: 0 (0.000%)\n"
           "tps = 125.5 (without initial connection time)\n")
    assert pgbench.parse_output(out, transactions_per_commit=4) == (1000, 502.0)
    with pytest.raises(RuntimeError, match="failed"):
        pgbench.parse_output(out.replace("failed transactions: 0", "failed transactions: 3"),
                             transactions_per_commit=4)


@pytest.mark.slow
async def test_batched_pgbench_on_a_durable_server_commits_once_per_k_transactions(short_dir: Path) -> None:
    context = BenchContext(load=LoadSettings(duration_s=1), work_dir=short_dir)
    try:
        postgres = context.durable_postgres()
        assert "fsync=on" in require_durable(postgres) and "synchronous_commit=on" in require_durable(postgres)
        clients = 2
        scale = await pgbench.prepare(postgres, clients=clients)
        batched = await pgbench.run(postgres, clients=clients, duration_s=1, scale=scale, transactions_per_commit=4)
        plain = await pgbench.run(postgres, clients=clients, duration_s=1, scale=scale)
    finally:
        await context.close()
    assert batched.transactions > 0 and batched.transactions % 4 == 0
    # One commit per script run of four transactions (each connection adds a few of its own:
    # its setup, and the script it was running when time ran out).
    assert batched.transactions // 4 <= batched.commits <= batched.transactions // 4 + 4 * clients
    assert plain.transactions <= plain.commits <= plain.transactions + 4 * clients
    assert batched.postgres_cpu_s > 0 and batched.client_cpu_s > 0
    assert batched.cpu_ms_per_transaction == pytest.approx(
        (batched.postgres_cpu_s + batched.client_cpu_s) * 1000 / batched.transactions)


# --- what make bench prints ---------------------------------------------------------------------

def test_the_goals_block_says_met_not_met_or_not_measured() -> None:
    goals = (Goal("a.x_ratio", ">=", 0.7, "up"), Goal("b.y_ratio", "<=", 4.0, "down"), Goal("c.z_ratio", ">=", 1, "?"))
    block = format_goals({"a.x_ratio": 0.69, "b.y_ratio": 3.5}, goals).splitlines()
    assert block[0] == "goals (issue 16)"
    assert "NOT MET" in block[1] and " met " in block[2] and "not measured" in block[3]
    names = {goal.figure for goal in GOALS}
    assert {"devicehub.online_pay_vs_ledger_pay_ratio", "ledger.pay_vs_pgbench_ratio",
            "devicehub.online_pay_cpu_vs_pgbench_tpcb_ratio", "policy.evaluate_vs_echo_ratio",
            "codes.verify_warm_ratio", "codes.verify_cold_ratio"} == names


def test_the_table_puts_the_cost_per_payment_first_in_a_group_of_its_own() -> None:
    table = format_table({"ledger.pay_per_s": 500.0, "ledger.pay_cpu_ms_per_payment": 3.2,
                          "devicehub.online_pay_cpu_vs_pgbench_tpcb_ratio": 6.0}).splitlines()
    assert table[0].startswith("cost: CPU ms per payment")
    cost_rows = table[:table.index("everything else")]
    assert any(r.startswith("ledger.pay_cpu_ms_per_payment") for r in cost_rows)
    assert any(r.startswith("devicehub.online_pay_cpu_vs_pgbench_tpcb_ratio") for r in cost_rows)
    assert not any(r.startswith("ledger.pay_per_s") for r in cost_rows)
