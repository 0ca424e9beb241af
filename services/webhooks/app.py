"""Assembles the webhooks service from its settings (services.webhooks.settings): schema and
migrations, its stream (``webhooks.>``: its own alarms), and the background work it starts once
PostgreSQL and NATS are up: the outbox relay, the ledger channel, the three durable consumers that
fan events out into deliveries, and the dispatcher that sends them.

``build_app`` takes two collaborators besides the settings, for tests: the clock that schedules
retries, overlaps and disabling (the signature's timestamp is always the real time), and the
resolver that turns target names into addresses.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from onecard.webhooks.v1 import webhooks_pb2, webhooks_pb2_grpc
from runtime.events import IdempotentConsumer, OutboxRelay, StreamSpec
from runtime.grpc_server import ServiceApp
from runtime.nats_access import Durable, NatsAccess
from services.webhooks.dispatcher import Dispatcher
from services.webhooks.domain import RetryPolicy
from services.webhooks.fanout import (
    DEVICEHUB_DURABLE,
    DEVICEHUB_FILTER,
    DEVICEHUB_STREAM,
    IDENTITY_DURABLE,
    IDENTITY_FILTER,
    IDENTITY_STREAM,
    LEDGER_DURABLE,
    LEDGER_FILTER,
    LEDGER_STREAM,
    FanOut,
    LedgerOwners,
)
from services.webhooks.sender import Resolver, Sender, system_resolver
from services.webhooks.servicer import WebhookServicer
from services.webhooks.settings import WebhooksSettings
from services.webhooks.store import WebhookStore

SCHEMA = "webhooks"
MIGRATIONS_DIR = Path(__file__).parent / "migrations"
STREAM = StreamSpec("WEBHOOKS", ["webhooks.>"])
NATS_ACCESS = NatsAccess(owns=(STREAM,), consumes=(
    Durable(IDENTITY_STREAM, IDENTITY_DURABLE),
    Durable(LEDGER_STREAM, LEDGER_DURABLE),
    Durable(DEVICEHUB_STREAM, DEVICEHUB_DURABLE),
))
SERVICE_NAME = webhooks_pb2.DESCRIPTOR.services_by_name["WebhookService"].full_name

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


def build_app(settings: WebhooksSettings, *, clock: Clock = utc_now, resolver: Resolver = system_resolver
              ) -> ServiceApp:
    master_key = settings.master_key
    ledger = LedgerOwners(target=settings.ledger_target, timeout_s=settings.ledger_timeout_s)
    fan_out = FanOut(ledger=ledger, clock=clock)
    sender = Sender(resolver=resolver, allow_loopback_http=settings.webhooks_allow_loopback_http,
                    connect_timeout_s=settings.webhooks_connect_timeout_s,
                    read_timeout_s=settings.webhooks_read_timeout_s,
                    total_timeout_s=settings.webhooks_total_timeout_s)
    retry = RetryPolicy(base_s=settings.webhooks_backoff_base_s, cap_s=settings.webhooks_backoff_cap_s,
                        window_s=settings.webhooks_retry_window_s)
    dispatchers: list[Dispatcher] = []

    def wake() -> None:
        for dispatcher in dispatchers:
            dispatcher.wake.set()

    async def on_ready(app: ServiceApp) -> None:
        app.spawn(ledger.hold(tls=app.tls), name="ledger-channel")
        app.spawn(OutboxRelay(pool=app.pool, js=app.js, schema=SCHEMA).run(), name="outbox-relay")
        for stream, durable, subjects, handler in (
            (IDENTITY_STREAM, IDENTITY_DURABLE, IDENTITY_FILTER, fan_out.on_identity_event),
            (LEDGER_STREAM, LEDGER_DURABLE, LEDGER_FILTER, fan_out.on_ledger_event),
            (DEVICEHUB_STREAM, DEVICEHUB_DURABLE, DEVICEHUB_FILTER, fan_out.on_devicehub_event),
        ):
            consumer = IdempotentConsumer(pool=app.pool, js=app.js, stream=stream, durable=durable,
                                          filter_subject=subjects, handler=handler, in_order=True)
            app.spawn(consumer.run(), name=durable)
        dispatcher = Dispatcher(store=WebhookStore(app.pool, master_key=master_key), sender=sender, clock=clock,
                                wall_clock=utc_now, retry=retry, disable_after_s=settings.webhooks_disable_after_s,
                                poll_s=settings.webhooks_poll_s, concurrency=settings.webhooks_concurrency)
        dispatchers.append(dispatcher)
        app.spawn(dispatcher.run(), name="dispatcher")

    def register(server, app: ServiceApp) -> None:  # noqa: ANN001 - grpc.aio.Server
        webhooks_pb2_grpc.add_WebhookServiceServicer_to_server(
            WebhookServicer(app=app, master_key=master_key, clock=clock, resolver=resolver,
                            allow_loopback_http=settings.webhooks_allow_loopback_http,
                            max_overlap_s=settings.webhooks_secret_overlap_s, wake=wake),
            server)

    return ServiceApp(
        name="webhooks",
        settings=settings,
        schema=SCHEMA,
        migrations_dir=MIGRATIONS_DIR,
        register=register,
        service_names=[SERVICE_NAME],
        streams=[STREAM],
        nats_access=NATS_ACCESS,
        on_ready=on_ready,
    )
