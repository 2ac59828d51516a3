"""Token bucket rate limiter for one deployment.

Time is passed in by the caller (seconds on any monotonic clock), so the bucket is pure
arithmetic and tests need no sleeping.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RateDecision:
    """The outcome of asking for one token."""

    allowed: bool
    """True: the call may proceed and a token was taken."""
    retry_after_ms: int
    """When refused: milliseconds until a token is available (at least 1). 0 when allowed."""


_ALLOWED = RateDecision(allowed=True, retry_after_ms=0)
# Refills are sums of float products; without a little slack 0.1 s at 10/s could leave
# 0.9999999 tokens and refuse a call that is due.
_EPSILON = 1e-9


class TokenBucket:
    """Allows `rate_per_second` calls per second on average and bursts of up to `burst`.

    A rate of 0 means unlimited. A burst of 0 means ceil(rate), as in TrafficSpec. The
    bucket starts full. A clock that goes backwards adds no tokens.
    """

    def __init__(self, rate_per_second: float, burst: int, *, now: float) -> None:
        if not math.isfinite(rate_per_second) or rate_per_second < 0:
            raise ValueError(
                f"rate_per_second must be a finite number >= 0 (0 = unlimited), "
                f"got {rate_per_second}"
            )
        if burst < 0:
            raise ValueError(f"burst must be >= 0 (0 = ceil(rate)), got {burst}")
        self._rate = rate_per_second
        self._capacity = float(burst) if burst > 0 else float(math.ceil(rate_per_second))
        self._tokens = self._capacity
        self._last = now

    @property
    def unlimited(self) -> bool:
        """True when the rate is 0: every call is allowed."""
        return self._rate == 0

    @property
    def capacity(self) -> float:
        """Most tokens the bucket holds (the burst)."""
        return self._capacity

    def tokens(self, now: float) -> float:
        """Tokens available at `now` (refills first)."""
        self._refill(now)
        return self._tokens

    def try_acquire(self, now: float) -> RateDecision:
        """Take one token if there is one; otherwise say how long until there will be."""
        if self._rate == 0:
            return _ALLOWED
        self._refill(now)
        if self._tokens >= 1.0 - _EPSILON:
            self._tokens = max(0.0, self._tokens - 1.0)
            return _ALLOWED
        missing = 1.0 - self._tokens
        wait_ms = math.ceil(missing / self._rate * 1000.0)
        return RateDecision(allowed=False, retry_after_ms=max(1, wait_ms))

    def _refill(self, now: float) -> None:
        elapsed = now - self._last
        if elapsed <= 0:
            return
        self._tokens = min(self._capacity, self._tokens + elapsed * self._rate)
        self._last = now
