"""Jittered exponential backoff between attempts to reach the control plane (pure)."""

from __future__ import annotations

import random
from collections.abc import Callable


class ReconnectBackoff:
    """Delays before successive connection attempts.

    Attempt n waits a random time in [ceiling/2, ceiling] with ceiling = min(cap, base * 2**n):
    the jitter spreads a fleet of agents that lost the control plane together, so they do
    not all knock at the same instant when it returns, and the lower half keeps a single
    agent from retrying needlessly fast. reset() after a connection that worked.
    """

    def __init__(self, base: float = 0.2, cap: float = 5.0, uniform: Callable[[float, float], float] | None = None) -> None:
        """base, cap: seconds; uniform(a, b) draws the jitter (random.uniform by default)."""
        if base <= 0 or cap < base:
            raise ValueError(f"backoff needs 0 < base <= cap, got base {base} and cap {cap}")
        self._base = base
        self._cap = cap
        self._uniform = uniform or random.uniform
        self._attempt = 0

    @property
    def attempt(self) -> int:
        """Failed attempts since the last reset."""
        return self._attempt

    def next_delay(self) -> float:
        """Seconds to wait before the next attempt; each call counts one failed attempt."""
        # The exponent is bounded so that a long outage cannot overflow the float.
        ceiling = min(self._cap, self._base * 2 ** min(self._attempt, 30))
        self._attempt += 1
        return self._uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        """Start again from the base delay."""
        self._attempt = 0
