"""Time for the admission controller: now() plus one-shot timers.

Production code uses `LoopClock` (the running asyncio loop's monotonic time). Tests and
simulations use `ManualClock`, whose time moves only when told to, so queue timeouts and
idle clocks are exact and no test sleeps.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable
from typing import Protocol


class TimerHandle(Protocol):
    """A scheduled callback that can be called off; `asyncio.TimerHandle` fits."""

    def cancel(self) -> None:
        """Make sure the callback does not run (no effect if it already ran)."""
        ...


class Clock(Protocol):
    """Monotonic seconds and timers on the same time line."""

    def now(self) -> float:
        """Current time in seconds; only differences are meaningful."""
        ...

    def call_at(self, when: float, callback: Callable[[], None]) -> TimerHandle:
        """Run `callback` once, on the event loop thread, when now() reaches `when`."""
        ...


class LoopClock:
    """The running event loop's clock (`loop.time()`, `loop.call_at`)."""

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    def call_at(self, when: float, callback: Callable[[], None]) -> TimerHandle:
        return asyncio.get_running_loop().call_at(when, callback)


class _ManualTimer:
    __slots__ = ("when", "callback", "cancelled")

    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class ManualClock:
    """A clock that stands still until `advance` moves it; timers fire inside `advance`."""

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self._timers: list[tuple[float, int, _ManualTimer]] = []
        self._order = itertools.count()

    def now(self) -> float:
        return self._now

    def call_at(self, when: float, callback: Callable[[], None]) -> TimerHandle:
        timer = _ManualTimer(when, callback)
        heapq.heappush(self._timers, (when, next(self._order), timer))
        return timer

    @property
    def pending_timers(self) -> int:
        """Timers scheduled and neither fired nor cancelled."""
        return sum(1 for _, _, t in self._timers if not t.cancelled)

    def advance(self, seconds: float) -> None:
        """Move time forward, firing due timers in time order (ties in scheduling order)."""
        if seconds < 0:
            raise ValueError(f"a clock only moves forward; got advance({seconds})")
        target = self._now + seconds
        while self._timers and self._timers[0][0] <= target:
            when, _, timer = heapq.heappop(self._timers)
            if timer.cancelled:
                continue
            self._now = max(self._now, when)
            timer.callback()
        self._now = target
