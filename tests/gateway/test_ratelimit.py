"""The token bucket on a fake clock: burst, refill, independence of keys, bounded memory."""
from __future__ import annotations

import pytest

from gateway.ratelimit import TokenBucketLimiter, retry_after_s


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


def test_a_full_bucket_allows_the_burst_then_refuses_with_the_wait() -> None:
    clock = FakeClock()
    limiter = TokenBucketLimiter(rate_per_s=2.0, burst=3, clock=clock)
    assert [limiter.try_acquire("c") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.try_acquire("c") == pytest.approx(0.5)


def test_tokens_refill_at_the_rate_and_never_above_the_burst() -> None:
    clock = FakeClock()
    limiter = TokenBucketLimiter(rate_per_s=2.0, burst=3, clock=clock)
    for _ in range(3):
        limiter.try_acquire("c")
    clock.now_s += 0.5
    assert limiter.try_acquire("c") == 0.0
    assert limiter.try_acquire("c") > 0
    clock.now_s += 3600
    assert [limiter.try_acquire("c") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.try_acquire("c") > 0


def test_each_key_has_its_own_bucket() -> None:
    limiter = TokenBucketLimiter(rate_per_s=1.0, burst=1, clock=FakeClock())
    assert limiter.try_acquire("a") == 0.0
    assert limiter.try_acquire("a") > 0
    assert limiter.try_acquire("b") == 0.0


def test_memory_is_bounded_by_dropping_the_least_recently_used_key() -> None:
    limiter = TokenBucketLimiter(rate_per_s=1.0, burst=1, max_keys=2, clock=FakeClock())
    limiter.try_acquire("a")
    limiter.try_acquire("b")
    limiter.try_acquire("a")
    limiter.try_acquire("c")
    assert len(limiter) == 2
    # "b" was dropped, so it starts again with a full bucket; "a" was kept and is still empty.
    assert limiter.try_acquire("a") > 0
    assert limiter.try_acquire("b") == 0.0


def test_retry_after_is_whole_seconds_and_at_least_one() -> None:
    assert retry_after_s(0.01) == 1
    assert retry_after_s(1.0) == 1
    assert retry_after_s(1.2) == 2


def test_nonsense_limits_are_refused() -> None:
    with pytest.raises(ValueError):
        TokenBucketLimiter(rate_per_s=0, burst=1)
    with pytest.raises(ValueError):
        TokenBucketLimiter(rate_per_s=1, burst=0)
