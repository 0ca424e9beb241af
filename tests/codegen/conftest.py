"""The codegen service next to a real identity (the ``identity`` fixture), sharing its database
server URL and NATS, so that member events really flow from identity to codegen."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import pytest

from onecard.codegen.v1 import codegen_pb2_grpc
from services.codegen.app import CodegenSettings, build_app
from tests.mesh import service_values
from tests.conftest import Launch, RunningService
from tests.identity.support import create_member, create_tenant

# A fixed test master key (32 bytes, hex); never one used anywhere else.
TEST_MASTER_KEY = "6f" * 32


def codegen_settings(*, database_url: str, nats_url: str, identity_target: str, **overrides: Any) -> CodegenSettings:
    values: dict[str, Any] = {
        "nats_url": nats_url,
        **service_values("codegen", database_url),
        "identity_target": identity_target,
        "codegen_master_key": TEST_MASTER_KEY,
        "health_interval_s": 0.2,
        # Short credentials are allowed, so rotation and retirement are seen within a test.
        "min_validity_s": 1,
        "retire_interval_s": 0.2,
    }
    values.update(overrides)
    return CodegenSettings(**values)


StartCodegen = Callable[..., Awaitable[RunningService]]


@pytest.fixture
async def start_codegen(launch: Launch, identity: RunningService, database_url: str, nats_url: str) -> StartCodegen:
    """Starts codegen apps (settings overridable) beside the test's identity; stops them after."""

    async def start(**overrides: Any) -> RunningService:
        settings = codegen_settings(database_url=database_url, nats_url=nats_url, identity_target=identity.target,
                                    **overrides)
        return await launch(build_app(settings), stub_cls=codegen_pb2_grpc.CodegenServiceStub)

    return start


@pytest.fixture
async def codegen(start_codegen: StartCodegen) -> RunningService:
    """codegen with its gRPC stub at ``.stub``; identity is the ``identity`` fixture."""
    return await start_codegen()


@pytest.fixture
async def tenant_id(identity: RunningService) -> str:
    return await create_tenant(identity.stub)


@pytest.fixture
async def member_id(identity: RunningService, tenant_id: str) -> str:
    return (await create_member(identity.stub, tenant_id, "S1001")).member_id


@pytest.fixture
async def codegen_db(codegen: RunningService, database_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(database_url, server_settings={"search_path": "codegen"})
    yield conn
    await conn.close()
