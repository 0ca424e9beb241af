"""The token bucket on a fake clock: burst, refill, independence of keys, bounded memory."""
from __future__ import annotations

import pytest

from gateway.ratelimit import Attempt, SignInThrottle, TokenBucketLimiter, retry_after_s


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


# --- failed sign-ins at the token endpoint ---------------------------------------------------------


def _throttle(clock: FakeClock, **overrides: float) -> SignInThrottle:
    values: dict[str, float] = {"free_failures": 3, "backoff_base_s": 1.0, "backoff_max_s": 60.0,
                                "client_failure_burst": 10, "client_failures_per_s": 0.1, "clock": clock,
                                **overrides}
    return SignInThrottle(**values)  # type: ignore[arg-type]


def _fail(throttle: SignInThrottle, client: str, address: str) -> float:
    """Try and fail: 0 when the attempt was let through, else the wait it was refused with."""
    attempt = throttle.attempt(client_id=client, address=address)
    if isinstance(attempt, Attempt):
        attempt.failed()
        return 0.0
    return attempt


def test_a_pair_fails_freely_then_waits_twice_as_long_each_time_up_to_the_cap() -> None:
    clock = FakeClock()
    throttle = _throttle(clock)
    assert [_fail(throttle, "c", "a") for _ in range(3)] == [0.0, 0.0, 0.0]
    waits = []
    for _ in range(8):
        wait_s = _fail(throttle, "c", "a")
        assert wait_s > 0
        waits.append(wait_s)
        clock.now_s += wait_s
        assert _fail(throttle, "c", "a") == 0.0
    assert waits == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]


def test_wrong_secrets_from_elsewhere_never_slow_the_right_one_from_the_partners_address() -> None:
    clock = FakeClock()
    throttle = _throttle(clock)
    first = throttle.attempt(client_id="bank", address="partner")
    assert isinstance(first, Attempt)
    first.succeeded()
    for _ in range(25):
        _fail(throttle, "bank", "attacker")
    assert _fail(throttle, "bank", "attacker") > 0
    for _ in range(5):
        ok = throttle.attempt(client_id="bank", address="partner")
        assert isinstance(ok, Attempt)
        ok.succeeded()


def test_an_attacker_rotating_addresses_spends_the_clients_budget_but_known_addresses_keep_working() -> None:
    clock = FakeClock()
    throttle = _throttle(clock)
    known = throttle.attempt(client_id="bank", address="partner")
    assert isinstance(known, Attempt)
    known.succeeded()
    # Ten failures from ten addresses spend the budget; the eleventh new address waits for a refill.
    assert [_fail(throttle, "bank", f"10.0.0.{n}") for n in range(10)] == [0.0] * 10
    assert _fail(throttle, "bank", "10.0.1.1") == pytest.approx(10.0)
    assert isinstance(throttle.attempt(client_id="bank", address="partner"), Attempt)
    # Another client's budget is its own.
    assert _fail(throttle, "other", "10.0.1.1") == 0.0
    clock.now_s += 10.0
    assert _fail(throttle, "bank", "10.0.1.1") == 0.0


def test_a_success_clears_the_pair_and_gives_the_clients_budget_back() -> None:
    clock = FakeClock()
    throttle = _throttle(clock, client_failure_burst=3)
    for _ in range(2):
        _fail(throttle, "bank", "partner")
    right = throttle.attempt(client_id="bank", address="partner")
    assert isinstance(right, Attempt)
    right.succeeded()
    # Nothing counts against the pair any more (a known address spends no budget either)...
    assert [_fail(throttle, "bank", "partner") for _ in range(3)] == [0.0, 0.0, 0.0]
    # ... and the right secret's attempt took nothing from the budget: one failure is left of three.
    assert _fail(throttle, "bank", "elsewhere") == 0.0
    assert _fail(throttle, "bank", "elsewhere") > 0


def test_concurrent_attempts_count_before_they_are_answered() -> None:
    clock = FakeClock()
    throttle = _throttle(clock)
    in_flight = [throttle.attempt(client_id="c", address="a") for _ in range(3)]
    assert all(isinstance(a, Attempt) for a in in_flight)
    assert throttle.attempt(client_id="c", address="a") == pytest.approx(1.0)


def test_an_attempt_nobody_answered_is_as_if_not_tried() -> None:
    clock = FakeClock()
    throttle = _throttle(clock, client_failure_burst=3)
    for _ in range(3):
        attempt = throttle.attempt(client_id="c", address="a")
        assert isinstance(attempt, Attempt)
        attempt.abandoned()
    assert [_fail(throttle, "c", "a") for _ in range(3)] == [0.0, 0.0, 0.0]


def test_a_days_quiet_forgets_a_pairs_failures_and_memory_is_bounded() -> None:
    clock = FakeClock()
    throttle = _throttle(clock, failure_memory_s=86_400.0, max_keys=2, backoff_max_s=3600.0)
    for _ in range(10):
        clock.now_s += 3600.0
        _fail(throttle, "c", "a")
    clock.now_s += 86_401.0
    assert _fail(throttle, "c", "a") == 0.0
    for n in range(5):
        _fail(throttle, f"c{n}", "a")
    assert len(throttle._failures) <= 2


def test_nonsense_sign_in_limits_are_refused() -> None:
    with pytest.raises(ValueError):
        SignInThrottle(backoff_base_s=0)
    with pytest.raises(ValueError):
        SignInThrottle(backoff_base_s=10, backoff_max_s=1)
