"""Calls that arrive together travel together: one gRPC call carries many items (PayMany), and
each item's refusal travels as the status its own call would have failed with.

The client side (``CallBatcher``) queues each caller's item; a sender takes whatever waits (up to
``max_items``) and makes one call, and each caller gets its own answer, or exactly the
``grpc.aio.AioRpcError`` a unary call of its own would have raised (so the code that handled the
unary call's refusals handles these unchanged). Nothing waits on purpose: a lone item goes at
once; under load the items that arrive while the senders are out share the next call. A call that
fails as a whole fails each of its items with that call's error.

The server side answers each item alone (``item_error``): a DomainError becomes its status with
the ErrorInfo reason, anything else INTERNAL with no detail, logged, as the error interceptor
does for a whole call.
"""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

import grpc
from google.rpc import status_pb2

from onecard.mesh.v1 import batch_pb2
from runtime.errors import DomainError, InvalidArgument
from runtime.grpc_server import STATUS_DETAILS_METADATA, status_pb
from runtime.logs import get_logger

log = get_logger(__name__)

Item = TypeVar("Item")
Answer = TypeVar("Answer")
# A batched call's answer for one item: its answer, or its refusal.
Outcome = Answer | grpc.aio.AioRpcError

# What a batched call carries at most (the protos say 1..256).
MAX_ITEMS = 256
DEFAULT_SENDERS = 4


def item_error(exc: BaseException, *, method: str) -> batch_pb2.ItemError:
    """One item's refusal as the status its own call would have carried."""
    if isinstance(exc, DomainError):
        return batch_pb2.ItemError(status=status_pb(exc).SerializeToString())
    log.error("unhandled error in a batched item", method=method, exc_info=exc)
    internal = status_pb2.Status(code=grpc.StatusCode.INTERNAL.value[0], message="internal error")
    return batch_pb2.ItemError(status=internal.SerializeToString())


_CODES = {code.value[0]: code for code in grpc.StatusCode}


def item_refusal(error: batch_pb2.ItemError) -> grpc.aio.AioRpcError:
    """The error a unary call of the item's own would have raised."""
    try:
        status = status_pb2.Status.FromString(error.status)
    except Exception:  # noqa: BLE001 - a garbled status is the server's fault, said as such
        status = status_pb2.Status(code=grpc.StatusCode.INTERNAL.value[0], message="unreadable item status")
    code = _CODES.get(status.code, grpc.StatusCode.UNKNOWN)
    trailing = grpc.aio.Metadata((STATUS_DETAILS_METADATA, status.SerializeToString()))
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, details=status.message)


class CallBatcher(Generic[Item, Answer]):
    """Queues items for ``send`` (one call for many items, answering one outcome per item in
    order); at most ``senders`` calls out at once, each with at most ``max_items`` items."""

    def __init__(self, send: Callable[[list[Item]], Awaitable[Sequence[Outcome]]], *,
                 max_items: int = MAX_ITEMS, senders: int = DEFAULT_SENDERS):
        if not 1 <= max_items <= MAX_ITEMS or senders < 1:
            raise ValueError("max_items must be 1..256 and senders at least 1")
        self._send = send
        self._max_items = max_items
        self._senders = senders
        self._waiting: list[tuple[Item, asyncio.Future[Answer]]] = []
        self._running: set[asyncio.Task[None]] = set()

    async def call(self, item: Item) -> Answer:
        future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        if len(self._running) < self._senders:
            task = asyncio.create_task(self._drain())
            self._running.add(task)
            task.add_done_callback(self._running.discard)
        return await future

    async def _drain(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting[:self._max_items], self._waiting[self._max_items:]
            # Items whose caller gave up (cancelled) do not travel.
            batch = [(item, future) for item, future in batch if not future.done()]
            if not batch:
                continue
            try:
                outcomes = await self._send([item for item, _ in batch])
                if len(outcomes) != len(batch):
                    raise grpc.aio.AioRpcError(
                        grpc.StatusCode.INTERNAL, grpc.aio.Metadata(), grpc.aio.Metadata(),
                        details=f"a batched call answered {len(outcomes)} outcomes for {len(batch)} items")
            except asyncio.CancelledError:
                for _, future in batch:
                    future.cancel()
                raise
            except Exception as exc:  # noqa: BLE001 - every caller of the call hears of it
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), outcome in zip(batch, outcomes, strict=True):
                if future.done():
                    continue
                if isinstance(outcome, grpc.aio.AioRpcError):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)

    def close(self) -> None:
        """Stop the senders; items still waiting are cancelled."""
        for task in list(self._running):
            task.cancel()
        for _, future in self._waiting:
            future.cancel()
        self._waiting = []


async def answer_each(items: Sequence[Item], answer: Callable[[Item], Awaitable[Answer]], *, method: str
                      ) -> list[Answer | batch_pb2.ItemError]:
    """The server side: every item answered alone and concurrently (so they batch further down),
    a refusal as its ItemError; the answers in the order of the items."""
    async def one(item: Item) -> Answer | batch_pb2.ItemError:
        try:
            return await answer(item)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - mapped or hidden, never leaked
            return item_error(exc, method=method)

    return list(await asyncio.gather(*(one(item) for item in items)))


async def answer_batch(items: Sequence[Item], answer: Callable[[Item], Awaitable[Answer]], *, method: str,
                       result: Callable[..., Any], field: str, what: str) -> list[Any]:
    """A batched call's server side whole: 1..MAX_ITEMS items (else INVALID_ARGUMENT
    INVALID_BATCH, nothing done), each answered alone, as ``result(<field>=answer)`` or
    ``result(error=ItemError)``, in order."""
    if not 1 <= len(items) <= MAX_ITEMS:
        raise InvalidArgument(f"give 1..{MAX_ITEMS} {what}", reason="INVALID_BATCH")
    answers = await answer_each(items, answer, method=method)
    return [result(error=a) if isinstance(a, batch_pb2.ItemError) else result(**{field: a}) for a in answers]
