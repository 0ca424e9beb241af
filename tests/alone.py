"""Tests that must run with no other test at the same time (they measure how long something takes)
are marked ``alone``; under pytest-xdist the fixture here keeps every other worker's tests out
while one runs. Outside xdist tests run one at a time anyway and it does nothing.

A plugin module of its own (tests/conftest.py imports the fixture), so that its own test can load
it into a small suite run with ``-p tests.alone``."""
from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def alone_or_together(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Under xdist, a test marked ``alone`` holds the session's lock exclusively and every other
    test holds it shared, so an ``alone`` test runs while no other worker runs one. The gate in
    front of the lock keeps a stream of shared holders from starving an ``alone`` test: it closes
    the gate, waits for the running tests to finish, and opens it again when it is done."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        yield
        return
    # Each worker's temp root is a folder of the session's (gw0, gw1...): the parent is shared.
    root = tmp_path_factory.getbasetemp().parent
    alone = request.node.get_closest_marker("alone") is not None
    with open(root / "alone.gate", "a") as gate, open(root / "alone.lock", "a") as lock:
        fcntl.flock(gate, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        finally:
            if not alone:
                fcntl.flock(gate, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
            if alone:
                fcntl.flock(gate, fcntl.LOCK_UN)
