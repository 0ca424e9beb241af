"""The policy service and the ledger it reads, each on the test's own database (one schema each)
and NATS, reached over real gRPC."""

from __future__ import annotations

from typing import Any

import pytest

from onecard.ledger.v1 import ledger_pb2_grpc
from onecard.policy.v1 import policy_pb2_grpc
from services.ledger.app import build_app as build_ledger
from services.policy.app import PolicySettings, build_app
from tests.mesh import service_values
from tests.conftest import Launch, RunningService
from tests.ledger.conftest import ledger_settings

TEST_MASTER_KEY = "ab" * 32


def policy_settings(*, database_url: str, nats_url: str, ledger_target: str, **overrides: Any) -> PolicySettings:
    values: dict[str, Any] = {
        "nats_url": nats_url,
        **service_values("policy", database_url),
        "health_interval_s": 0.2,
        "policy_master_key": TEST_MASTER_KEY,
        "ledger_target": ledger_target,
        # Generous: on a loaded two-core machine 100 concurrent payments may queue for seconds, and
        # no test here is about the ledger's deadline.
        "ledger_timeout_s": 30.0,
    }
    values.update(overrides)
    return PolicySettings(**values)


@pytest.fixture
async def ledger(launch: Launch, database_url: str, nats_url: str) -> RunningService:
    app = build_ledger(ledger_settings(database_url=database_url, nats_url=nats_url))
    return await launch(app, stub_cls=ledger_pb2_grpc.LedgerServiceStub)


@pytest.fixture
async def policy(launch: Launch, database_url: str, nats_url: str, ledger: RunningService) -> RunningService:
    """The policy service with its gRPC stub at ``.stub``, reading the ledger above."""
    app = build_app(policy_settings(database_url=database_url, nats_url=nats_url, ledger_target=ledger.target))
    return await launch(app, stub_cls=policy_pb2_grpc.PolicyServiceStub)
