"""The device hub's parts for one process, made here and given the few collaborators each uses:
the connected streams (sessions), sync, the fleet, rollouts and the device stream, over the
backends they reach (services.devicehub.backends). Once PostgreSQL and NATS are up, ``start``
opens the channels to identity, codegen, policy and the ledger, connects the store, the alarms and
the transactions part (tx's), and starts the sync listener and the fleet watcher; at shutdown the
streams end and the channels close. app.py hands the servicers their parts from here."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from datetime import datetime
from typing import Any

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
from services.devicehub.backends import Backends
from services.devicehub.fleet import Fleet
from services.devicehub.rollouts import Rollouts
from services.devicehub.sessions import Sessions
from services.devicehub.settings import DevicehubSettings
from services.devicehub.store import DevicehubStore
from services.devicehub.stream import DeviceStream
from services.devicehub.sync import Sync, SyncListener

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
    def __init__(self, *, settings: DevicehubSettings, now: Callable[[], datetime]):
        self.settings = settings
        self.now = now
        self.sessions = Sessions()
        self.backends = Backends()
        self.channels: dict[str, grpc.aio.Channel] = {}
        self.sync = Sync(settings=settings, backends=self.backends, sessions=self.sessions)
        self.fleet = Fleet(settings=settings, backends=self.backends)
        self.rollouts = Rollouts(backends=self.backends, sessions=self.sessions, sync=self.sync)
        self.stream = DeviceStream(settings=settings, backends=self.backends, sessions=self.sessions,
                                   fleet=self.fleet, sync=self.sync, rollouts=self.rollouts)

    async def start(self, app: ServiceApp) -> None:
        settings = self.settings
        for name in ("identity", "codegen", "policy", "ledger"):
            self.channels[name] = open_channel(getattr(settings, f"{name}_target"), tls=app.tls, server_name=name)
        alarms = Alarms(app.pool)
        self.backends.connect(
            store=DevicehubStore(app.pool), alarms=alarms,
            identity=identity_pb2_grpc.IdentityServiceStub(self.channels["identity"]),
            codegen=codegen_pb2_grpc.CodegenServiceStub(self.channels["codegen"]),
            policy=policy_pb2_grpc.PolicyServiceStub(self.channels["policy"]),
            device_ca_pem=app.terminal_tls.ca_pem.decode() if app.terminal_tls is not None else "",
        )
        transactions_cls = load_transactions_class()
        if transactions_cls is not None:
            tx = transactions_cls(
                pool=app.pool, settings=settings, alarms=alarms, identity=self.channels["identity"],
                codegen=self.channels["codegen"], policy=self.channels["policy"], ledger=self.channels["ledger"],
                now=self.now,
            )
            self.backends.tx = tx
            await tx.start(app)
        app.spawn(OutboxRelay(pool=app.pool, js=app.js, schema="devicehub").run(), name="outbox-relay")
        listener = SyncListener(settings=settings, nc=app.nc, sessions=self.sessions, sync=self.sync,
                                on_rollout_event=self.rollouts.on_event)
        app.spawn(listener.run(), name="sync-listener")
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
            if self.backends.tx is not None:
                with contextlib.suppress(Exception):
                    await self.backends.tx.close()
            for channel in self.channels.values():
                with contextlib.suppress(Exception):
                    await channel.close()
