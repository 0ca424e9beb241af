"""The gateway's memory of token grants (gateway.grants), on a fake clock and a fake identity."""
from __future__ import annotations

import asyncio

import pytest

from gateway.grants import MAX_GRANT_AGE_S, Grant, GrantCache
from runtime.events import Event

GRANT = Grant(version=3, scopes=frozenset({"members:read"}))


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


class FakeIdentity:
    """Answers what ``grants`` holds; counts the questions; fails while ``down``."""

    def __init__(self) -> None:
        self.grants: dict[tuple[str, str], Grant] = {("t", "c"): GRANT}
        self.asked = 0
        self.down = False
        self.gate: asyncio.Event | None = None

    async def __call__(self, tenant_id: str, client_id: str) -> Grant | None:
        self.asked += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.down:
            raise ConnectionError("identity is away")
        return self.grants.get((tenant_id, client_id))


def _event(tenant_id: str, client_id: str) -> Event:
    return Event(event_id="e", type="identity.api_client.revoked", tenant_id=tenant_id, occurred_at="",
                 data={"tenant_id": tenant_id, "client_id": client_id})


async def test_an_answer_is_believed_for_the_recheck_then_asked_again() -> None:
    clock, identity = FakeClock(), FakeIdentity()
    cache = GrantCache(fetch=identity, recheck_s=30, clock=clock)
    assert await cache.current(tenant_id="t", client_id="c") == GRANT
    clock.now_s += 29
    assert await cache.current(tenant_id="t", client_id="c") == GRANT
    assert identity.asked == 1
    del identity.grants[("t", "c")]
    clock.now_s += 1
    assert await cache.current(tenant_id="t", client_id="c") is None
    assert identity.asked == 2


async def test_concurrent_requests_share_one_question() -> None:
    identity = FakeIdentity()
    identity.gate = asyncio.Event()
    cache = GrantCache(fetch=identity, clock=FakeClock())
    waiting = [asyncio.ensure_future(cache.current(tenant_id="t", client_id="c")) for _ in range(5)]
    await asyncio.sleep(0)
    identity.gate.set()
    assert await asyncio.gather(*waiting) == [GRANT] * 5
    assert identity.asked == 1


async def test_an_event_drops_the_grant_so_the_next_request_asks() -> None:
    identity = FakeIdentity()
    cache = GrantCache(fetch=identity, clock=FakeClock())
    await cache.current(tenant_id="t", client_id="c")
    del identity.grants[("t", "c")]
    cache.on_identity_event(_event("t", "c"))
    assert await cache.current(tenant_id="t", client_id="c") is None
    cache.on_identity_event(_event("t", "someone-else"))
    assert len(cache) == 1


async def test_an_answer_in_flight_when_its_grant_changed_is_used_once_not_kept() -> None:
    identity = FakeIdentity()
    identity.gate = asyncio.Event()
    cache = GrantCache(fetch=identity, clock=FakeClock())
    asking = asyncio.ensure_future(cache.current(tenant_id="t", client_id="c"))
    await asyncio.sleep(0)
    cache.on_identity_event(_event("t", "c"))
    identity.gate.set()
    assert await asking == GRANT
    assert len(cache) == 0
    await cache.current(tenant_id="t", client_id="c")
    assert identity.asked == 2


async def test_with_identity_away_the_last_answer_holds_until_the_maximum_age_then_fails() -> None:
    clock, identity = FakeClock(), FakeIdentity()
    cache = GrantCache(fetch=identity, recheck_s=30, clock=clock)
    await cache.current(tenant_id="t", client_id="c")
    identity.down = True
    clock.now_s += MAX_GRANT_AGE_S - 1
    assert await cache.current(tenant_id="t", client_id="c") == GRANT
    clock.now_s += 1
    with pytest.raises(ConnectionError):
        await cache.current(tenant_id="t", client_id="c")
    # Never known: fails at once.
    with pytest.raises(ConnectionError):
        await cache.current(tenant_id="t", client_id="other")


async def test_a_new_event_subscription_drops_everything() -> None:
    identity = FakeIdentity()
    feed = {"subscriptions": 1}
    cache = GrantCache(fetch=identity, clock=FakeClock(), feed=lambda: feed["subscriptions"])
    await cache.current(tenant_id="t", client_id="c")
    await cache.current(tenant_id="t", client_id="c")
    assert identity.asked == 1
    feed["subscriptions"] = 2  # NATS came back: events may have passed unseen
    await cache.current(tenant_id="t", client_id="c")
    assert identity.asked == 2


def test_a_recheck_longer_than_the_promise_is_refused() -> None:
    with pytest.raises(ValueError):
        GrantCache(fetch=FakeIdentity(), recheck_s=MAX_GRANT_AGE_S + 1)
