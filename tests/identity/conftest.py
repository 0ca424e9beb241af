"""Fixtures for the identity tests: a tenant to work in, direct SQL access for checks the API
cannot make (what is stored, what is not), and identity apps with non-default settings."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
import pytest

from services.identity.app import IdentitySettings, build_app
from tests.conftest import Launch, RunningService
from tests.identity.support import create_tenant, identity_stub
from tests.mesh import service_values


@pytest.fixture
async def tenant_id(identity: RunningService) -> str:
    return await create_tenant(identity.stub)


@pytest.fixture
async def db(identity: RunningService, database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A plain connection to the identity schema, opened after the service migrated it."""
    conn = await asyncpg.connect(database_url, server_settings={"search_path": "identity"})
    yield conn
    await conn.close()


StartIdentity = Callable[..., Awaitable[RunningService]]


@pytest.fixture
async def start_identity(launch: Launch, database_url: str, nats_url: str) -> StartIdentity:
    """Starts identity apps with settings overridden; each is stopped at the end of the test."""

    async def start(**overrides: object) -> RunningService:
        settings = IdentitySettings(nats_url=nats_url, health_interval_s=0.2,
                                    **{**service_values("identity", database_url), **overrides})
        service = await launch(build_app(settings))
        service.stub = identity_stub(service.channel)
        return service

    return start
