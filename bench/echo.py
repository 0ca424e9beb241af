"""``python -m bench.echo --port N``: the floor of a gRPC call in this mesh.

One process, one event loop, a ``grpc.aio`` server built as ``runtime.grpc_server.ServiceApp``
builds a service's (the same interceptor and message limits, the standard health service, mutual
TLS with its certificate from ``ONECARD_TLS_DIR`` and an allow-list checked per call), with one
method, ``/onecard.bench.v1.Echo/Echo``, that answers the request's bytes unchanged. A ratio
against it says what a service's own work costs on top of gRPC itself, TLS and caller checks
included on both sides. ``ONECARD_INSECURE_DEVELOPMENT=1`` serves it in plaintext, as a service.
"""
from __future__ import annotations

import argparse
import asyncio
import signal

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from pydantic_settings import SettingsConfigDict

from runtime.access import Authorizer, MethodRule
from runtime.cli import event_loop_factory
from runtime.grpc_server import MAX_MESSAGE_BYTES, ErrorMappingInterceptor
from runtime.logs import configure_logging
from runtime.mesh import MeshSettings, load_tls
from runtime.settings import EventLoop, load_settings

ECHO_SERVICE = "onecard.bench.v1.Echo"
ECHO_METHOD = f"/{ECHO_SERVICE}/Echo"
BENCH_HOST = "127.0.0.1"
# Who may call it: those who may call PolicyService.Evaluate, which it is the floor of.
ECHO_CALLERS = ("devicehub", "gateway")


class EchoSettings(MeshSettings):
    model_config = SettingsConfigDict(env_prefix="ONECARD_", extra="ignore", frozen=True)

    # The services' loop, so the floor is measured on what they run on (ONECARD_EVENT_LOOP).
    event_loop: EventLoop = "uvloop"


async def _echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return request


def _handler() -> grpc.GenericRpcHandler:
    # No (de)serializers: the bytes go back as they came.
    return grpc.method_handlers_generic_handler(ECHO_SERVICE, {"Echo": grpc.unary_unary_rpc_method_handler(_echo)})


async def serve(*, port: int, settings: EchoSettings) -> None:
    tls = load_tls(settings)
    authorizer = Authorizer({ECHO_METHOD: MethodRule(callers=ECHO_CALLERS)}, enforce=not settings.insecure_development)
    server = grpc.aio.server(
        interceptors=[ErrorMappingInterceptor("echo", authorizer)],
        options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                 ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)],
    )
    server.add_generic_rpc_handlers((_handler(),))
    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    address = f"{BENCH_HOST}:{port}"
    if tls is None:
        server.add_insecure_port(address)
    else:
        server.add_secure_port(address, tls.server_credentials())
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(5)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.echo")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    configure_logging(service="bench-echo", level="warning")
    settings = load_settings(EchoSettings)
    with asyncio.Runner(loop_factory=event_loop_factory(settings.event_loop)) as runner:
        runner.run(serve(port=args.port, settings=settings))


if __name__ == "__main__":
    main()
