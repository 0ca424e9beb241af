"""Assembles the ledger service: settings, schema and migrations, its stream, and the background
work it starts once PostgreSQL and NATS are up: the outbox relay and the sweep that expires holds."""

from __future__ import annotations

import asyncio
from pathlib import Path

from pydantic import Field

from onecard.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from runtime.events import OutboxRelay, StreamSpec
from runtime.grpc_server import ServiceApp
from runtime.logs import get_logger
from runtime.settings import ServiceSettings
from services.ledger.operations import Ledger
from services.ledger.servicer import LedgerServicer
from services.ledger.store import LedgerStore

log = get_logger(__name__)

SCHEMA = "ledger"
MIGRATIONS_DIR = Path(__file__).parent / "migrations"
STREAM = StreamSpec("LEDGER", ["ledger.>"])
SERVICE_NAME = ledger_pb2.DESCRIPTOR.services_by_name["LedgerService"].full_name

DEFAULT_EXPIRY_INTERVAL_S = 1.0
DEFAULT_EXPIRY_BATCH = 200


class LedgerSettings(ServiceSettings):
    # How often pending holds past their time are released. Capture and void refuse an expired
    # hold at once; this only decides how soon its money is available again.
    hold_expiry_interval_s: float = Field(default=DEFAULT_EXPIRY_INTERVAL_S, gt=0)
    hold_expiry_batch: int = Field(default=DEFAULT_EXPIRY_BATCH, ge=1, le=10_000)


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


def build_app(settings: LedgerSettings) -> ServiceApp:
    async def on_ready(app: ServiceApp) -> None:
        app.spawn(OutboxRelay(pool=app.pool, js=app.js, schema=SCHEMA).run(), name="outbox-relay")
        app.spawn(expire_holds_forever(ledger=Ledger(LedgerStore(app.pool)), interval_s=settings.hold_expiry_interval_s,
                                       batch=settings.hold_expiry_batch), name="hold-expiry")

    def register(server, app: ServiceApp) -> None:  # noqa: ANN001 - grpc.aio.Server
        ledger_pb2_grpc.add_LedgerServiceServicer_to_server(LedgerServicer(app=app), server)

    return ServiceApp(
        name="ledger",
        settings=settings,
        schema=SCHEMA,
        migrations_dir=MIGRATIONS_DIR,
        register=register,
        service_names=[SERVICE_NAME],
        streams=[STREAM],
        on_ready=on_ready,
    )
