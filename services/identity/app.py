"""Assembles the identity service from its settings (services.identity.settings): schema and
migrations, its stream, and the background work it starts once PostgreSQL and NATS are up (the
outbox relay, unfinished imports)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from onecard.identity.v1 import identity_pb2, identity_pb2_grpc
from runtime.events import OutboxRelay, StreamSpec
from runtime.nats_access import NatsAccess
from runtime.grpc_server import ServiceApp
from services.identity.importer import resume_imports
from services.identity.servicer import IdentityServicer
from services.identity.settings import IdentitySettings
from services.identity.store import IdentityStore

SCHEMA = "identity"
MIGRATIONS_DIR = Path(__file__).parent / "migrations"
STREAM = StreamSpec("IDENTITY", ["identity.>"])
NATS_ACCESS = NatsAccess(owns=(STREAM,))
SERVICE_NAME = identity_pb2.DESCRIPTOR.services_by_name["IdentityService"].full_name


def build_app(settings: IdentitySettings, *, clock: Callable[[], datetime] | None = None) -> ServiceApp:
    """``clock``: what PIN lockouts and bindings are timed by (tests pass their own)."""
    async def on_ready(app: ServiceApp) -> None:
        app.spawn(OutboxRelay(pool=app.pool, js=app.js, schema=SCHEMA).run(), name="outbox-relay")
        await resume_imports(
            store=IdentityStore(app.pool),
            spawn=app.spawn,
            max_rows=settings.import_max_rows,
            chunk_rows=settings.import_chunk_rows,
        )

    def register(server, app: ServiceApp) -> None:  # noqa: ANN001 - grpc.aio.Server
        identity_pb2_grpc.add_IdentityServiceServicer_to_server(IdentityServicer(app=app, settings=settings, **({"clock": clock} if clock else {})), server)

    return ServiceApp(
        name="identity",
        settings=settings,
        schema=SCHEMA,
        migrations_dir=MIGRATIONS_DIR,
        register=register,
        service_names=[SERVICE_NAME],
        streams=[STREAM],
        nats_access=NATS_ACCESS,
        on_ready=on_ready,
    )
