"""Assembles the device hub from its settings (services.devicehub.settings: the addresses of
identity, codegen, policy and the ledger, the fleet thresholds): schema and migrations, its
stream, and the background work it starts once PostgreSQL and NATS are up: the outbox relay, the
channels to the mesh, the transactions part, the sync listener that pushes changes to connected
devices, and the fleet watcher."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from onecard.devicehub.v1 import devicehub_pb2, devicehub_pb2_grpc
from runtime.events import StreamSpec
from runtime.nats_access import NatsAccess
from runtime.grpc_server import ServiceApp, TerminalListener
from services.devicehub.hub import Hub
from services.devicehub.settlement import now_utc
from services.devicehub.servicer import DeviceAdminServicer, DeviceServicer
from services.devicehub.settings import DevicehubSettings

SCHEMA = "devicehub"
MIGRATIONS_DIR = Path(__file__).parent / "migrations"
STREAM = StreamSpec("DEVICEHUB", ["devicehub.>"])
# The sync listener and the transactions part drop cached state as the mesh's events pass
# (plain subscriptions: every replica needs every event).
NATS_ACCESS = NatsAccess(owns=(STREAM,), listens=("identity.>", "codegen.>", "policy.>", "devicehub.>"))
ADMIN_SERVICE_NAME = devicehub_pb2.DESCRIPTOR.services_by_name["DeviceAdminService"].full_name
DEVICE_SERVICE_NAME = devicehub_pb2.DESCRIPTOR.services_by_name["DeviceService"].full_name


def build_app(settings: DevicehubSettings, *, now: Callable[[], datetime] = now_utc) -> ServiceApp:
    """The hub's process. ``now`` is the hub's clock, the one that decides online (meal periods,
    the day's limits, access windows); a test may run the campus at a chosen hour with it."""
    hub = Hub(settings=settings, now=now)

    async def on_ready(app: ServiceApp) -> None:
        await hub.start(app)

    def register(server, app: ServiceApp) -> None:  # noqa: ANN001 - grpc.aio.Server
        admin = DeviceAdminServicer(backends=hub.backends, sessions=hub.sessions, sync=hub.sync, rollouts=hub.rollouts)
        devicehub_pb2_grpc.add_DeviceAdminServiceServicer_to_server(admin, server)

    def register_terminals(server, app: ServiceApp) -> None:  # noqa: ANN001 - grpc.aio.Server
        devices = DeviceServicer(backends=hub.backends, sessions=hub.sessions, stream=hub.stream)
        devicehub_pb2_grpc.add_DeviceServiceServicer_to_server(devices, server)

    app = ServiceApp(
        name="devicehub",
        settings=settings,
        schema=SCHEMA,
        migrations_dir=MIGRATIONS_DIR,
        register=register,
        service_names=[ADMIN_SERVICE_NAME],
        streams=[STREAM],
        nats_access=NATS_ACCESS,
        on_ready=on_ready,
        on_stop=hub.end_streams,
        terminals=TerminalListener(register=register_terminals, service_names=[DEVICE_SERVICE_NAME],
                                   port=settings.device_port, tls_dir=settings.device_tls_dir),
    )
    # Reachable from the process (tests and debugging look at connected streams through it).
    app.hub = hub  # type: ignore[attr-defined]
    return app
