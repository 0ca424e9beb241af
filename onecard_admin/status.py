"""`onecard-admin status`: each service's gRPC health, version, migrations and outbox backlog;
each JetStream stream and consumer; the open device alarms.

Health is the standard grpc.health.v1 check every service answers (SERVING only once its database
and NATS are up), asked over mutual TLS as the operator. Version, migrations and the outbox come
from ``onecard.ops.v1.OpsService/GetServiceInfo``, which every server carries (runtime.ops): the
outbox backlog is what a service wrote and has not yet published to JetStream, so it is what
grows while NATS is away (when the JetStream figures below cannot be read at all). Lag comes from
the JetStream API itself, read with the operator's NATS account (services.nats_accounts: it may read stream and consumer
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

from onecard.devicehub.v1 import devicehub_pb2, devicehub_pb2_grpc
from onecard.identity.v1 import identity_pb2, identity_pb2_grpc
from onecard.ops.v1 import ops_pb2, ops_pb2_grpc
from onecard_admin.mesh import Mesh, paged
from onecard_admin.settings import SERVICE_NAMES, AdminSettings
from runtime.nats_access import connect_options

SERVING = "SERVING"
# A service whose target is set empty: the operator asked not to check it.
NOT_CONFIGURED = "NOT CONFIGURED"
# An unpublished event older than this means the relay is stuck (it publishes within a second or so).
OUTBOX_STUCK_AFTER_S = 60.0
# Open alarms are counted over at most this many tenants, and up to this many per tenant.
MAX_ALARM_TENANTS = 200
MAX_ALARMS_COUNTED = 1000
ALARM_PAGE_SIZE = 500


@dataclass(frozen=True)
class ServiceRow:
    service: str
    target: str
    health: str
    detail: str = ""
    # From OpsService.GetServiceInfo; None when it did not answer (the detail says why).
    version: str | None = None
    migrations_applied: int | None = None
    migrations_known: int | None = None
    migrations_pending: list[str] | None = None
    outbox_unpublished: int | None = None
    outbox_oldest_age_s: float | None = None

    @property
    def problems(self) -> list[str]:
        found = [] if self.health in (SERVING, NOT_CONFIGURED) else [f"health {self.health}"]
        if self.migrations_pending:
            found.append(f"migrations pending: {', '.join(self.migrations_pending)}")
        if self.outbox_oldest_age_s is not None and self.outbox_oldest_age_s > OUTBOX_STUCK_AFTER_S:
            found.append(f"outbox stuck {self.outbox_oldest_age_s:.0f} s")
        return found

    @property
    def healthy(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class AlarmRow:
    tenant_id: str
    tenant: str
    open: int


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
    # Tenants with open alarms (a tenant with none has no row); None when they could not be counted.
    alarms: list[AlarmRow] | None = None
    alarms_error: str = ""

    @property
    def healthy(self) -> bool:
        return not self.nats_error and all(row.healthy for row in self.services)

    def as_dict(self) -> dict[str, Any]:
        return {"services": [asdict(r) for r in self.services], "streams": [asdict(r) for r in self.streams],
                "consumers": [asdict(r) for r in self.consumers],
                "alarms": [asdict(r) for r in self.alarms or []]}


def _failure(exc: grpc.aio.AioRpcError) -> str:
    return f"{exc.code().name}: {exc.details() or ''}"[:120]


async def _service(mesh: Mesh, service: str) -> ServiceRow:
    target = mesh.settings.target(service)
    if not target:
        return ServiceRow(service, "-", NOT_CONFIGURED)
    timeout = mesh.settings.admin_timeout_s
    stub = health_pb2_grpc.HealthStub(mesh.channel(service))
    try:
        answer = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
    except grpc.aio.AioRpcError as exc:
        return ServiceRow(service, target, "DOWN", _failure(exc))
    health = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
    try:
        info = await ops_pb2_grpc.OpsServiceStub(mesh.channel(service)).GetServiceInfo(
            ops_pb2.GetServiceInfoRequest(), timeout=timeout)
    except grpc.aio.AioRpcError as exc:
        return ServiceRow(service, target, health, f"service info: {_failure(exc)}")
    unknown = list(info.migrations.unknown)
    return ServiceRow(
        service, target, health, f"schema migrated by a newer release: {', '.join(unknown)}"[:120] if unknown else "",
        version=info.version, migrations_applied=info.migrations.applied, migrations_known=info.migrations.known,
        migrations_pending=list(info.migrations.pending), outbox_unpublished=info.outbox.unpublished,
        outbox_oldest_age_s=info.outbox.oldest_unpublished_age_ms / 1000)


async def _open_alarms(mesh: Mesh) -> list[AlarmRow]:
    """Open alarms per tenant, over the first MAX_ALARM_TENANTS tenants (ListAlarms is per tenant)."""
    timeout = mesh.settings.admin_timeout_s
    identity = identity_pb2_grpc.IdentityServiceStub(mesh.channel("identity"))
    devicehub = devicehub_pb2_grpc.DeviceAdminServiceStub(mesh.channel("devicehub"))
    tenants = await paged(lambda token: identity.ListTenants(identity_pb2.ListTenantsRequest(
        page_size=min(ALARM_PAGE_SIZE, MAX_ALARM_TENANTS), page_token=token), timeout=timeout), "tenants",
        limit=MAX_ALARM_TENANTS)
    rows = []
    for tenant in tenants[:MAX_ALARM_TENANTS]:
        count = len(await paged(lambda token, tenant_id=tenant.tenant_id: devicehub.ListAlarms(
            devicehub_pb2.ListAlarmsRequest(tenant_id=tenant_id, state=devicehub_pb2.ALARM_STATE_OPEN,
                                            page_size=ALARM_PAGE_SIZE, page_token=token), timeout=timeout),
            "alarms", limit=MAX_ALARMS_COUNTED))
        if count:
            rows.append(AlarmRow(tenant_id=tenant.tenant_id, tenant=tenant.name, open=min(count, MAX_ALARMS_COUNTED)))
    return rows


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
    services = list(await asyncio.gather(*(_service(mesh, name) for name in SERVICE_NAMES)))
    alarms, alarms_error = None, ""
    if settings.target("identity") and settings.target("devicehub"):
        try:
            alarms = await _open_alarms(mesh)
        except grpc.aio.AioRpcError as exc:
            alarms_error = _failure(exc)
    else:
        alarms_error = "identity and devicehub are not both configured"
    try:
        streams, consumers = await asyncio.wait_for(_jetstream(settings, mesh), settings.admin_timeout_s * 2)
    except (OSError, TimeoutError, nats.errors.Error) as exc:
        return Status(services, [], [], nats_error=f"{type(exc).__name__}: {exc}"[:200] or "unreachable",
                      alarms=alarms, alarms_error=alarms_error)
    return Status(services, streams, consumers, alarms=alarms, alarms_error=alarms_error)
