"""Network faults between real services: ``HangingProxy`` is a real gRPC server that passes every
unary call on to a real service (request, metadata, answer and error details as they are), except
the methods it is told to hold, whose calls it takes and never answers (a link that swallows the
request) until the caller gives up."""
from __future__ import annotations

import asyncio
from collections import Counter

import grpc

# Headers gRPC sets itself on each hop.
_HOP_HEADERS = frozenset({"user-agent", "grpc-accept-encoding", "grpc-encoding", "grpc-timeout", "te",
                          "content-type"})


class HangingProxy(grpc.GenericRpcHandler):
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.held: set[str] = set()  # short method names ("Pay") whose calls are never answered
        self.calls: Counter[str] = Counter()  # short method name -> calls taken
        self.swallowed: Counter[str] = Counter()
        self._channel: grpc.aio.Channel | None = None
        self._server: grpc.aio.Server | None = None
        self.target = ""

    async def start(self) -> HangingProxy:
        self._channel = grpc.aio.insecure_channel(self.upstream)
        self._server = grpc.aio.server()
        self._server.add_generic_rpc_handlers((self,))
        port = self._server.add_insecure_port("127.0.0.1:0")
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
