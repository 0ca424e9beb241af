"""A minimal service used to exercise the shared runtime on its own."""
from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from runtime.events import OutboxRelay, StreamSpec, emit
from runtime.grpc_server import ServiceApp
from runtime.nats_access import Durable, NatsAccess
from runtime.settings import ServiceSettings
from tests.mesh import service_values

MIGRATIONS = Path(__file__).parent / "migrations"
SCHEMA = "widgets"
STREAM = StreamSpec(name="WIDGETS", subjects=["widgets.>"])
# The tests run an idempotent consumer named "effects" on the widgets' own stream.
CONSUMER = "effects"
NATS_ACCESS = NatsAccess(owns=(STREAM,), consumes=(Durable(STREAM.name, CONSUMER),))


def widget_app(*, database_url: str, nats_url: str, with_relay: bool = False) -> ServiceApp:
    settings = ServiceSettings(nats_url=nats_url, health_interval_s=0.1, shutdown_grace_s=1.0,
                               **service_values("widgets", database_url))

    async def on_ready(app: ServiceApp) -> None:
        if with_relay:
            app.spawn(OutboxRelay(pool=app.pool, js=app.js, schema=SCHEMA, batch_size=25).run(), name="relay")

    return ServiceApp(
        name="widgets",
        settings=settings,
        schema=SCHEMA,
        migrations_dir=MIGRATIONS,
        register=lambda server, app: None,
        service_names=["onecard.test.Widgets"],
        streams=[STREAM],
        on_ready=on_ready,
        nats_access=NATS_ACCESS,
    )


async def make_widgets(pool, *, count: int, first: int = 0) -> list[str]:  # noqa: ANN001
    """Create widgets, each with its event in the same transaction; answers the event ids."""
    ids = []
    for i in range(first, first + count):
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute("INSERT INTO widgets (name) VALUES ($1)", f"w{i}")
            ids.append(await emit(conn, subject="widgets.created", event_type="widget.created", data={"n": i}))
    return ids


async def wait_until(predicate, *, timeout_s: float = 30.0, interval_s: float = 0.05) -> None:  # noqa: ANN001
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        with contextlib.suppress(Exception):
            if await predicate():
                return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(interval_s)


class TcpProxy:
    """A loopback TCP forwarder a test can cut and restore, to take PostgreSQL away and back
    without restarting the shared server."""

    def __init__(self, *, target_host: str, target_port: int):
        self._target = (target_host, target_port)
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    async def open(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            writer.close()
        self._writers.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.close()
            return
        self._writers.update({writer, up_writer})

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
