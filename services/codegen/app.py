"""Assembles the codegen service from its settings (services.codegen.settings, the master key
among them): schema and migrations, its stream, and the background work it starts once PostgreSQL
and NATS are up: the outbox relay, the consumer of identity's member events, the identity channel
and the sweep that retires keys."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

from onecard.codegen.v1 import codegen_pb2, codegen_pb2_grpc
from runtime.events import IdempotentConsumer, OutboxRelay, StreamSpec
from runtime.nats_access import Durable, NatsAccess
from runtime.grpc_server import ServiceApp
from runtime.logs import get_logger
from services.codegen import signing
from services.codegen.consumer import IDENTITY_DURABLE, IDENTITY_FILTER, IDENTITY_STREAM, member_event_handler
from services.codegen.identity_client import IdentityClient
from services.codegen.servicer import CodegenServicer
from services.codegen.settings import CodegenSettings
from services.codegen.store import CodegenStore

log = get_logger(__name__)

SCHEMA = "codegen"
MIGRATIONS_DIR = Path(__file__).parent / "migrations"
STREAM = StreamSpec("CODEGEN", ["codegen.>"])
NATS_ACCESS = NatsAccess(owns=(STREAM,), consumes=(Durable(IDENTITY_STREAM, IDENTITY_DURABLE),))
SERVICE_NAME = codegen_pb2.DESCRIPTOR.services_by_name["CodegenService"].full_name


async def retire_keys_forever(*, store: CodegenStore, interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)
        try:
            now = datetime.now(UTC)
            for tenant_id in await store.tenants_with_keys_due(now=now):
                async with store.tenant_tx(tenant_id) as tx:
                    await tx.retire_due_keys(now=now)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the sweep tries again next round
            log.warning("key retirement sweep failed", error=type(exc).__name__)


def build_app(settings: CodegenSettings) -> ServiceApp:
    master_key = settings.master_key
    identity = IdentityClient(target=settings.identity_target, timeout_s=settings.identity_timeout_s)

    async def on_ready(app: ServiceApp) -> None:
        store = CodegenStore(app.pool, master_key=master_key, key_id_for=signing.key_id_for)
        app.spawn(identity.hold(tls=app.tls), name="identity-channel")
        app.spawn(OutboxRelay(pool=app.pool, js=app.js, schema=SCHEMA).run(), name="outbox-relay")
        app.spawn(
            IdempotentConsumer(
                pool=app.pool, js=app.js, stream=IDENTITY_STREAM, durable=IDENTITY_DURABLE,
                filter_subject=IDENTITY_FILTER,
                handler=member_event_handler(master_key=master_key, key_id_for=signing.key_id_for),
            ).run(),
            name="identity-consumer",
        )
        app.spawn(retire_keys_forever(store=store, interval_s=settings.retire_interval_s), name="key-retirement")

    def register(server, app: ServiceApp) -> None:  # noqa: ANN001 - grpc.aio.Server
        codegen_pb2_grpc.add_CodegenServiceServicer_to_server(
            CodegenServicer(app=app, settings=settings, identity=identity, master_key=master_key), server
        )

    return ServiceApp(
        name="codegen",
        settings=settings,
        schema=SCHEMA,
        migrations_dir=MIGRATIONS_DIR,
        register=register,
        service_names=[SERVICE_NAME],
        streams=[STREAM],
        nats_access=NATS_ACCESS,
        on_ready=on_ready,
    )
