"""runtime.batching: items that arrive together share one call, and each caller hears exactly what a
call of its own would have said (its answer, its refusal, or the whole call's failure)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from runtime.batching import CallBatcher, answer_each, item_error, item_refusal
from runtime.errors import FailedPrecondition
from runtime.grpc_client import error_info


class Far:
    """The far side of a batched call: answers each item after a yield to the loop, and records
    every call's items."""

    def __init__(self) -> None:
        self.calls: list[list[int]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail_whole: Exception | None = None

    async def send(self, items: list[int]) -> list:
        self.calls.append(list(items))
        await self.gate.wait()
        if self.fail_whole is not None:
            raise self.fail_whole

        async def one(n: int) -> int:
            if n < 0:
                raise FailedPrecondition("negative", reason="NEGATIVE", metadata={"n": str(n)})
            return n * 10

        return [item_refusal(a) if not isinstance(a, int) else a
                for a in await answer_each(items, one, method="Test")]


async def test_items_waiting_while_a_call_is_out_share_the_next_call() -> None:
    far = Far()
    batcher: CallBatcher[int, int] = CallBatcher(far.send, senders=1)
    far.gate.clear()
    first = asyncio.ensure_future(batcher.call(1))
    await asyncio.sleep(0)
    rest = [asyncio.ensure_future(batcher.call(n)) for n in range(2, 12)]
    await asyncio.sleep(0)
    far.gate.set()
    assert await first == 10 and await asyncio.gather(*rest) == [n * 10 for n in range(2, 12)]
    assert far.calls == [[1], list(range(2, 12))]


async def test_a_refused_item_raises_its_own_status_and_the_others_are_answered() -> None:
    far = Far()
    batcher: CallBatcher[int, int] = CallBatcher(far.send, senders=1)
    results = await asyncio.gather(batcher.call(3), batcher.call(-4), batcher.call(5), return_exceptions=True)
    assert results[0] == 30 and results[2] == 50
    refusal = results[1]
    assert isinstance(refusal, grpc.aio.AioRpcError)
    assert refusal.code() == grpc.StatusCode.FAILED_PRECONDITION and refusal.details() == "negative"
    assert error_info(refusal) == ("NEGATIVE", {"n": "-4"})


async def test_a_whole_call_failing_fails_each_of_its_items_and_the_next_call_goes_on() -> None:
    far = Far()
    batcher: CallBatcher[int, int] = CallBatcher(far.send, senders=1)
    far.fail_whole = grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata())
    results = await asyncio.gather(batcher.call(1), batcher.call(2), return_exceptions=True)
    assert all(isinstance(r, grpc.aio.AioRpcError) and r.code() == grpc.StatusCode.UNAVAILABLE for r in results)
    far.fail_whole = None
    assert await batcher.call(7) == 70


async def test_an_answer_of_the_wrong_length_is_an_error_for_every_item() -> None:
    async def short(items: list[int]) -> list[int]:
        return items[:-1]

    batcher: CallBatcher[int, int] = CallBatcher(short, senders=1)
    results = await asyncio.gather(batcher.call(1), batcher.call(2), return_exceptions=True)
    assert all(isinstance(r, grpc.aio.AioRpcError) and r.code() == grpc.StatusCode.INTERNAL for r in results)


async def test_a_caller_that_gave_up_does_not_travel() -> None:
    far = Far()
    batcher: CallBatcher[int, int] = CallBatcher(far.send, senders=1)
    far.gate.clear()
    first = asyncio.ensure_future(batcher.call(1))
    await asyncio.sleep(0)
    gone = asyncio.ensure_future(batcher.call(2))
    kept = asyncio.ensure_future(batcher.call(3))
    await asyncio.sleep(0)
    gone.cancel()
    far.gate.set()
    assert (await first, await kept) == (10, 30)
    assert far.calls == [[1], [3]]


async def test_at_most_max_items_travel_in_one_call() -> None:
    far = Far()
    batcher: CallBatcher[int, int] = CallBatcher(far.send, max_items=4, senders=1)
    far.gate.clear()
    calls = [asyncio.ensure_future(batcher.call(n)) for n in range(10)]
    await asyncio.sleep(0)
    far.gate.set()
    assert await asyncio.gather(*calls) == [n * 10 for n in range(10)]
    assert [len(c) for c in far.calls] == [4, 4, 2]


def test_an_unexpected_error_is_answered_internal_without_its_detail() -> None:
    refusal = item_refusal(item_error(RuntimeError("secret detail of a bug"), method="Test"))
    assert refusal.code() == grpc.StatusCode.INTERNAL and refusal.details() == "internal error"
    assert "secret" not in str(refusal.trailing_metadata())


def test_bad_settings_are_refused() -> None:
    async def send(items: list[int]) -> list[int]:
        return items

    with pytest.raises(ValueError):
        CallBatcher(send, max_items=0)
    with pytest.raises(ValueError):
        CallBatcher(send, max_items=257)
