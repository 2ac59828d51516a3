"""Restart backoff and crash-loop detection (pure)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RestartPolicy:
    """How crashed instances are restarted."""

    backoff_base: float = 1.0
    """Delay before the first restart, seconds; doubles with each further crash."""
    backoff_cap: float = 60.0
    """Longest delay between restarts, seconds."""
    reset_after: float = 60.0
    """An instance that stayed ready this long before crashing starts a fresh backoff."""
    crash_loop_threshold: int = 3
    """Consecutive crashes from which the instance is reported as crash-looping."""

    def delay(self, consecutive_crashes: int) -> float:
        """Backoff before restart number `consecutive_crashes` (1-based): base * 2**(n-1)."""
        if consecutive_crashes <= 0:
            return 0.0
        # Cap the exponent so huge crash counts cannot overflow the float.
        exponent = min(consecutive_crashes - 1, 62)
        return float(min(self.backoff_cap, self.backoff_base * (2**exponent)))


@dataclass
class CrashTracker:
    """Counts consecutive crashes of one instance."""

    policy: RestartPolicy
    consecutive: int = 0

    def record_crash(self, ready_for: float) -> float:
        """Note a crash after `ready_for` seconds of continuous readiness; return the delay."""
        if ready_for >= self.policy.reset_after:
            self.consecutive = 0
        self.consecutive += 1
        return self.policy.delay(self.consecutive)

    @property
    def crash_loop(self) -> bool:
        """True once enough consecutive crashes happened without a long ready period."""
        return self.consecutive >= self.policy.crash_loop_threshold
