from __future__ import annotations

import pytest

from gpufleet.gateway.rate_limit import RateDecision, TokenBucket


def test_zero_rate_is_unlimited() -> None:
    bucket = TokenBucket(0, 0, now=0.0)
    assert bucket.unlimited
    assert all(bucket.try_acquire(0.0).allowed for _ in range(10_000))


def test_starts_full_then_refuses_with_exact_wait() -> None:
    bucket = TokenBucket(10, 3, now=0.0)
    assert [bucket.try_acquire(0.0).allowed for _ in range(3)] == [True] * 3
    # Empty: one token takes 1/10 s.
    assert bucket.try_acquire(0.0) == RateDecision(allowed=False, retry_after_ms=100)
    # Refused calls take no token: 40 ms later 60 ms remain.
    assert bucket.try_acquire(0.04) == RateDecision(allowed=False, retry_after_ms=60)
    assert bucket.try_acquire(0.1).allowed
    assert not bucket.try_acquire(0.1).allowed


def test_burst_zero_means_ceil_of_rate() -> None:
    assert TokenBucket(2.5, 0, now=0.0).capacity == 3
    assert TokenBucket(0.2, 0, now=0.0).capacity == 1
    bucket = TokenBucket(0.5, 0, now=0.0)
    assert bucket.try_acquire(0.0).allowed
    assert bucket.try_acquire(0.0) == RateDecision(allowed=False, retry_after_ms=2000)
    assert bucket.try_acquire(2.0).allowed


def test_refill_never_exceeds_burst() -> None:
    bucket = TokenBucket(100, 5, now=0.0)
    assert bucket.tokens(1_000.0) == 5
    assert sum(bucket.try_acquire(1_000.0).allowed for _ in range(20)) == 5


def test_long_run_rate_matches() -> None:
    bucket = TokenBucket(50, 1, now=0.0)
    allowed = 0
    # Offer a call every millisecond for 10 s: about rate * time get through.
    for ms in range(10_000):
        allowed += bucket.try_acquire(ms / 1000).allowed
    assert 500 <= allowed <= 501


def test_clock_going_backwards_adds_nothing() -> None:
    bucket = TokenBucket(1, 1, now=10.0)
    assert bucket.try_acquire(10.0).allowed
    assert not bucket.try_acquire(5.0).allowed
    # The backwards reading did not move the refill origin.
    assert bucket.try_acquire(11.0).allowed


def test_float_refill_does_not_refuse_a_due_call() -> None:
    bucket = TokenBucket(10, 1, now=0.0)
    now = 0.0
    for _ in range(1000):
        assert bucket.try_acquire(now).allowed
        now += 0.1


def test_wait_is_at_least_one_ms() -> None:
    bucket = TokenBucket(1_000_000, 1, now=0.0)
    assert bucket.try_acquire(0.0).allowed
    assert bucket.try_acquire(0.0) == RateDecision(allowed=False, retry_after_ms=1)


@pytest.mark.parametrize(
    ("rate", "burst"), [(-1, 0), (float("nan"), 0), (float("inf"), 0), (1, -1)]
)
def test_rejects_bad_settings(rate, burst):
    with pytest.raises(ValueError, match="must be"):
        TokenBucket(rate, burst, now=0.0)
