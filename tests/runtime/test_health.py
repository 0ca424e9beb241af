"""Health answers NOT_SERVING while PostgreSQL or NATS is away, SERVING when both are back,
and NOT_SERVING again once shutdown begins."""
import asyncio
from urllib.parse import urlsplit

from grpc_health.v1 import health_pb2, health_pb2_grpc

from devstack.servers import Nats, free_port
from tests.mesh import channel_as
from tests.runtime.support import TcpProxy, wait_until, widget_app

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def health_status(port: int, service: str = "") -> int:
    async with channel_as("ops", f"127.0.0.1:{port}", server_name="widgets") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                                timeout=2)
        return reply.status


async def becomes(port: int, status: int, timeout_s: float = 20.0) -> None:
    async def check() -> bool:
        return await health_status(port) == status and await health_status(port, "onecard.test.Widgets") == status

    await wait_until(check, timeout_s=timeout_s)


async def test_health_tracks_postgres_and_nats(database_url: str, nats_server: Nats) -> None:
    pg = urlsplit(database_url)
    proxy = TcpProxy(target_host=pg.hostname or "127.0.0.1", target_port=pg.port or 5432)
    proxy.port = free_port()
    proxied_url = database_url.replace(f":{pg.port}/", f":{proxy.port}/")
    nats_server.stop()

    app = widget_app(database_url=proxied_url, nats_url=nats_server.url)
    port = await app.start()
    try:
        # Neither is up: the server answers, and says NOT_SERVING.
        await asyncio.sleep(1.0)
        assert await health_status(port) == NOT_SERVING

        await proxy.open()
        await asyncio.sleep(1.0)
        assert await health_status(port) == NOT_SERVING, "PostgreSQL alone must not make it SERVING"

        nats_server.start()
        await becomes(port, SERVING)

        await proxy.cut()
        await becomes(port, NOT_SERVING)
        await proxy.open()
        await becomes(port, SERVING)

        nats_server.stop()
        await becomes(port, NOT_SERVING)
        nats_server.start()
        await becomes(port, SERVING)
    finally:
        await app.stop()
        await proxy.cut()


async def test_health_turns_not_serving_when_shutdown_begins(database_url: str, nats_url: str) -> None:
    app = widget_app(database_url=database_url, nats_url=nats_url)
    port = await app.start()
    await becomes(port, SERVING)
    async with channel_as("ops", f"127.0.0.1:{port}", server_name="widgets") as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
        first = await watch.read()
        assert first.status == SERVING
        stopping = asyncio.create_task(app.stop())
        second = await asyncio.wait_for(watch.read(), 5)
        assert second.status == NOT_SERVING
        await stopping
