"""Assembles the device hub: settings (the addresses of identity, codegen, policy and the ledger,
the fleet thresholds), schema and migrations, its stream, and the background work it starts once
PostgreSQL and NATS are up: the outbox relay, the channels to the mesh, the transactions part,
the sync listener that pushes changes to connected devices, and the fleet watcher."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from onecard.devicehub.v1 import devicehub_pb2, devicehub_pb2_grpc
from runtime.events import StreamSpec
from runtime.nats_access import NatsAccess
from runtime.grpc_server import ServiceApp, TerminalListener
from runtime.settings import ServiceSettings
from services.devicehub.hub import Hub
from services.devicehub.servicer import DeviceAdminServicer, DeviceServicer

SCHEMA = "devicehub"
MIGRATIONS_DIR = Path(__file__).parent / "migrations"
STREAM = StreamSpec("DEVICEHUB", ["devicehub.>"])
# The sync listener and the transactions part drop cached state as the mesh's events pass
# (plain subscriptions: every replica needs every event).
NATS_ACCESS = NatsAccess(owns=(STREAM,), listens=("identity.>", "codegen.>", "policy.>", "devicehub.>"))
ADMIN_SERVICE_NAME = devicehub_pb2.DESCRIPTOR.services_by_name["DeviceAdminService"].full_name
DEVICE_SERVICE_NAME = devicehub_pb2.DESCRIPTOR.services_by_name["DeviceService"].full_name

DEFAULT_DOWNSTREAM_TIMEOUT_S = 5.0
DEFAULT_OFFLINE_AFTER_S = 30.0
DEFAULT_OFFLINE_ALARM_AFTER_S = 300.0
DEFAULT_CLOCK_DRIFT_ALARM_MS = 30_000
DEFAULT_BACKLOG_ALARM_AFTER_S = 3600.0
DEFAULT_FLEET_INTERVAL_S = 5.0
DEFAULT_HANDSHAKE_TIMEOUT_S = 10.0
DEFAULT_SYNC_DEBOUNCE_S = 0.05
DEFAULT_SYNC_RESYNC_S = 60.0


class DevicehubSettings(ServiceSettings):
    # The device port: terminals' streams, server TLS (no client certificate), nothing else of the
    # hub's API. Its certificate is the one in ONECARD_DEVICE_TLS_DIR (the name terminals dial),
    # or the hub's mesh certificate when unset.
    device_port: int = Field(default=0, ge=0, le=65535)
    device_tls_dir: Path | None = None
    # ONECARD_IDENTITY_TARGET etc.: host:port of the services the hub asks for members, codes,
    # plans and bookings, and reads sync sources from.
    identity_target: str = Field(min_length=1)
    codegen_target: str = Field(min_length=1)
    policy_target: str = Field(min_length=1)
    ledger_target: str = Field(min_length=1)
    # Deadline of each call the hub makes to those services.
    downstream_timeout_s: float = Field(default=DEFAULT_DOWNSTREAM_TIMEOUT_S, gt=0)
    # A device with no heartbeat (and no stream) for this long is offline.
    offline_after_s: float = Field(default=DEFAULT_OFFLINE_AFTER_S, gt=0)
    # Offline this long: alarm OFFLINE_TOO_LONG.
    offline_alarm_after_s: float = Field(default=DEFAULT_OFFLINE_ALARM_AFTER_S, gt=0)
    # |device clock - hub clock| above this in a heartbeat or hello: alarm CLOCK_DRIFT.
    clock_drift_alarm_ms: int = Field(default=DEFAULT_CLOCK_DRIFT_ALARM_MS, gt=0)
    # A heartbeat's oldest queued offline record older than this: alarm BACKLOG_TOO_OLD.
    backlog_alarm_after_s: float = Field(default=DEFAULT_BACKLOG_ALARM_AFTER_S, gt=0)
    # How often the fleet watcher looks for silent devices.
    heartbeat_check_interval_s: float = Field(default=DEFAULT_FLEET_INTERVAL_S, gt=0)
    # How long a new stream may take to say hello and answer its challenge.
    handshake_timeout_s: float = Field(default=DEFAULT_HANDSHAKE_TIMEOUT_S, gt=0)
    # Events arriving within this window are pushed to devices as one sync round.
    sync_debounce_s: float = Field(default=DEFAULT_SYNC_DEBOUNCE_S, ge=0, le=5)
    # Connected devices are compared with the sync sources this often even without an event (an
    # event missed while NATS was away reaches them within it).
    sync_resync_interval_s: float = Field(default=DEFAULT_SYNC_RESYNC_S, gt=0)


def build_app(settings: DevicehubSettings) -> ServiceApp:
    hub = Hub(settings=settings)

    async def on_ready(app: ServiceApp) -> None:
        await hub.start(app)

    def register(server, app: ServiceApp) -> None:  # noqa: ANN001 - grpc.aio.Server
        hub.app = app
        devicehub_pb2_grpc.add_DeviceAdminServiceServicer_to_server(DeviceAdminServicer(hub=hub), server)

    def register_terminals(server, app: ServiceApp) -> None:  # noqa: ANN001 - grpc.aio.Server
        devicehub_pb2_grpc.add_DeviceServiceServicer_to_server(DeviceServicer(hub=hub), server)

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
    hub.app = app
    # Reachable from the process (tests and debugging look at connected streams through it).
    app.hub = hub  # type: ignore[attr-defined]
    return app
