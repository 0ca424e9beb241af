"""In-process limits: token buckets, one per key (an API client, or a caller address on the token
endpoint), and the token endpoint's throttle of failed sign-ins (``SignInThrottle``).

Each replica limits on its own, so N replicas allow up to N times the configured rate; that is the
price of needing no shared store, and the limit exists to stop a runaway client, not to bill one.
"""
from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# Bounds the memory a flood of distinct keys (spoofed client ids, many addresses) can take. The
# least recently used bucket is dropped first; a dropped key starts again with a full bucket.
DEFAULT_MAX_KEYS = 100_000


@dataclass
class _Bucket:
    tokens: float
    updated_s: float


class TokenBucketLimiter:
    """``rate_per_s`` requests a second on average, up to ``burst`` at once, per key."""

    def __init__(
        self,
        *,
        rate_per_s: float,
        burst: int,
        max_keys: int = DEFAULT_MAX_KEYS,
        clock: Callable[[], float] = time.monotonic,
    ):
        if rate_per_s <= 0 or burst < 1 or max_keys < 1:
            raise ValueError("rate_per_s must be > 0, burst and max_keys >= 1")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._max_keys = max_keys
        self._clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def try_acquire(self, key: str) -> float:
        """Take one token for ``key``. Answers 0 when allowed, else the seconds until one is free."""
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = _Bucket(tokens=float(self.burst), updated_s=now)
            self._buckets[key] = bucket
            if len(self._buckets) > self._max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            elapsed_s = max(0.0, now - bucket.updated_s)
            bucket.tokens = min(float(self.burst), bucket.tokens + elapsed_s * self.rate_per_s)
            bucket.updated_s = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / self.rate_per_s

    def give_back(self, key: str) -> None:
        """Return the token ``key`` took last (never above the burst)."""
        bucket = self._buckets.get(key)
        if bucket is not None:
            bucket.tokens = min(float(self.burst), bucket.tokens + 1.0)

    def __len__(self) -> int:
        return len(self._buckets)


def retry_after_s(wait_s: float) -> int:
    """The Retry-After value (whole seconds, at least 1) for a wait."""
    return max(1, math.ceil(wait_s))


# --- the token endpoint's failed sign-ins --------------------------------------------------------

DEFAULT_FREE_FAILURES = 5
DEFAULT_BACKOFF_BASE_S = 1.0
DEFAULT_BACKOFF_MAX_S = 900.0
# A pair's failures are forgotten after a day without one: a partner that mistyped once a week
# never ends up waiting.
DEFAULT_FAILURE_MEMORY_S = 24 * 3600.0
DEFAULT_CLIENT_FAILURE_BURST = 20
DEFAULT_CLIENT_FAILURES_PER_S = 1 / 60
DEFAULT_KNOWN_ADDRESS_TTL_S = 30 * 24 * 3600.0


@dataclass
class _Failures:
    count: int
    last_s: float


class Attempt:
    """One sign-in let through ``SignInThrottle.attempt``: counted as a failure until told otherwise,
    so that concurrent guesses cannot all pass before the first of them fails."""

    def __init__(self, throttle: SignInThrottle, *, pair: tuple[str, str], spent_client_budget: bool):
        self._throttle = throttle
        self._pair = pair
        self._spent = spent_client_budget
        self._open = True

    def succeeded(self) -> None:
        """The secret was right: the pair starts afresh, its address is known for the client, and
        the client's failure budget gets its token back."""
        if self._open:
            self._open = False
            self._throttle._succeeded(self._pair, refund=self._spent)

    def failed(self) -> None:
        """The secret (or client, or tenant) was wrong: the failure stays counted."""
        self._open = False

    def abandoned(self) -> None:
        """Nobody said right or wrong (identity did not answer): as if it had not been tried."""
        if self._open:
            self._open = False
            self._throttle._abandoned(self._pair, refund=self._spent)


