"""The test session's mesh identity: its own CA, a certificate for every name the allow-list knows,
channels that present them, and every process's NATS account.

Each test process (each xdist worker) makes its CA once, in a scratch folder removed at exit.
A service under test gets the files of its own name (``service_values``); a test that calls a
service directly goes through ``AllowedCallerChannel``, which sends each method over a real
mutual-TLS channel presenting the certificate of a caller the method's allow-list names (the
gateway for a member route, policy for ``LedgerService.Pay``...), so the services' own tests run
through the same authentication and allow-list as production. The tests of the allow-list
itself (tests/trust) call as every other name too.

NATS: each test's nats-server speaks TLS and knows the accounts of services.nats_accounts (plus
the runtime tests' widgets service); a service under test signs in with its own nkey, and a test
that reads a stream does so as the operator (``connect_nats``).
"""
from __future__ import annotations

import atexit
import functools
import secrets
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import nats
from google.protobuf import descriptor_pool

from runtime.access import Authorizer, method_rules
from runtime.dbroles import ServiceRole, role_dsn, role_name
from runtime.nats_access import NatsAccess, connect_options, new_seed, public_key
from services.nats_accounts import NATS_ACCOUNTS
from runtime.grpc_client import open_channel
from runtime.mesh import MeshTLS
from runtime.pki import CertificateAuthority, IdentityFiles


class TestPKI:
    def __init__(self, root: Path):
        self.root = root
        self.ca = CertificateAuthority.create(common_name="onecard test CA")
        self._tls: dict[str, MeshTLS] = {}

    def tls_dir(self, name: str) -> Path:
        directory = self.root / name
        if not IdentityFiles(directory).cert.exists():
            self.ca.write_identity(directory, name)
        return directory

    def tls(self, name: str) -> MeshTLS:
        if name not in self._tls:
            self._tls[name] = MeshTLS.load(self.tls_dir(name))
        return self._tls[name]


@functools.cache
def pki() -> TestPKI:
    root = Path(tempfile.mkdtemp(prefix="onecard-test-pki-"))
    atexit.register(shutil.rmtree, root, True)
    return TestPKI(root)


@functools.cache
def nats_seed(name: str) -> str:
    return new_seed()


def nats_users() -> dict[str, tuple[str, NatsAccess]]:
    """Every account a test's nats-server knows: name -> (public nkey, access)."""
    from tests.runtime.support import NATS_ACCESS as WIDGETS

    accounts = {**NATS_ACCOUNTS, "widgets": WIDGETS}
    return {name: (public_key(nats_seed(name)), access) for name, access in accounts.items()}


# The schemas (and so the database roles) of every service a test may start.
SERVICE_SCHEMAS = ("identity", "codegen", "ledger", "policy", "devicehub", "webhooks", "widgets")


@functools.cache
def pg_password(name: str) -> str:
    return secrets.token_urlsafe(24)


def service_roles() -> list[ServiceRole]:
    return [ServiceRole(schema=name, password=pg_password(name)) for name in SERVICE_SCHEMAS]


def service_values(name: str, database_url: str | None = None) -> dict[str, Any]:
    """The settings every process named ``name`` needs in a test, beside its own: its TLS folder, its
    NATS nkey and, given the test's database (the superuser's URL), its own role's URL to it."""
    values: dict[str, Any] = {"tls_dir": pki().tls_dir(name), "nats_seed": nats_seed(name)}
    if database_url is not None:
        values["database_url"] = role_dsn(database_url, role=role_name(name), password=pg_password(name))
    return values


async def connect_nats(url: str, *, as_: str = "ops") -> nats.aio.client.Client:
    """A NATS connection signed in as ``as_`` (the operator by default: it reads streams, publishes
    nothing), over TLS with that name's certificate."""
    return await nats.connect(url, connect_timeout=5, max_reconnect_attempts=3,
                              **connect_options(name=as_, seed=nats_seed(as_), tls=pki().tls(as_)))


def channel_as(caller: str, target: str, *, server_name: str, options: Sequence[tuple[str, Any]] = ()
               ) -> grpc.aio.Channel:
    """A mutual-TLS channel to ``server_name`` at ``target`` presenting ``caller``'s certificate."""
    return open_channel(target, tls=pki().tls(caller), server_name=server_name, options=options)


def authorizer_for(*service_names: str) -> Authorizer:
    """The allow-list of the named gRPC services, as their server enforces it."""
    pool = descriptor_pool.Default()
    return Authorizer(method_rules(pool.FindServiceByName(name) for name in service_names))


def terminal_channel(target: str, ca_pem: bytes) -> grpc.aio.Channel:
    """A channel to a device port as a terminal has one: server TLS checked against ``ca_pem``, no
    client certificate."""
    return grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=ca_pem))


class AllowedCallerChannel:
    """Looks like a ``grpc.aio.Channel`` to generated stubs; each method travels over a channel
    presenting the certificate of the first caller its allow-list names (one channel per caller,
    opened on first use, closed with this one)."""

    def __init__(self, target: str, *, server_name: str, authorizer: Authorizer,
                 options: Sequence[tuple[str, Any]] = ()):
        self._target = target
        self._server_name = server_name
        self._authorizer = authorizer
        self._options = tuple(options)
        self._channels: dict[str, grpc.aio.Channel] = {}

    def caller_for(self, method: str) -> str:
        rule = self._authorizer.rule(method)
        if rule is None or not rule.callers:
            # Health and methods nobody may call: the operator's certificate, and the server decides.
            return "ops"
        return rule.callers[0]

    def as_caller(self, caller: str) -> grpc.aio.Channel:
        if caller not in self._channels:
            self._channels[caller] = channel_as(caller, self._target, server_name=self._server_name,
                                                options=self._options)
        return self._channels[caller]

    def _for(self, method: str) -> grpc.aio.Channel:
        return self.as_caller(self.caller_for(method))

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._for(method).unary_unary(method, *args, **kwargs)

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._for(method).unary_stream(method, *args, **kwargs)

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._for(method).stream_unary(method, *args, **kwargs)

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._for(method).stream_stream(method, *args, **kwargs)

    async def channel_ready(self) -> None:
        await self.as_caller("ops").channel_ready()

    async def close(self, grace: float | None = None) -> None:
        for channel in self._channels.values():
            await channel.close(grace)
        self._channels.clear()

    async def __aenter__(self) -> AllowedCallerChannel:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

