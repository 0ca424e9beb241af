"""The ledger service on the test's own database and NATS, reached over real gRPC, and a direct
connection to its schema for the checks a client cannot make (postings against balances)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from onecard.ledger.v1 import ledger_pb2_grpc
from services.ledger.app import LedgerSettings, build_app
from tests.conftest import Launch, RunningService
from tests.mesh import service_values


def ledger_settings(*, database_url: str, nats_url: str, **overrides: Any) -> LedgerSettings:
    values: dict[str, Any] = {
        "nats_url": nats_url,
        **service_values("ledger", database_url),
        "health_interval_s": 0.2,
        # Holds expire within a test's patience.
        "hold_expiry_interval_s": 0.1,
        "program_interval_s": 0.2,
    }
    values.update(overrides)
    return LedgerSettings(**values)


@pytest.fixture
async def ledger(launch: Launch, database_url: str, nats_url: str) -> RunningService:
    """The ledger service with its gRPC stub at ``.stub``."""
    app = build_app(ledger_settings(database_url=database_url, nats_url=nats_url))
    return await launch(app, stub_cls=ledger_pb2_grpc.LedgerServiceStub)


@pytest.fixture
async def ledger_db(ledger: RunningService, database_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(database_url, server_settings={"search_path": "ledger"})
    yield conn
    await conn.close()
