"""Network faults between real services: ``HangingProxy`` is a real gRPC server that passes every
unary call on to a real service (request, metadata, answer and error details as they are), except
the methods it is told to hold, whose calls it takes and never answers (a link that swallows the
request) until the caller gives up, the ones it is told to delay (passed on after a while, so they
may arrive after the caller gave up), and the ones whose answers it delays (the call is carried
out at once, its answer held back: a link that fails between the booking and the answer).

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
        self.delay_s: dict[str, float] = {}  # short method name -> seconds before passing it on
        self.answer_delay_s: dict[str, float] = {}  # short method name -> seconds before answering
        self.calls: Counter[str] = Counter()  # short method name -> calls taken
        self.swallowed: Counter[str] = Counter()
        self._channel: grpc.aio.Channel | None = None
        self._carried: set[asyncio.Future] = set()
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

    async def settled(self) -> None:
        """Until every call the link passed on has its answer (or failed)."""
        while self._carried:
            await asyncio.gather(*self._carried, return_exceptions=True)

    async def stop(self) -> None:
        await self.settled()
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
            # Passed on in a task of its own, without the caller's deadline: a caller that gives up
            # (or dies) does not stop what the link already carries.
            delay = self.delay_s.get(short, 0.0)

            async def carry() -> bytes:
                if delay:
                    await asyncio.sleep(delay)
                return await self._channel.unary_unary(method)(request, metadata=metadata, timeout=30)

            carried = asyncio.ensure_future(carry())
            self._carried.add(carried)
            carried.add_done_callback(self._carried.discard)
            try:
                answer = await asyncio.shield(carried)
            except grpc.aio.AioRpcError as exc:
                context.set_trailing_metadata(exc.trailing_metadata() or ())
                await context.abort(exc.code(), exc.details() or "")
            if self.answer_delay_s.get(short):
                await asyncio.sleep(self.answer_delay_s[short])
            return answer

        # No (de)serializers: the bytes pass through as they are.
        return grpc.unary_unary_rpc_method_handler(forward)
