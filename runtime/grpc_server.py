"""The gRPC server bootstrap every service uses.

The server listens with mutual TLS (runtime.mesh) and lets each call through only when the
caller its certificate names is on the method's allow-list (runtime.access); an optional
plaintext health port serves the orchestrator's probes and nothing else.

Start order: the server listens at once with health NOT_SERVING; a background task connects to
PostgreSQL and NATS (retrying), ensures the streams, runs the service's ``on_ready`` hook (relay,
consumers) and from then on a watcher keeps health SERVING only while both answer. SIGTERM puts
health back to NOT_SERVING, lets calls in flight finish within the grace period, then closes
everything in reverse order.
"""
from __future__ import annotations

import asyncio
import contextlib
import inspect
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import nats
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from google.protobuf import descriptor_pool
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from prometheus_client import Counter, Gauge, Histogram, start_http_server

from runtime.access import Authorizer, method_rules
from runtime.db import create_pool, migrate
from runtime.dbroles import is_superuser
from runtime.errors import ERROR_DOMAIN, DomainError, Unavailable
from runtime.events import StreamSpec, ensure_streams
from runtime.logs import bind_request_id, get_logger, new_request_id
from runtime.mesh import INSECURE_SETTING, MeshTLS, load_tls, peer_name
from runtime.nats_access import NatsAccess, connect_options
from runtime.ops import SERVICE_NAME as OPS_SERVICE_NAME
from runtime.ops import OpsServicer
from runtime.ops import add_to_server as add_ops_to_server
from runtime.settings import ServiceSettings

log = get_logger(__name__)

REQUEST_ID_METADATA = "x-request-id"
STATUS_DETAILS_METADATA = "grpc-status-details-bin"
DEFAULT_CONNECT_RETRY_S = 0.5
DEFAULT_CHECK_TIMEOUT_S = 2.0
MAX_MESSAGE_BYTES = 16 * 1024 * 1024

RPC_HANDLED = Counter("onecard_grpc_server_handled_total", "gRPC calls handled", ["service", "method", "code"])
RPC_SECONDS = Histogram("onecard_grpc_server_handling_seconds", "gRPC call duration", ["service", "method"])
DEPENDENCY_UP = Gauge("onecard_dependency_up", "1 when a dependency answers", ["service", "dependency"])


def status_pb(error: DomainError) -> status_pb2.Status:
    """The google.rpc.Status of a refusal: its code, its message and an ErrorInfo with its reason."""
    info = error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN, metadata=error.metadata)
    detail = any_pb2.Any()
    detail.Pack(info)
    return status_pb2.Status(code=error.code.value[0], message=error.message, details=[detail])


def status_trailer(error: DomainError) -> tuple[tuple[str, bytes], ...]:
    """The google.rpc.Status trailer carrying an ErrorInfo with the error's reason."""
    return ((STATUS_DETAILS_METADATA, status_pb(error).SerializeToString()),)


def connection_age_options(max_age_s: float) -> list[tuple[str, int]]:
    """Server options that recycle each client connection after ``max_age_s`` (gRPC adds up to
    10 % jitter, so clients do not all reconnect at once); calls in flight are left to finish."""
    return [("grpc.max_connection_age_ms", int(max_age_s * 1000))]

