"""A test marked ``alone`` runs while no other xdist worker runs a test: a small suite run over two
workers, where the ``alone`` test looks for a test running beside it (each other test leaves a file
while it runs, and lingers until the ``alone`` test is done, so any overlap would be seen)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PROBE_SUITE = '''
import os
import time
from pathlib import Path

import pytest

PROBE = Path(os.environ["ALONE_PROBE_DIR"])
PATIENCE_S = 2.0


def wait_for(found) -> None:
    deadline = time.monotonic() + PATIENCE_S
    while time.monotonic() < deadline and not found():
        time.sleep(0.02)


@pytest.mark.parametrize("n", range(3))
def test_together(n: int) -> None:
    running = PROBE / f"together-{n}.running"
    running.touch()
    try:
        wait_for(lambda: (PROBE / "alone.done").exists())
    finally:
        running.unlink()


@pytest.mark.alone
def test_alone() -> None:
    wait_for(lambda: any(PROBE.glob("*.running")))
    beside = sorted(p.name for p in PROBE.glob("*.running"))
    (PROBE / "alone.done").touch()
    assert not beside, f"ran beside {beside}"
'''


def test_an_alone_test_runs_while_no_other_worker_runs_one(tmp_path: Path) -> None:
    probe = tmp_path / "probe"
    probe.mkdir()
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "test_probe.py").write_text(PROBE_SUITE)
    (suite / "pytest.ini").write_text("[pytest]\nmarkers =\n    alone: runs with no other test beside it\n")
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTEST_")}
    env["ALONE_PROBE_DIR"] = str(probe)
    completed = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.alone", "--strict-markers",
         "-n", "2", "--dist", "load", f"--basetemp={tmp_path / 'temp'}", "test_probe.py"],
        cwd=suite, env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "4 passed" in completed.stdout, completed.stdout
