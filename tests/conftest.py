"""The test session's real infrastructure: one PostgreSQL server for the session (a fresh
database per test) and a fresh nats-server with JetStream per test, both from the same embedded
packages that `make run` uses."""
from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from devstack.servers import Nats, Postgres, free_port
from runtime.logs import configure_logging

configure_logging(service="tests", level=os.environ.get("ONECARD_TEST_LOG_LEVEL", "warning"))

_db_counter = itertools.count(1)


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Postgres]:
    server = Postgres(tmp_path_factory.mktemp("postgres"), free_port(), fsync=False)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def database_url(postgres: Postgres) -> str:
    """A new, empty database for this test."""
    return postgres.create_database(f"t{os.getpid()}_{next(_db_counter)}")


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[Nats]:
    server = Nats(tmp_path / "nats", free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture
def nats_url(nats_server: Nats) -> str:
    return nats_server.url
