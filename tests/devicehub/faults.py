"""Network faults between real services: ``HangingProxy`` is a real gRPC server that passes every
unary call on to a real service (request, metadata, answer and error details as they are), except
the methods it is told to hold, whose calls it takes and never answers (a link that swallows the
request) until the caller gives up.

It stands where the network is, so it speaks the mesh's mutual TLS on both sides: to its callers
it shows the certificate of the service it fronts (``server_name``), and it passes their calls on
as ``caller`` (the one identity that calls that service in these tests)."""
from __future__ import annotations

import asyncio
from collections import Counter

import grpc

from tests.mesh import channel_as, pki

# Headers gRPC sets itself on each hop.
_HOP_HEADERS = frozenset({"user-agent", "grpc-accept-encoding", "grpc-encoding", "grpc-timeout", "te",
                          "content-type"})


class HangingProxy(grpc.GenericRpcHandler):
    def __init__(self, upstream: str, *, server_name: str = "policy", caller: str = "devicehub") -> None:
        self.upstream = upstream
        self.server_name = server_name
        self.caller = caller
        self.held: set[str] = set()  # short method names ("Pay") whose calls are never answered
        self.calls: Counter[str] = Counter()  # short method name -> calls taken
        self.swallowed: Counter[str] = Counter()
        self._channel: grpc.aio.Channel | None = None
        self._server: grpc.aio.Server | None = None
        self.target = ""

    async def start(self) -> HangingProxy:
        self._channel = channel_as(self.caller, self.upstream, server_name=self.server_name)
        self._server = grpc.aio.server()
        self._server.add_generic_rpc_handlers((self,))
        port = self._server.add_secure_port("127.0.0.1:0", pki().tls(self.server_name).server_credentials())
        await self._server.start()
        self.target = f"127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(None)
        if self._channel is not None:
            await self._channel.close()

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        short = method.rsplit("/", 1)[-1]

        async def forward(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            self.calls[short] += 1
            if short in self.held:
                self.swallowed[short] += 1
                await asyncio.Event().wait()  # never answered; ends when the caller cancels
            assert self._channel is not None
            metadata = tuple((k, v) for k, v in context.invocation_metadata() or ()
                             if not k.startswith(":") and k not in _HOP_HEADERS)
            remaining = context.time_remaining()
            call = self._channel.unary_unary(method)(
                request, metadata=metadata, timeout=remaining if remaining and remaining < 3600 else None)
            try:
                answer = await call
            except grpc.aio.AioRpcError as exc:
                context.set_trailing_metadata(exc.trailing_metadata() or ())
                await context.abort(exc.code(), exc.details() or "")
            return answer

        # No (de)serializers: the bytes pass through as they are.
        return grpc.unary_unary_rpc_method_handler(forward)
