"""The webhooks service beside a real identity and ledger, on the test's database and NATS, with
a clock and a resolver the test controls, and a real HTTP receiver on 127.0.0.1."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from onecard.ledger.v1 import ledger_pb2_grpc
from onecard.webhooks.v1 import webhooks_pb2_grpc
from services.ledger.app import build_app as build_ledger
from services.webhooks.app import build_app
from services.webhooks.settings import WebhooksSettings
from tests.conftest import Launch, RunningService
from tests.ledger.conftest import ledger_settings
from tests.mesh import service_values
from tests.webhooks.support import MovableClock, Names, Receiver

TEST_MASTER_KEY = "cd" * 32
RECEIVER_HOST = "receiver.test"


def webhooks_settings(*, database_url: str, nats_url: str, ledger_target: str, **overrides: Any) -> WebhooksSettings:
    values: dict[str, Any] = {
        "nats_url": nats_url,
        **service_values("webhooks", database_url),
        "health_interval_s": 0.2,
        "webhooks_master_key": TEST_MASTER_KEY,
        "ledger_target": ledger_target,
        "ledger_timeout_s": 30.0,
        # The receiver is plain http on 127.0.0.1, as on a development stack.
        "webhooks_allow_loopback_http": True,
        # Quick, so a test moves through many attempts in seconds of its clock.
        "webhooks_backoff_base_s": 1.0,
        "webhooks_backoff_cap_s": 2.0,
        "webhooks_connect_timeout_s": 1.0,
        "webhooks_read_timeout_s": 0.5,
        "webhooks_total_timeout_s": 2.0,
        "webhooks_poll_s": 0.05,
    }
    values.update(overrides)
    return WebhooksSettings(**values)


@pytest.fixture
def clock() -> MovableClock:
    return MovableClock()


@pytest.fixture
def names() -> Names:
    return Names({RECEIVER_HOST: ["127.0.0.1"], "localhost": ["127.0.0.1"]})


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    server = Receiver()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def ledger(launch: Launch, database_url: str, nats_url: str) -> RunningService:
    return await launch(build_ledger(ledger_settings(database_url=database_url, nats_url=nats_url)),
                        stub_cls=ledger_pb2_grpc.LedgerServiceStub)


@pytest.fixture
async def webhooks(launch: Launch, database_url: str, nats_url: str, identity: RunningService,
                   ledger: RunningService, clock: MovableClock, names: Names) -> RunningService:
    """The webhooks service with its stub at ``.stub`` (after identity and the ledger, whose
    streams it consumes)."""
    app = build_app(webhooks_settings(database_url=database_url, nats_url=nats_url, ledger_target=ledger.target),
                    clock=clock, resolver=names)
    return await launch(app, stub_cls=webhooks_pb2_grpc.WebhookServiceStub)
