"""Restart backoff, crash-loop detection and probe thresholds (pure logic)."""

from __future__ import annotations

from gpufleet.agent.runtime.backoff import CrashTracker, RestartPolicy
from gpufleet.agent.runtime.probes import ProbeTracker, Verdict


def test_delay_doubles_from_base_and_is_capped() -> None:
    policy = RestartPolicy(backoff_base=1.0, backoff_cap=60.0)
    assert [policy.delay(n) for n in range(1, 9)] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert policy.delay(0) == 0.0
    assert policy.delay(10_000) == 60.0


def test_crash_loop_after_threshold_quick_crashes() -> None:
    tracker = CrashTracker(RestartPolicy(backoff_base=0.5, crash_loop_threshold=3))
    delays = [tracker.record_crash(ready_for=0.0) for _ in range(3)]
    assert delays == [0.5, 1.0, 2.0]
    assert tracker.crash_loop


def test_staying_ready_long_enough_resets_backoff() -> None:
    tracker = CrashTracker(RestartPolicy(backoff_base=1.0, reset_after=60.0))
    for _ in range(4):
        tracker.record_crash(ready_for=5.0)
    assert tracker.crash_loop
    assert tracker.record_crash(ready_for=60.0) == 1.0
    assert tracker.consecutive == 1
    assert not tracker.crash_loop


def test_probe_tracker_needs_consecutive_results() -> None:
    tracker = ProbeTracker(success_threshold=2, failure_threshold=3)
    assert tracker.observe(True) == Verdict.UNKNOWN
    assert tracker.observe(False) == Verdict.UNKNOWN
    assert tracker.observe(True) == Verdict.UNKNOWN
    assert tracker.observe(True) == Verdict.PASSING
    assert tracker.observe(False) == Verdict.PASSING
    assert tracker.observe(False) == Verdict.PASSING
    assert tracker.observe(True) == Verdict.PASSING
    assert [tracker.observe(False) for _ in range(3)] == [Verdict.PASSING] * 2 + [Verdict.FAILING]
    assert tracker.observe(True) == Verdict.FAILING
    assert tracker.observe(True) == Verdict.PASSING


def test_probe_tracker_thresholds_below_one_act_as_one() -> None:
    tracker = ProbeTracker(success_threshold=0, failure_threshold=0)
    assert tracker.observe(False) == Verdict.FAILING
    assert tracker.observe(True) == Verdict.PASSING
