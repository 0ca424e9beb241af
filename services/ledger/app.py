"""Assembles the ledger service from its settings (services.ledger.settings): schema and
migrations, its stream, and the background work it starts once PostgreSQL and NATS are up: the
outbox relay and the sweep that expires holds."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from onecard.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from runtime.events import IdempotentConsumer, OutboxRelay, StreamSpec
from runtime.nats_access import Durable, NatsAccess
from runtime.grpc_server import ServiceApp
from runtime.logs import get_logger
from services.ledger.consumer import IDENTITY_DURABLE, IDENTITY_FILTER, IDENTITY_STREAM, open_member_purses
from services.ledger.operations import Ledger, PayBatcher
from services.ledger.servicer import LedgerServicer
from services.ledger.settings import LedgerSettings
from services.ledger.store import LedgerStore

log = get_logger(__name__)

SCHEMA = "ledger"
MIGRATIONS_DIR = Path(__file__).parent / "migrations"
STREAM = StreamSpec("LEDGER", ["ledger.>"])
NATS_ACCESS = NatsAccess(owns=(STREAM,), consumes=(Durable(IDENTITY_STREAM, IDENTITY_DURABLE),))
SERVICE_NAME = ledger_pb2.DESCRIPTOR.services_by_name["LedgerService"].full_name


async def expire_holds_forever(*, ledger: Ledger, interval_s: float, batch: int) -> None:
    while True:
        await asyncio.sleep(interval_s)
        try:
            # A full batch means more are due: go again without waiting.
            while await ledger.expire_due_holds(limit=batch) >= batch:
                pass
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the sweep tries again next round
            log.warning("hold expiry sweep failed", error=type(exc).__name__)


async def run_programs_forever(*, ledger: Ledger, interval_s: float) -> None:
    """Grant batches (woken at once when one starts) and the end of programs past their date.
    Every step is a chunk in its own transaction, so a crash loses at most a chunk's work, which
    the next round (here or on another replica) does again exactly once."""
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ledger.batch_started.wait(), timeout=interval_s)
        ledger.batch_started.clear()
        try:
            chunks = await ledger.run_grant_batches()
            chunks += await ledger.expire_due_programs()
            if chunks:
                log.info("program work done", chunks=chunks)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - tried again next round
            log.warning("program work failed", error=type(exc).__name__)


def build_app(settings: LedgerSettings) -> ServiceApp:
    batch_started = asyncio.Event()
    batcher = PayBatcher(workers=settings.pay_workers, max_batch=settings.pay_max_batch)

    async def on_ready(app: ServiceApp) -> None:
        ledger = Ledger(LedgerStore(app.pool), batch_started=batch_started)
        app.spawn(OutboxRelay(pool=app.pool, js=app.js, schema=SCHEMA).run(), name="outbox-relay")
        app.spawn(batcher.run(ledger), name="pay-batcher")
        app.spawn(expire_holds_forever(ledger=ledger, interval_s=settings.hold_expiry_interval_s,
                                       batch=settings.hold_expiry_batch), name="hold-expiry")
        app.spawn(run_programs_forever(ledger=ledger, interval_s=settings.program_interval_s), name="programs")
        app.spawn(IdempotentConsumer(pool=app.pool, js=app.js, stream=IDENTITY_STREAM, durable=IDENTITY_DURABLE,
                                     filter_subject=IDENTITY_FILTER, handler=open_member_purses).run(),
                  name="identity-consumer")

    def register(server, app: ServiceApp) -> None:  # noqa: ANN001 - grpc.aio.Server
        ledger_pb2_grpc.add_LedgerServiceServicer_to_server(
            LedgerServicer(app=app, batch_started=batch_started, batcher=batcher), server)

    return ServiceApp(
        name="ledger",
        settings=settings,
        schema=SCHEMA,
        migrations_dir=MIGRATIONS_DIR,
        register=register,
        service_names=[SERVICE_NAME],
        streams=[STREAM],
        nats_access=NATS_ACCESS,
        on_ready=on_ready,
    )
