"""Whether the grant a token was issued under still stands: revoking a grant or a client ends the
tokens issued under it within ``MAX_GRANT_AGE_S``, not when they expire.

A token names its client, its tenant and the version of the client's grant in that tenant when it
was issued (``gv``; identity makes a new version whenever a grant is made or its scopes change). A
token is good only while that grant is there with that version. Each replica remembers what
identity last said of each (tenant, client) it sees tokens of:

- an entry is believed for ``recheck_s`` (at most 60 s), then asked again (``GetTenantGrant``), by
  the first request that needs it while the others wait for the same answer;
- identity's events (``identity.api_client.granted`` / ``.revoked``, followed over NATS by
  gateway.identity_events) drop the entry at once, so a revocation usually ends its tokens within a
  second; when the feed is re-made (NATS reconnected; each subscription starts at "now") everything
  is dropped, since events may have passed unseen;
- the events are the fast path only: with NATS down the re-check alone still ends a revoked grant's
  tokens within ``recheck_s``;
- when identity does not answer a re-check, what it said last is used until ``MAX_GRANT_AGE_S``
  after it said it, then the request fails (503) rather than trust an older answer;
- an answer read while an event for the same grant arrived is used for the request that asked but
  not kept.

No I/O here: ``fetch`` asks identity, the event follower calls ``on_identity_event``.
"""
from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from prometheus_client import Counter

from runtime.events import Event

# The promise to partners: a revoked grant's tokens stop within this, whatever NATS does.
MAX_GRANT_AGE_S = 60.0
DEFAULT_GRANT_RECHECK_S = 30.0
DEFAULT_GRANT_CACHE_SIZE = 100_000
GRANT_EVENTS = "identity.api_client.>"

_LOOKUPS = Counter("onecard_gateway_grant_checks_total",
                   "Token grant checks: answered from memory, or asked of identity", ["source"])
FROM_MEMORY = _LOOKUPS.labels("memory")
FROM_IDENTITY = _LOOKUPS.labels("identity")
STALE = _LOOKUPS.labels("stale")
DROPPED = Counter("onecard_gateway_grants_dropped_total", "Remembered grants dropped because identity said they changed")

Key = tuple[str, str]  # (tenant id, client id)


@dataclass(frozen=True)
class Grant:
    """A client's grant in a tenant as identity last said: its version and the scopes it holds."""

    version: int
    scopes: frozenset[str]


@dataclass
class _Entry:
    grant: Grant | None  # None: no grant (revoked, or never made)
    checked_at: float


# Asks identity for (tenant, client)'s grant now: the grant, or None when there is none.
Fetch = Callable[[str, str], Awaitable[Grant | None]]


@dataclass
class GrantCache:
    fetch: Fetch
    recheck_s: float = DEFAULT_GRANT_RECHECK_S
    size: int = DEFAULT_GRANT_CACHE_SIZE
    clock: Callable[[], float] = time.monotonic
    # The identity event feed now: 0 while it is down, else a number that changes whenever it is
    # subscribed anew (whatever is held is dropped then).
    feed: Callable[[], int] = lambda: 0
    _entries: OrderedDict[Key, _Entry] = field(default_factory=OrderedDict, init=False)
    _in_flight: dict[Key, asyncio.Task[Grant | None]] = field(default_factory=dict, init=False)
    _dropped_in_flight: set[Key] = field(default_factory=set, init=False)
    _feed_seen: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if not 0 < self.recheck_s <= MAX_GRANT_AGE_S:
            raise ValueError(f"recheck_s must be in (0, {MAX_GRANT_AGE_S:g}]")

    async def current(self, *, tenant_id: str, client_id: str) -> Grant | None:
        """The client's grant in the tenant, as identity said within ``recheck_s`` (or within
        ``MAX_GRANT_AGE_S`` when identity does not answer now)."""
        self._check_feed()
        key = (tenant_id, client_id)
        entry = self._entries.get(key)
        now = self.clock()
        if entry is not None and now - entry.checked_at < self.recheck_s:
            self._entries.move_to_end(key)
            FROM_MEMORY.inc()
            return entry.grant
        try:
            return await self._ask(key)
        except Exception:
            entry = self._entries.get(key)
            if entry is not None and self.clock() - entry.checked_at < MAX_GRANT_AGE_S:
                STALE.inc()
                return entry.grant
            raise

    async def _ask(self, key: Key) -> Grant | None:
        # One question per grant at a time, in a task of its own: a caller that goes away (a
        # dropped connection) does not take the answer from the others waiting for it.
        task = self._in_flight.get(key)
        if task is None:
            task = asyncio.ensure_future(self._fetch(key))
            self._in_flight[key] = task
            task.add_done_callback(lambda done: self._settled(key, done))
        return await asyncio.shield(task)

    async def _fetch(self, key: Key) -> Grant | None:
        started, feed = self.clock(), self._feed_seen
        FROM_IDENTITY.inc()
        grant = await self.fetch(*key)
        if key not in self._dropped_in_flight and feed == self._feed_seen:
            self._entries[key] = _Entry(grant=grant, checked_at=started)
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return grant

    def _settled(self, key: Key, task: asyncio.Task[Grant | None]) -> None:
        if self._in_flight.get(key) is task:
            del self._in_flight[key]
        self._dropped_in_flight.discard(key)
        if not task.cancelled():
            task.exception()  # retrieved here, whether or not a caller still waits for it

    def drop(self, *, tenant_id: str, client_id: str) -> None:
        """Identity says this grant changed: ask again before believing it."""
        key = (tenant_id, client_id)
        if self._entries.pop(key, None) is not None:
            DROPPED.inc()
        if key in self._in_flight:
            # The answer on its way may predate the change: use it, do not keep it.
            self._dropped_in_flight.add(key)

    def on_identity_event(self, event: Event) -> None:
        """An ``identity.api_client.*`` event: drop the grant it names."""
        tenant_id, client_id = event.data.get("tenant_id"), event.data.get("client_id")
        if isinstance(tenant_id, str) and isinstance(client_id, str):
            self.drop(tenant_id=tenant_id, client_id=client_id)

    def _check_feed(self) -> None:
        feed = self.feed()
        if feed and feed != self._feed_seen:
            # A new subscription: events may have passed while there was none.
            self._entries.clear()
            self._feed_seen = feed

    def __len__(self) -> int:
        return len(self._entries)