class SignInThrottle:
    """Failed client authentications at the token endpoint, throttled where they come from, so that
    nobody elsewhere can lock a partner out by sending wrong secrets with its (public) client id.

    - Per (client id, address): ``free_failures`` failures in a row cost nothing; after that each
      attempt from that pair must wait ``backoff_base_s * 2**(n - free_failures)`` seconds (at most
      ``backoff_max_s``) after its last failure. A success clears the pair; a day without a failure
      forgets it. A correct secret from another address is never slowed by these.
    - Per client over all addresses (an attacker rotating addresses): a budget of failures, a token
      bucket of ``client_failure_burst`` refilled at ``client_failures_per_s``. Once someone has spent
      it, attempts for that client from addresses that never signed it in are refused until it
      refills; an address where the client signed in within ``known_address_ttl_s`` is never refused
      because of other addresses' failures, so the partner's own servers keep getting tokens.

    In memory and per replica, like the request buckets, each map bounded by ``max_keys`` (the least
    recently used entry goes first).
    """

    def __init__(
        self,
        *,
        free_failures: int = DEFAULT_FREE_FAILURES,
        backoff_base_s: float = DEFAULT_BACKOFF_BASE_S,
        backoff_max_s: float = DEFAULT_BACKOFF_MAX_S,
        failure_memory_s: float = DEFAULT_FAILURE_MEMORY_S,
        client_failure_burst: int = DEFAULT_CLIENT_FAILURE_BURST,
        client_failures_per_s: float = DEFAULT_CLIENT_FAILURES_PER_S,
        known_address_ttl_s: float = DEFAULT_KNOWN_ADDRESS_TTL_S,
        max_keys: int = DEFAULT_MAX_KEYS,
        clock: Callable[[], float] = time.monotonic,
    ):
        if free_failures < 0 or backoff_base_s <= 0 or backoff_max_s < backoff_base_s or max_keys < 1:
            raise ValueError("free_failures >= 0, 0 < backoff_base_s <= backoff_max_s, max_keys >= 1")
        self.free_failures = free_failures
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.failure_memory_s = failure_memory_s
        self.known_address_ttl_s = known_address_ttl_s
        self._max_keys = max_keys
        self._clock = clock
        self._failures: OrderedDict[tuple[str, str], _Failures] = OrderedDict()
        self._known: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._client_budget = TokenBucketLimiter(rate_per_s=client_failures_per_s, burst=client_failure_burst,
                                                 max_keys=max_keys, clock=clock)

    def backoff_s(self, failures: int) -> float:
        """How long an attempt waits after the last of ``failures`` failures in a row."""
        if failures < self.free_failures:
            return 0.0
        return min(self.backoff_max_s, self.backoff_base_s * 2.0 ** min(failures - self.free_failures, 62))

    def attempt(self, *, client_id: str, address: str) -> Attempt | float:
        """An ``Attempt`` to report on, or the seconds to wait before this pair may try again."""
        now = self._clock()
        pair = (client_id, address)
        failures = self._failures.get(pair)
        if failures is not None and now - failures.last_s > self.failure_memory_s:
            del self._failures[pair]
            failures = None
        if failures is not None:
            wait_s = failures.last_s + self.backoff_s(failures.count) - now
            if wait_s > 0:
                return wait_s
        known_at = self._known.get(pair)
        known = known_at is not None and now - known_at <= self.known_address_ttl_s
        spent = False
        if not known:
            wait_s = self._client_budget.try_acquire(client_id)
            if wait_s > 0:
                return wait_s
            spent = True
        if failures is None:
            failures = self._failures[pair] = _Failures(count=0, last_s=now)
            self._trim(self._failures)
        else:
            self._failures.move_to_end(pair)
        failures.count += 1
        failures.last_s = now
        return Attempt(self, pair=pair, spent_client_budget=spent)

    def _succeeded(self, pair: tuple[str, str], *, refund: bool) -> None:
        self._failures.pop(pair, None)
        self._known[pair] = self._clock()
        self._known.move_to_end(pair)
        self._trim(self._known)
        if refund:
            self._client_budget.give_back(pair[0])

    def _abandoned(self, pair: tuple[str, str], *, refund: bool) -> None:
        failures = self._failures.get(pair)
        if failures is not None:
            failures.count -= 1
            if failures.count <= 0:
                del self._failures[pair]
        if refund:
            self._client_budget.give_back(pair[0])

    def _trim(self, entries: OrderedDict[tuple[str, str], Any]) -> None:
        while len(entries) > self._max_keys:
            entries.popitem(last=False)
