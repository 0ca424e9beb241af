"""The whole mesh the device hub talks to, on the test's own database (one schema each) and NATS,
reached over real gRPC: identity, codegen, ledger, policy and devicehub itself.

Fixtures: ``identity``, ``codegen``, ``ledger``, ``policy`` (RunningService with ``.stub``),
``devicehub`` (``.stub`` is a DeviceAdminServiceStub), ``device_stub`` (a DeviceServiceStub on the
devicehub channel), ``start_devicehub(**overrides)`` for a hub with other settings, and
``tenant_id`` (a tenant made in identity).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import asyncpg
import pytest

from onecard.codegen.v1 import codegen_pb2_grpc
from onecard.devicehub.v1 import devicehub_pb2_grpc
from onecard.ledger.v1 import ledger_pb2_grpc
from onecard.policy.v1 import policy_pb2_grpc
from services.codegen.app import build_app as build_codegen
from services.devicehub.app import DevicehubSettings
from services.devicehub.app import build_app as build_devicehub
from services.ledger.app import build_app as build_ledger
from services.policy.app import build_app as build_policy
from tests.codegen.conftest import codegen_settings
from tests.conftest import Launch, RunningService
from tests.mesh import service_values
from tests.devicehub.support import make_tenant
from tests.devicehub.tx_support import CAMPUS_CLOCK, CampusClock
from tests.ledger.conftest import ledger_settings
from tests.policy_service.conftest import policy_settings


def devicehub_settings(*, database_url: str, nats_url: str, identity_target: str, codegen_target: str,
                       policy_target: str, ledger_target: str, **overrides: Any) -> DevicehubSettings:
    values: dict[str, Any] = {
        "nats_url": nats_url,
        **service_values("devicehub", database_url),
        "identity_target": identity_target,
        "codegen_target": codegen_target,
        "policy_target": policy_target,
        "ledger_target": ledger_target,
        "health_interval_s": 0.2,
        "heartbeat_check_interval_s": 0.2,
        "handshake_timeout_s": 5.0,
        "sync_debounce_s": 0.02,
    }
    values.update(overrides)
    return DevicehubSettings(**values)


@pytest.fixture
async def codegen(launch: Launch, identity: RunningService, database_url: str, nats_url: str) -> RunningService:
    settings = codegen_settings(database_url=database_url, nats_url=nats_url, identity_target=identity.target)
    return await launch(build_codegen(settings), stub_cls=codegen_pb2_grpc.CodegenServiceStub)


@pytest.fixture
async def ledger(launch: Launch, database_url: str, nats_url: str) -> RunningService:
    app = build_ledger(ledger_settings(database_url=database_url, nats_url=nats_url))
    return await launch(app, stub_cls=ledger_pb2_grpc.LedgerServiceStub)


@pytest.fixture
async def policy(launch: Launch, database_url: str, nats_url: str, ledger: RunningService) -> RunningService:
    app = build_policy(policy_settings(database_url=database_url, nats_url=nats_url, ledger_target=ledger.target))
    return await launch(app, stub_cls=policy_pb2_grpc.PolicyServiceStub)


StartDevicehub = Callable[..., Awaitable[RunningService]]


@pytest.fixture
async def start_devicehub(launch: Launch, database_url: str, nats_url: str, identity: RunningService,
                          codegen: RunningService, ledger: RunningService, policy: RunningService) -> StartDevicehub:
    """Starts devicehub apps (settings overridable) beside the test's mesh; stops them after."""

    async def start(**overrides: Any) -> RunningService:
        # The mesh's targets unless overridden (e.g. policy reached through a faulty link).
        values: dict[str, Any] = {"identity_target": identity.target, "codegen_target": codegen.target,
                                  "policy_target": policy.target, "ledger_target": ledger.target, **overrides}
        settings = devicehub_settings(database_url=database_url, nats_url=nats_url, **values)
        return await launch(build_devicehub(settings, now=CAMPUS_CLOCK.now),
                            stub_cls=devicehub_pb2_grpc.DeviceAdminServiceStub)

    return start


@pytest.fixture(autouse=True)
def campus_clock() -> Iterator[CampusClock]:
    """The hub's clock runs on real time unless the test sets the hour (tx_support.CampusClock)."""
    CAMPUS_CLOCK.reset()
    yield CAMPUS_CLOCK
    CAMPUS_CLOCK.reset()


@pytest.fixture
async def devicehub(start_devicehub: StartDevicehub) -> RunningService:
    """devicehub with its DeviceAdminService stub at ``.stub``."""
    return await start_devicehub()


@pytest.fixture
def device_stub(devicehub: RunningService) -> devicehub_pb2_grpc.DeviceServiceStub:
    return devicehub_pb2_grpc.DeviceServiceStub(devicehub.device_channel)


@pytest.fixture
async def tenant_id(identity: RunningService) -> str:
    return await make_tenant(identity.stub)


@pytest.fixture
async def devicehub_db(devicehub: RunningService, database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A plain connection to the devicehub schema, for checks the API cannot make."""
    conn = await asyncpg.connect(database_url, server_settings={"search_path": "devicehub"})
    yield conn
    await conn.close()
