"""`onecard-admin status`: each service's gRPC health, and each JetStream stream and consumer.

Health is the standard grpc.health.v1 check every service answers (SERVING only once its database
and NATS are up), asked over mutual TLS as the operator. Lag comes from the JetStream API itself,
read with the operator's NATS account (services.nats_accounts: it may read stream and consumer
state, never publish): a durable consumer's lag is the messages of its stream it has not been
delivered yet (``num_pending``) plus those delivered and not yet acknowledged (``num_ack_pending``).
"""
from __future__ import annotations

import asyncio
from dataclasses import asdict, dataclass
from typing import Any

import grpc
import nats
from grpc_health.v1 import health_pb2, health_pb2_grpc

from onecard_admin.mesh import Mesh
from onecard_admin.settings import SERVICE_NAMES, AdminSettings
from runtime.nats_access import connect_options

SERVING = "SERVING"


@dataclass(frozen=True)
class ServiceRow:
    service: str
    target: str
    health: str
    detail: str = ""

    @property
    def healthy(self) -> bool:
        return self.health == SERVING


@dataclass(frozen=True)
class StreamRow:
    stream: str
    messages: int
    last_seq: int


@dataclass(frozen=True)
class ConsumerRow:
    stream: str
    consumer: str
    pending: int
    ack_pending: int
    lag: int


@dataclass(frozen=True)
class Status:
    services: list[ServiceRow]
    streams: list[StreamRow]
    consumers: list[ConsumerRow]
    nats_error: str = ""

    @property
    def healthy(self) -> bool:
        return not self.nats_error and all(row.healthy for row in self.services)

    def as_dict(self) -> dict[str, Any]:
        return {"services": [asdict(r) for r in self.services], "streams": [asdict(r) for r in self.streams],
                "consumers": [asdict(r) for r in self.consumers]}


async def _health(mesh: Mesh, service: str) -> ServiceRow:
    target = mesh.settings.target(service)
    if not target:
        return ServiceRow(service, "-", "NOT CONFIGURED")
    stub = health_pb2_grpc.HealthStub(mesh.channel(service))
    try:
        answer = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=mesh.settings.admin_timeout_s)
    except grpc.aio.AioRpcError as exc:
        return ServiceRow(service, target, "DOWN", f"{exc.code().name}: {exc.details() or ''}"[:120])
    return ServiceRow(service, target, health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status))


async def _jetstream(settings: AdminSettings, mesh: Mesh) -> tuple[list[StreamRow], list[ConsumerRow]]:
    seed = settings.nats_seed.get_secret_value() if settings.nats_seed else None
    connection = await nats.connect(
        settings.nats_url, connect_timeout=settings.admin_timeout_s, max_reconnect_attempts=0, allow_reconnect=False,
        **connect_options(name="ops", seed=seed, tls=mesh.tls, tls_name=settings.nats_tls_name))
    try:
        jetstream = connection.jsm()
        streams, consumers = [], []
        for info in sorted(await jetstream.streams_info(), key=lambda i: i.config.name):
            name = info.config.name
            streams.append(StreamRow(stream=name, messages=info.state.messages, last_seq=info.state.last_seq))
            for consumer in sorted(await jetstream.consumers_info(name), key=lambda c: c.name):
                # Ordered consumers (followers such as the gateway's) are ephemeral and unnamed by
                # config; only durable ones have a backlog anyone waits on.
                if not consumer.config.durable_name:
                    continue
                pending, ack_pending = consumer.num_pending or 0, consumer.num_ack_pending or 0
                consumers.append(ConsumerRow(stream=name, consumer=consumer.name, pending=pending,
                                             ack_pending=ack_pending, lag=pending + ack_pending))
        return streams, consumers
    finally:
        await connection.close()


async def collect(settings: AdminSettings, mesh: Mesh) -> Status:
    services = list(await asyncio.gather(*(_health(mesh, name) for name in SERVICE_NAMES)))
    try:
        streams, consumers = await asyncio.wait_for(_jetstream(settings, mesh), settings.admin_timeout_s * 2)
    except (OSError, TimeoutError, nats.errors.Error) as exc:
        return Status(services, [], [], nats_error=f"{type(exc).__name__}: {exc}"[:200] or "unreachable")
    return Status(services, streams, consumers)
