"""The local supervisor's restart rules: the back-off arithmetic, a dead child brought back with a
line per step, and a child that keeps failing to come back given up on (which stops the platform)."""
from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import pytest

from devstack.supervisor import (
    Backoff,
    ManagedProcess,
    ProcessFailed,
    describe_exit,
    restart_until_healthy,
)

SLEEPER = "import time; time.sleep(60)"


def test_backoff_doubles_up_to_its_ceiling() -> None:
    backoff = Backoff(first_delay_s=0.5, max_delay_s=4.0, stable_after_s=60.0)
    delays = [backoff.after_death(healthy_for_s=1.0) for _ in range(6)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert backoff.restarts == 6


def test_backoff_starts_over_after_a_service_stayed_healthy_long_enough() -> None:
    backoff = Backoff(first_delay_s=0.5, max_delay_s=30.0, stable_after_s=60.0)
    assert [backoff.after_death(healthy_for_s=5.0) for _ in range(3)] == [0.5, 1.0, 2.0]
    assert backoff.after_death(healthy_for_s=59.9) == 4.0
    assert backoff.after_death(healthy_for_s=60.0) == 0.5
    assert backoff.after_death(healthy_for_s=1.0) == 1.0
    assert backoff.restarts == 6, "the restart count goes on; only the delay starts over"


def test_backoff_gives_up_after_too_many_failed_starts_in_a_row() -> None:
    backoff = Backoff(first_delay_s=0.5, max_delay_s=30.0, max_start_failures=3)
    assert backoff.after_death(healthy_for_s=1.0) == 0.5
    assert backoff.after_failed_start() == 1.0
    assert backoff.after_failed_start() == 2.0
    assert backoff.after_failed_start() is None
    assert backoff.start_failures == 3


def test_a_start_that_gets_healthy_clears_the_failures_in_a_row() -> None:
    backoff = Backoff(max_start_failures=3)
    backoff.after_failed_start()
    backoff.after_failed_start()
    backoff.after_healthy()
    assert backoff.after_failed_start() is not None


def test_exits_are_described_with_the_signal_name() -> None:
    assert describe_exit(-9) == "exit -9 (SIGKILL)"
    assert describe_exit(-15) == "exit -15 (SIGTERM)"
    assert describe_exit(3) == "exit 3"


def child(tmp_path: Path, code: str) -> ManagedProcess:
    return ManagedProcess(name="ledger", argv=[sys.executable, "-c", code], env={},
                          log_path=tmp_path / "ledger.log")


async def always(value: bool) -> bool:
    return value


async def test_a_killed_child_is_started_again_and_reported(tmp_path: Path) -> None:
    process = child(tmp_path, SLEEPER)
    process.start()
    first_pid = process.pid
    process.process.kill()  # type: ignore[union-attr]
    process.process.wait()  # type: ignore[union-attr]
    lines: list[tuple[str, str]] = []
    try:
        became_healthy = await restart_until_healthy(
            process, probe=lambda: always(True), backoff=Backoff(first_delay_s=0.01), healthy_since=time.monotonic(),
            ready_timeout_s=10.0, grace_s=5.0, report=lambda state, detail: lines.append((state, detail)))
        assert process.returncode() is None and process.pid != first_pid
        assert became_healthy <= time.monotonic()
        [(died, died_detail), (serving, serving_detail)] = lines
        assert died == "died" and died_detail.startswith("exit -9 (SIGKILL) after ")
        assert "restarting in 0.0s (restart 1)" in died_detail
        assert serving == "serving" and serving_detail.endswith("restarted")
        assert (tmp_path / "ledger.log.1").exists(), "the log of the run that died is kept"
    finally:
        await process.stop(grace_s=5.0)


async def test_a_child_that_keeps_failing_at_start_is_given_up_on_naming_it_and_its_log(tmp_path: Path) -> None:
    process = child(tmp_path, "import sys; print('cannot open the ledger schema'); sys.exit(3)")
    process.start()
    process.process.wait()  # type: ignore[union-attr]
    lines: list[tuple[str, str]] = []
    with pytest.raises(ProcessFailed) as failed:
        await restart_until_healthy(
            process, probe=lambda: always(False), backoff=Backoff(first_delay_s=0.01, max_start_failures=5),
            healthy_since=time.monotonic(), ready_timeout_s=10.0, grace_s=5.0,
            report=lambda state, detail: lines.append((state, detail)))
    message = str(failed.value)
    assert failed.value.name == "ledger" and failed.value.log_path == tmp_path / "ledger.log"
    assert message.startswith("ledger failed 5 times in a row to start again (exited with code 3); giving up")
    assert str(tmp_path / "ledger.log") in message and "cannot open the ledger schema" in message
    assert [state for state, _ in lines] == ["died", "failed", "failed", "failed", "failed"]
    assert process.returncode() == 3


async def test_a_child_that_never_gets_healthy_is_stopped_before_the_next_try(tmp_path: Path) -> None:
    process = child(tmp_path, SLEEPER)
    process.start()
    process.process.kill()  # type: ignore[union-attr]
    process.process.wait()  # type: ignore[union-attr]
    started: list[int | None] = []

    async def never_healthy() -> bool:
        if process.pid not in started:
            started.append(process.pid)
        return False

    with pytest.raises(ProcessFailed, match="was not healthy within 0s"):
        await restart_until_healthy(
            process, probe=never_healthy, backoff=Backoff(first_delay_s=0.01, max_start_failures=2),
            healthy_since=time.monotonic(), ready_timeout_s=0.0, grace_s=5.0, report=lambda state, detail: None)
    assert len(started) == 2
    assert process.returncode() is not None, "the last try was stopped, not left running"


async def test_cancelling_a_restart_during_its_back_off_starts_nothing(tmp_path: Path) -> None:
    process = child(tmp_path, SLEEPER)
    process.start()
    process.process.kill()  # type: ignore[union-attr]
    process.process.wait()  # type: ignore[union-attr]
    dead = process.process
    restart = asyncio.create_task(restart_until_healthy(
        process, probe=lambda: always(True), backoff=Backoff(first_delay_s=30.0), healthy_since=time.monotonic(),
        ready_timeout_s=10.0, grace_s=5.0, report=lambda state, detail: None))
    await asyncio.sleep(0.1)
    restart.cancel()
    with pytest.raises(asyncio.CancelledError):
        await restart
    assert process.process is dead


async def test_a_failing_precheck_stops_the_restart_before_anything_starts(tmp_path: Path) -> None:
    process = child(tmp_path, SLEEPER)
    process.start()
    process.process.kill()  # type: ignore[union-attr]
    process.process.wait()  # type: ignore[union-attr]
    dead = process.process

    def postgres_is_gone() -> None:
        raise ProcessFailed(name="PostgreSQL", what="exited with code -9", log_path=tmp_path / "pg.log", tail="")

    with pytest.raises(ProcessFailed, match="^PostgreSQL exited"):
        await restart_until_healthy(
            process, probe=lambda: always(True), backoff=Backoff(first_delay_s=0.01), healthy_since=time.monotonic(),
            ready_timeout_s=10.0, grace_s=5.0, report=lambda state, detail: None, precheck=postgres_is_gone)
    assert process.process is dead