class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """The one interceptor of every server: binds a request id, lets the call through only when
    ``authorizer`` allows its caller (the name in its client certificate), records metrics, and
    turns domain errors into status codes.

    Anything that is not a DomainError is logged here and answered as INTERNAL with no detail.
    """

    def __init__(self, service: str, authorizer: Authorizer | None = None):
        self._service = service
        self._authorizer = authorizer

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None:
            return None
        full_method = details.method
        method = full_method.rsplit("/", 1)[-1]
        service = self._service
        authorizer = self._authorizer

        def begin(context: grpc.aio.ServicerContext) -> float:
            metadata = dict(context.invocation_metadata() or ())
            request_id = metadata.get(REQUEST_ID_METADATA) or new_request_id()
            bind_request_id(str(request_id)[:64])
            if authorizer is not None:
                refusal = authorizer.refusal(full_method, peer_name(context))
                if refusal is not None:
                    log.warning("call refused", method=full_method, reason=refusal.reason,
                                caller=refusal.metadata.get("caller"), peer=context.peer())
                    raise refusal
            return time.perf_counter()

        async def fail(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
            if isinstance(exc, DomainError):
                RPC_HANDLED.labels(service, method, exc.code.name).inc()
                await context.abort(exc.code, exc.message, trailing_metadata=status_trailer(exc))
            log.error("unhandled error", method=method, exc_info=exc)
            RPC_HANDLED.labels(service, method, "INTERNAL").inc()
            await context.abort(grpc.StatusCode.INTERNAL, "internal error")

        def done(started: float, context: grpc.aio.ServicerContext) -> None:
            RPC_SECONDS.labels(service, method).observe(time.perf_counter() - started)
            code = context.code() if hasattr(context, "code") else None
            RPC_HANDLED.labels(service, method, (code or grpc.StatusCode.OK).name).inc()

        if handler.unary_unary or handler.stream_unary:
            inner = handler.unary_unary or handler.stream_unary

            async def unary_response(request: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    started = begin(context)
                    response = await inner(request, context)
                except (asyncio.CancelledError, grpc.aio.AbortError):
                    raise
                except Exception as exc:  # noqa: BLE001 - mapped or hidden, never leaked
                    await fail(context, exc)
                done(started, context)
                return response

            factory = grpc.unary_unary_rpc_method_handler if handler.unary_unary else grpc.stream_unary_rpc_method_handler
            return factory(
                unary_response,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )

        inner_stream = handler.unary_stream or handler.stream_stream

        async def stream_response(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                started = begin(context)
                async for item in inner_stream(request, context):
                    yield item
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception as exc:  # noqa: BLE001
                await fail(context, exc)
            done(started, context)

        async def stream_by_writes(request: Any, context: grpc.aio.ServicerContext) -> Any:
            # Handlers that answer with context.write() (health's Watch) are coroutines, not generators.
            try:
                started = begin(context)
                await inner_stream(request, context)
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception as exc:  # noqa: BLE001
                await fail(context, exc)
            done(started, context)

        wrapper = stream_response if inspect.isasyncgenfunction(inner_stream) else stream_by_writes
        factory = grpc.unary_stream_rpc_method_handler if handler.unary_stream else grpc.stream_stream_rpc_method_handler
        return factory(
            wrapper,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


async def _log_nats_error(exc: Exception) -> None:
    # The server's own words (a permissions violation names the subject), never a credential.
    log.warning("nats error", error=type(exc).__name__, detail=str(exc)[:200])


async def _log_nats_disconnected() -> None:
    log.warning("nats disconnected")


async def _log_nats_reconnected() -> None:
    log.info("nats reconnected")


Register = Callable[[grpc.aio.Server, "ServiceApp"], None]
Hook = Callable[["ServiceApp"], Awaitable[None]]


@dataclass(frozen=True)
class TerminalListener:
    """A second server, for terminals on the campus network: server TLS with no client
    certificate (a terminal proves itself by its key inside the call), serving only the methods
    whose allow-list says ``terminals`` (and health). Nothing of the mesh's own API listens there.

    ``tls_dir`` holds the certificate terminals see (the public name they dial); None: the
    process's mesh certificate."""

    register: Register
    service_names: list[str]
    port: int = 0
    tls_dir: Path | None = None


@dataclass
class ServiceApp:
    """One service process: its gRPC server, pool, NATS connection and background tasks."""

    name: str
    settings: ServiceSettings
    schema: str
    migrations_dir: Path
    register: Register
    service_names: list[str]
    streams: list[StreamSpec] = field(default_factory=list)
    on_ready: Hook | None = None
    # Runs first when the service stops, before the server drains its calls: for work that must end
    # calls which never end by themselves (open streams), so the drain does not wait its grace out.
    on_stop: Hook | None = None
    migrate_on_start: bool = True
    terminals: TerminalListener | None = None
    # What the service does on NATS: its account's permissions are derived from this alone.
    nats_access: NatsAccess = field(default_factory=NatsAccess)

    port: int = field(default=0, init=False)
    health_port: int = field(default=0, init=False)
    terminal_port: int = field(default=0, init=False)
    terminal_tls: MeshTLS | None = field(default=None, init=False)
    metrics_port: int = field(default=0, init=False)
    tls: MeshTLS | None = field(default=None, init=False)
    health: HealthServicer = field(default_factory=HealthServicer, init=False)
    _pool: asyncpg.Pool | None = field(default=None, init=False)
    _nc: NATS | None = field(default=None, init=False)
    _js: JetStreamContext | None = field(default=None, init=False)
    _server: grpc.aio.Server | None = field(default=None, init=False)
    _terminal_server: grpc.aio.Server | None = field(default=None, init=False)
    _tasks: list[asyncio.Task[Any]] = field(default_factory=list, init=False)
    _ready: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    # Set, with the reason, when the service must not go on (its database role is a superuser).
    fatal: str | None = field(default=None, init=False)
    _failed: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    _serving: bool = field(default=False, init=False)
    _stopping: bool = field(default=False, init=False)

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise Unavailable(f"{self.name} is starting: database not connected yet", reason="STARTING")
        return self._pool

    @property
    def js(self) -> JetStreamContext:
        if self._js is None:
            raise Unavailable(f"{self.name} is starting: NATS not connected yet", reason="STARTING")
        return self._js

    @property
    def nc(self) -> NATS:
        if self._nc is None:
            raise Unavailable(f"{self.name} is starting: NATS not connected yet", reason="STARTING")
        return self._nc

    def spawn(self, coro: Awaitable[Any], *, name: str) -> asyncio.Task[Any]:
        """Run a background task for the life of the process; it is cancelled at shutdown."""
        task = asyncio.ensure_future(coro)
        task.set_name(f"{self.name}:{name}")
        task.add_done_callback(self._task_done)
        self._tasks.append(task)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("background task died", task=task.get_name(), exc_info=task.exception())

    async def _set_serving(self, serving: bool) -> None:
        if self._stopping:
            serving = False
        if serving == self._serving and self._ready.is_set():
            return
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for svc in ["", *self.health_names]:
            await self.health.set(svc, status)
        if serving != self._serving:
            log.info("health changed", serving=serving)
        self._serving = serving

    @property
    def health_names(self) -> list[str]:
        return [*self.service_names, *(self.terminals.service_names if self.terminals else [])]

    def authorizer(self, *, terminals: bool = False) -> Authorizer:
        """The allow-list of this server's methods (from the protos), or of the terminal
        listener's, enforced unless the process runs in insecure development mode."""
        pool = descriptor_pool.Default()
        # Every mesh server carries OpsService too (runtime.ops); the device port does not.
        names = self.terminals.service_names if terminals and self.terminals else [*self.service_names,
                                                                                   OPS_SERVICE_NAME]
        descriptors = []
        for name in names:
            with contextlib.suppress(KeyError):  # no descriptor, no rules: nobody may call it
                descriptors.append(pool.FindServiceByName(name))
        return Authorizer(method_rules(descriptors), enforce=not self.settings.insecure_development,
                          terminals_port=terminals)

    async def start(self) -> int:
        """Listen, with health NOT_SERVING, and begin connecting. Answers the bound port."""
        tls = load_tls(self.settings)
        if tls is None:
            log.warning("insecure development mode: plaintext gRPC, every caller allowed")
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ]
        mesh_options = [*options, *connection_age_options(self.settings.grpc_max_connection_age_s)]
        server = grpc.aio.server(interceptors=[ErrorMappingInterceptor(self.name, self.authorizer())],
                                 options=mesh_options)
        self.register(server, self)
        add_ops_to_server(server, OpsServicer(service=self.name, schema=self.schema,
                                              migrations_dir=self.migrations_dir, pool=lambda: self.pool))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            [*self.service_names, OPS_SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME],
            server,
        )
        for svc in ["", *self.health_names]:
            await self.health.set(svc, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.port = self._listen(server, tls)
        await server.start()
        self._server = server
        self.tls = tls
        if self.terminals is not None:
            await self._start_terminal_server(self.terminals, tls, options)
        metrics_server, _thread = start_http_server(self.settings.metrics_port, addr=self.settings.grpc_host)
        self.metrics_port = metrics_server.server_port
        self._metrics_server = metrics_server
        log.info("listening", grpc_port=self.port, health_port=self.health_port or None,
                 metrics_port=self.metrics_port, identity=tls.name if tls else None)
        self.spawn(self._connect_and_watch(), name="dependencies")
        return self.port

    async def _start_terminal_server(self, listener: TerminalListener, tls: MeshTLS | None,
                                     options: list[tuple[str, int]]) -> None:
        server = grpc.aio.server(
            interceptors=[ErrorMappingInterceptor(self.name, self.authorizer(terminals=True))], options=options)
        listener.register(server, self)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        address = f"{self.settings.grpc_host}:{listener.port}"
        if tls is None:
            self.terminal_port = server.add_insecure_port(address)
        else:
            self.terminal_tls = MeshTLS.load(listener.tls_dir, mesh_name=False) if listener.tls_dir else tls
            self.terminal_port = server.add_secure_port(address, self.terminal_tls.server_only_credentials())
        await server.start()
        self._terminal_server = server
        log.info("listening for terminals", port=self.terminal_port)

    def _listen(self, server: grpc.aio.Server, tls: MeshTLS | None) -> int:
        settings = self.settings
        address = f"{settings.grpc_host}:{settings.grpc_port}"
        port = server.add_secure_port(address, tls.server_credentials()) if tls else server.add_insecure_port(address)
        if settings.health_port is not None:
            # Plaintext, for probes that cannot present a certificate: no caller identity, so the
            # allow-list answers every method but health UNAUTHENTICATED.
            self.health_port = server.add_insecure_port(f"{settings.grpc_host}:{settings.health_port}")
        return port

    async def wait_ready(self, timeout_s: float | None = None) -> None:
        ready = asyncio.ensure_future(self._ready.wait())
        failed = asyncio.ensure_future(self._failed.wait())
        try:
            await asyncio.wait_for(asyncio.wait([ready, failed], return_when=asyncio.FIRST_COMPLETED), timeout_s)
        finally:
            ready.cancel()
            failed.cancel()
        if self.fatal is not None:
            raise RuntimeError(self.fatal)

    def _fail(self, reason: str) -> None:
        self.fatal = reason
        log.error("refusing to run", reason=reason)
        self._failed.set()

    async def _connect_and_watch(self) -> None:
        settings = self.settings
        checked_role = False
        while self._pool is None:
            try:
                if not checked_role:
                    # Before anything is written: tables a superuser made would not be the role's.
                    conn = await asyncpg.connect(settings.database_url, timeout=DEFAULT_CHECK_TIMEOUT_S)
                    try:
                        superuser = await is_superuser(conn)
                    finally:
                        await conn.close()
                    if superuser and not settings.insecure_development:
                        self._fail(f"{self.name} connects to PostgreSQL as a superuser; give it its own role "
                                   f"(runtime.dbroles), or set {INSECURE_SETTING}=1 for development only")
                        return
                    checked_role = True
                if self.migrate_on_start:
                    await migrate(settings.database_url, schema=self.schema, migrations_dir=self.migrations_dir)
                self._pool = await create_pool(settings.database_url, schema=self.schema)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncio.TimeoutError) as exc:
                DEPENDENCY_UP.labels(self.name, "postgres").set(0)
                log.info("waiting for postgres", error=type(exc).__name__)
                await asyncio.sleep(DEFAULT_CONNECT_RETRY_S)
        while self._nc is None:
            try:
                seed = settings.nats_seed.get_secret_value() if settings.nats_seed else None
                nc = await nats.connect(
                    settings.nats_url,
                    name=f"onecard-{self.name}",
                    **connect_options(name=self.name, seed=seed, tls=self.tls, tls_name=settings.nats_tls_name),
                    connect_timeout=2,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5,
                    drain_timeout=max(1, int(settings.shutdown_grace_s)),
                    error_cb=_log_nats_error,
                    disconnected_cb=_log_nats_disconnected,
                    reconnected_cb=_log_nats_reconnected,
                )
                self._js = nc.jetstream()
                await ensure_streams(self._js, self.streams, replicas=settings.stream_replicas)
                self._nc = nc
            except Exception as exc:  # noqa: BLE001 - any failure to reach NATS: retry
                DEPENDENCY_UP.labels(self.name, "nats").set(0)
                log.info("waiting for nats", error=type(exc).__name__)
                await asyncio.sleep(DEFAULT_CONNECT_RETRY_S)
        if self.on_ready is not None:
            await self.on_ready(self)
        await self._set_serving(await self._dependencies_up())
        self._ready.set()
        while True:
            await asyncio.sleep(settings.health_interval_s)
            await self._set_serving(await self._dependencies_up())

    async def _dependencies_up(self) -> bool:
        pg_up = False
        try:
            async with asyncio.timeout(DEFAULT_CHECK_TIMEOUT_S):
                async with self.pool.acquire() as conn:
                    pg_up = await conn.fetchval("SELECT 1") == 1
        except Exception:  # noqa: BLE001 - any failure means down
            pg_up = False
        nats_up = self._nc is not None and self._nc.is_connected
        DEPENDENCY_UP.labels(self.name, "postgres").set(int(pg_up))
        DEPENDENCY_UP.labels(self.name, "nats").set(int(nats_up))
        return pg_up and nats_up

    async def stop(self) -> None:
        """NOT_SERVING, drain calls within the grace period, then close in reverse order."""
        if self._stopping:
            return
        self._stopping = True
        await self.health.enter_graceful_shutdown()
        if self.on_stop is not None:
            try:
                await asyncio.wait_for(self.on_stop(self), self.settings.shutdown_grace_s)
            except Exception as exc:  # noqa: BLE001 - stopping goes on whatever the hook did
                log.warning("on_stop hook failed", error=type(exc).__name__)
        servers = [s for s in (self._terminal_server, self._server) if s is not None]
        await asyncio.gather(*(server.stop(self.settings.shutdown_grace_s) for server in servers))
        for task in reversed(self._tasks):
            task.cancel()
        if self._tasks:
            # Bounded: a task that swallows its cancellation must not hold the process up.
            _done, stuck = await asyncio.wait(self._tasks, timeout=self.settings.shutdown_grace_s)
            for task in stuck:
                log.warning("background task ignored cancellation", task=task.get_name())
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.drain()
        if self._pool is not None:
            try:
                await asyncio.wait_for(self._pool.close(), self.settings.shutdown_grace_s)
            except Exception:  # noqa: BLE001 - a connection still held: close the rest by force
                # rather than leave them open until the database server goes.
                log.warning("database pool did not close in time; terminated")
                self._pool.terminate()
        if getattr(self, "_metrics_server", None) is not None:
            self._metrics_server.shutdown()
        log.info("stopped")

    async def run_until_signalled(self) -> None:
        """Serve until SIGTERM or SIGINT, then stop gracefully."""
        await self.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        failed = asyncio.ensure_future(self._failed.wait())
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait([failed, stopped], return_when=asyncio.FIRST_COMPLETED)
        failed.cancel()
        stopped.cancel()
        log.info("shutting down")
        await self.stop()
        if self.fatal is not None:
            raise SystemExit(f"{self.name}: {self.fatal}")
