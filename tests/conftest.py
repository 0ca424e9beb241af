"""The test session's real infrastructure: one PostgreSQL server for the session (a fresh
database per test) and a fresh nats-server with JetStream per test, both from the same embedded
packages that `make run` uses.

`make test` spreads the suite over pytest-xdist workers, one process each: a worker's session is its
own, so each has its own PostgreSQL (its data under the worker's temp dir), its own test PKI
(tests.mesh) and its own slice of ports (devstack.servers.free_port). A test marked ``alone`` (it
measures how long something takes) runs while no other worker runs a test."""
from __future__ import annotations

import itertools
import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest

# Tests start service processes while their own gRPC channels are open; each child execs at once,
# and gRPC's fork handlers can hang a fork for good (devstack/__main__.py says more). Before grpc
# is imported anywhere in the session.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

from devstack.servers import Nats, Postgres, start_on_free_port  # noqa: E402
from runtime.logs import configure_logging  # noqa: E402
from runtime.dbroles import bootstrap_statements  # noqa: E402
from runtime.pki import IdentityFiles  # noqa: E402
from tests.alone import alone_or_together  # noqa: F401, E402 - an autouse fixture for every test
from tests.mesh import nats_users, pki, service_roles, service_values, terminal_channel  # noqa: E402

configure_logging(service="tests", level=os.environ.get("ONECARD_TEST_LOG_LEVEL", "warning"))

_db_counter = itertools.count(1)


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Postgres]:
    """The session's PostgreSQL: every connection authenticates with a password."""
    data_dir, password = tmp_path_factory.mktemp("postgres"), secrets.token_urlsafe(24)
    server = start_on_free_port(lambda port: Postgres(data_dir, port, fsync=False, password=password))
    yield server
    server.stop()


@pytest.fixture
def database_url(postgres: Postgres) -> str:
    """A new database for this test, as the superuser's URL (for the checks a client cannot make):
    each service's role and schema are made in it as the bootstrap makes them, so a service under
    test connects as its own role (tests.mesh.service_values)."""
    name = f"t{os.getpid()}_{next(_db_counter)}"
    url = postgres.create_database(name)
    postgres.run_sql(bootstrap_statements(database=name, roles=service_roles()), database=name)
    return url


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[Nats]:
    """This test's nats-server: TLS with the session's CA, and every process's account."""
    tls, users = IdentityFiles(pki().tls_dir("nats")), nats_users()
    server = start_on_free_port(lambda port: Nats(tmp_path / "nats", port, tls=tls, users=users))
    yield server
    server.stop()


@pytest.fixture
def nats_url(nats_server: Nats) -> str:
    return nats_server.url


class RunningService:
    """A service started in this process on a real port, reached over real mutual-TLS gRPC
    channels (each method as a caller its allow-list names: tests.mesh.AllowedCallerChannel); its
    gRPC stub, when one was asked for, is at ``.stub``."""

    def __init__(self, app, channel, stub=None) -> None:  # noqa: ANN001
        self.app = app
        self.channel = channel
        self.stub = stub
        self.target = f"127.0.0.1:{app.port}"
        # A service with a terminal listener (the device hub): where terminals dial, the CA bundle
        # they check it against, and a channel as a terminal has one (server TLS, no certificate).
        self.device_target = f"127.0.0.1:{app.terminal_port}" if app.terminal_port else ""
        self.device_ca_pem = app.terminal_tls.ca_pem if app.terminal_tls else b""
        self.device_channel = terminal_channel(self.device_target, self.device_ca_pem) if self.device_target else None

    async def stop(self) -> None:
        await self.channel.close()
        if self.device_channel is not None:
            await self.device_channel.close()
        await self.app.stop()


async def start_service(app, *, stub_cls=None, ready_timeout_s: float = 30.0) -> RunningService:  # noqa: ANN001
    from tests.mesh import AllowedCallerChannel

    await app.start()
    try:
        await app.wait_ready(ready_timeout_s)
    except BaseException:
        await app.stop()
        raise
    channel = AllowedCallerChannel(f"127.0.0.1:{app.port}", server_name=app.name, authorizer=app.authorizer())
    return RunningService(app, channel, stub_cls(channel) if stub_cls else None)


Launch = Callable[..., Awaitable[RunningService]]


@pytest.fixture
async def launch(database_url: str, nats_url: str) -> AsyncIterator[Launch]:
    """``await launch(app, stub_cls=...)`` starts a service for this test; every service started
    so is stopped at the end of the test, newest first, before the test's NATS and database go
    (asking for them here orders the teardown so)."""
    running: list[RunningService] = []

    async def start(app, *, stub_cls=None) -> RunningService:  # noqa: ANN001
        service = await start_service(app, stub_cls=stub_cls)
        running.append(service)
        return service

    yield start
    for service in reversed(running):
        await service.stop()


@pytest.fixture
async def identity(launch: Launch, database_url: str, nats_url: str) -> RunningService:
    """The identity service on its own database and NATS, with its gRPC stub at ``.stub``."""
    from onecard.identity.v1 import identity_pb2_grpc
    from services.identity.app import IdentitySettings, build_app

    app = build_app(IdentitySettings(nats_url=nats_url, health_interval_s=0.2,
                                     **service_values("identity", database_url)))
    return await launch(app, stub_cls=identity_pb2_grpc.IdentityServiceStub)
