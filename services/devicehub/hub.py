"""The hub's parts for one process, wired once PostgreSQL and NATS are up: the store, the alarms,
the channels to identity, codegen, policy and the ledger, the transactions part (tx's), the
connected streams, sync, fleet and rollouts. The servicers reach everything through it."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any

import grpc

from onecard.codegen.v1 import codegen_pb2_grpc
from onecard.identity.v1 import identity_pb2_grpc
from onecard.policy.v1 import policy_pb2_grpc
from runtime.errors import Unavailable
from runtime.events import OutboxRelay
from runtime.grpc_client import open_channel
from runtime.grpc_server import ServiceApp
from runtime.logs import get_logger
from services.devicehub.alarms import Alarms
from services.devicehub.fleet import Fleet
from services.devicehub.rollouts import Rollouts
from services.devicehub.sessions import Sessions
from services.devicehub.store import DevicehubStore
from services.devicehub.sync import Sync, SyncListener

if TYPE_CHECKING:
    from services.devicehub.settings import DevicehubSettings

log = get_logger(__name__)

TRANSACTIONS_MODULE = "services.devicehub.transactions"
SHUTDOWN_DRAIN_S = 1.0


def load_transactions_class() -> Any | None:
    """tx's Transactions class, or None while its module does not exist yet (then the stream
    answers authorisations and uploads with StreamError TRANSACTIONS_UNAVAILABLE)."""
    try:
        import importlib

        module = importlib.import_module(TRANSACTIONS_MODULE)
    except ModuleNotFoundError as exc:
        if exc.name != TRANSACTIONS_MODULE:
            raise
        log.warning("transactions module missing: payments, uploads and access are unavailable")
        return None
    return module.Transactions


class Hub:
    def __init__(self, *, settings: DevicehubSettings):
        self.settings = settings
        self.app: ServiceApp | None = None
        self.sessions = Sessions()
        self.tx: Any | None = None
        self._store: DevicehubStore | None = None
        self._alarms: Alarms | None = None
        self.channels: dict[str, grpc.aio.Channel] = {}
        self.identity: identity_pb2_grpc.IdentityServiceStub | None = None
        self.codegen: codegen_pb2_grpc.CodegenServiceStub | None = None
        self.policy: policy_pb2_grpc.PolicyServiceStub | None = None
        self.sync = Sync(self)
        self.fleet = Fleet(self)
        self.rollouts = Rollouts(self)

    # --- parts that exist once the process is ready ------------------------------------------------

    @property
    def store(self) -> DevicehubStore:
        if self._store is None:
            raise Unavailable("devicehub is starting", reason="STARTING")
        return self._store

    @property
    def alarms(self) -> Alarms:
        if self._alarms is None:
            raise Unavailable("devicehub is starting", reason="STARTING")
        return self._alarms

    @property
    def device_ca_pem(self) -> str:
        """The CA bundle terminals check the device port against ('' in insecure development mode)."""
        tls = self.app.terminal_tls if self.app is not None else None
        return tls.ca_pem.decode() if tls is not None else ""

    def transactions(self) -> Any:
        if self.tx is None:
            raise Unavailable("payments, uploads and access are not available in this build",
                              reason="TRANSACTIONS_UNAVAILABLE")
        return self.tx

    async def start(self, app: ServiceApp) -> None:
        self.app = app
        settings = self.settings
        self._store = DevicehubStore(app.pool)
        self._alarms = Alarms(app.pool)
        for name in ("identity", "codegen", "policy", "ledger"):
            self.channels[name] = open_channel(getattr(settings, f"{name}_target"), tls=app.tls, server_name=name)
        self.identity = identity_pb2_grpc.IdentityServiceStub(self.channels["identity"])
        self.codegen = codegen_pb2_grpc.CodegenServiceStub(self.channels["codegen"])
        self.policy = policy_pb2_grpc.PolicyServiceStub(self.channels["policy"])
        transactions_cls = load_transactions_class()
        if transactions_cls is not None:
            self.tx = transactions_cls(
                pool=app.pool, settings=settings, alarms=self._alarms, identity=self.channels["identity"],
                codegen=self.channels["codegen"], policy=self.channels["policy"], ledger=self.channels["ledger"],
            )
            await self.tx.start(app)
        app.spawn(OutboxRelay(pool=app.pool, js=app.js, schema="devicehub").run(), name="outbox-relay")
        app.spawn(SyncListener(self).run(), name="sync-listener")
        app.spawn(self.fleet.watch_forever(), name="fleet-watcher")
        app.spawn(self._close_on_shutdown(), name="channels")

    async def end_streams(self, _app: ServiceApp | None = None) -> None:
        """At SIGTERM (ServiceApp.on_stop), end the devices' streams after the answers in flight (at
        most a second), so the server's drain does not wait its whole grace period on streams that
        never end by themselves, and devices reconnect to another replica at once."""
        await self.sessions.drain_all(timeout_s=SHUTDOWN_DRAIN_S,
                                      error=Unavailable("the hub is restarting: reconnect", reason="HUB_SHUTTING_DOWN"))

    async def _close_on_shutdown(self) -> None:
        """Hold the channels and the transactions part until the service's tasks are cancelled."""
        try:
            await asyncio.Event().wait()
        finally:
            self.sessions.close_all()
            if self.tx is not None:
                with contextlib.suppress(Exception):
                    await self.tx.close()
            for channel in self.channels.values():
                with contextlib.suppress(Exception):
                    await channel.close()
