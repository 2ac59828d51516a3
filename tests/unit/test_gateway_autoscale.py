from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpufleet.gateway.autoscale import (
    AutoscaleContext,
    AutoscaleState,
    InstanceLoad,
    decide,
)
from gpufleet.gateway.config import ScalingConfig

NOW = 10_000.0


def ready(instance_id: str, idle: float = 0.0) -> InstanceLoad:
    return InstanceLoad(instance_id, ready=True, idle_s=idle)


def starting(instance_id: str) -> InstanceLoad:
    return InstanceLoad(instance_id, ready=False)


BASE = ScalingConfig(
    min_instances=0,
    max_instances=10,
    target_concurrency=1.0,
    idle_retention_s=300.0,
    scale_up_delay_s=0.0,
    scale_down_delay_s=60.0,
)


def config(**overrides: Any) -> ScalingConfig:
    return dataclasses.replace(BASE, **overrides)


CASES = [
    # id, config overrides, instances, in_flight, queued, state, desired, release, state after
    ("scale from zero ignores the up delay", dict(scale_up_delay_s=3600), [], 0, 1,
     AutoscaleState(), 1, (), AutoscaleState()),
    ("scale from zero starts one even under heavy load", dict(max_instances=3), [], 2, 8,
     AutoscaleState(), 1, (), AutoscaleState()),
    ("standby with no load", {}, [], 0, 0, AutoscaleState(), 0, (), AutoscaleState()),
    ("min instances kept with no load", dict(min_instances=2), [], 0, 0,
     AutoscaleState(), 2, (), AutoscaleState()),
    ("from zero, min wins over one", dict(min_instances=3), [], 0, 1,
     AutoscaleState(), 3, (), AutoscaleState()),
    ("up at once without delay", {}, [ready("a")], 1, 3, AutoscaleState(), 4, (),
     AutoscaleState(above_since=NOW)),
    ("up waits for the delay", dict(scale_up_delay_s=30), [ready("a")], 1, 3,
     AutoscaleState(), 1, (), AutoscaleState(above_since=NOW)),
    ("up after the delay", dict(scale_up_delay_s=30), [ready("a")], 1, 3,
     AutoscaleState(above_since=NOW - 30), 4, (), AutoscaleState(above_since=NOW - 30)),
    ("up bounded by max", dict(max_instances=5), [ready("a")], 1, 99,
     AutoscaleState(), 5, (), AutoscaleState(above_since=NOW)),
    ("starting instances count", {}, [ready("a"), starting("b"), starting("c")], 1, 2,
     AutoscaleState(above_since=NOW - 5), 3, (), AutoscaleState()),
    ("fractional target", dict(target_concurrency=0.1, max_instances=100),
     [ready("a")], 3, 0, AutoscaleState(), 30, (), AutoscaleState(above_since=NOW)),
    ("target above one", dict(target_concurrency=4), [ready("a")], 5, 0,
     AutoscaleState(), 2, (), AutoscaleState(above_since=NOW)),
    ("down waits for the delay", {},
     [ready("a"), ready("b"), ready("c"), ready("d")], 1, 0,
     AutoscaleState(), 4, (), AutoscaleState(below_since=NOW)),
    ("down after the delay releases idlest first", {},
     [ready("a", 0), ready("b", 50), ready("c", 10), ready("d", 0)], 1, 0,
     AutoscaleState(below_since=NOW - 60), 1, ("b", "c", "a"),
     AutoscaleState(below_since=NOW - 60)),
    ("load alone never goes below one", {}, [ready("a", 10), ready("b", 20)], 0, 0,
     AutoscaleState(below_since=NOW - 600), 1, ("b",), AutoscaleState(below_since=NOW - 600)),
    ("idle below retention is kept", {}, [ready("a", 299.9)], 0, 0,
     AutoscaleState(below_since=NOW - 600), 1, (), AutoscaleState(below_since=NOW - 600)),
    ("idle for retention is released to zero", {}, [ready("a", 300)], 0, 0,
     AutoscaleState(below_since=NOW - 600), 0, ("a",), AutoscaleState(below_since=NOW - 600)),
    ("idle release ignores the down delay", dict(scale_down_delay_s=3600),
     [ready("a", 400), ready("b", 500), ready("c", 301)], 0, 0,
     AutoscaleState(), 0, ("b", "a", "c"), AutoscaleState(below_since=NOW)),
    ("idle release keeps min", dict(min_instances=1), [ready("a", 900), ready("b", 1000)], 0, 0,
     AutoscaleState(), 1, ("b",), AutoscaleState(below_since=NOW)),
    ("idle release keeps what the load needs", {},
     [ready("a"), ready("b"), ready("c", 400)], 2, 0,
     AutoscaleState(), 2, ("c",), AutoscaleState(below_since=NOW)),
    ("starting instances are never idle", {}, [starting("a"), starting("b")], 0, 0,
     AutoscaleState(), 2, (), AutoscaleState(below_since=NOW)),
    ("over max: starting first, then idlest ready", dict(max_instances=2),
     [ready("a", 5), ready("b", 1), starting("c"), ready("d", 9)], 4, 0,
     AutoscaleState(), 2, ("c", "d"), AutoscaleState()),
    ("under min: up at once", dict(min_instances=3, scale_up_delay_s=600), [ready("a")], 0, 0,
     AutoscaleState(), 3, (), AutoscaleState(below_since=NOW)),
    ("steady load clears the timers", {}, [ready("a"), ready("b")], 2, 0,
     AutoscaleState(above_since=NOW - 1, below_since=NOW - 2), 2, (), AutoscaleState()),
    ("falling load resets the up timer", dict(scale_up_delay_s=30), [ready("a"), ready("b")], 1, 0,
     AutoscaleState(above_since=NOW - 20), 2, (), AutoscaleState(below_since=NOW)),
]


@pytest.mark.parametrize(
    ("overrides", "instances", "in_flight", "queued", "state", "desired", "release", "after"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_decisions(overrides, instances, in_flight, queued, state, desired, release, after):
    context = AutoscaleContext(config(**overrides), tuple(instances), in_flight, queued, NOW)
    decision, new_state = decide(context, state)
    assert (decision.desired, decision.release, new_state) == (desired, release, after)
    assert decision.reason


def test_reason_explains_a_held_scale_up() -> None:
    context = AutoscaleContext(config(scale_up_delay_s=30), (ready("a"),), 1, 3, NOW)
    decision, _ = decide(context, AutoscaleState(above_since=NOW - 10))
    assert "scale_up_delay" in decision.reason and "needs 4" in decision.reason


def test_a_load_spike_shorter_than_the_up_delay_never_scales() -> None:
    cfg = config(scale_up_delay_s=10)
    state = AutoscaleState()
    instances = (ready("a"),)
    for step in range(9):
        decision, state = decide(AutoscaleContext(cfg, instances, 1, 5, NOW + step), state)
        assert decision.desired == 1
    decision, state = decide(AutoscaleContext(cfg, instances, 1, 0, NOW + 9), state)
    assert decision.desired == 1 and state == AutoscaleState()
    decision, state = decide(AutoscaleContext(cfg, instances, 1, 5, NOW + 10), state)
    assert decision.desired == 1 and state.above_since == NOW + 10


@given(
    bounds=st.tuples(st.integers(0, 5), st.integers(1, 8)).filter(lambda b: b[0] <= b[1]),
    target=st.floats(0.1, 8),
    members=st.lists(
        st.tuples(st.booleans(), st.floats(0, 1000)), max_size=10
    ),
    in_flight=st.integers(0, 40),
    queued=st.integers(0, 40),
    above=st.one_of(st.none(), st.floats(0, 500)),
    below=st.one_of(st.none(), st.floats(0, 500)),
)
def test_decision_invariants(bounds, target, members, in_flight, queued, above, below):
    cfg = config(min_instances=bounds[0], max_instances=bounds[1], target_concurrency=target)
    instances = tuple(
        InstanceLoad(f"i{n}", ready=is_ready, idle_s=idle if is_ready else 0.0)
        for n, (is_ready, idle) in enumerate(members)
    )
    state = AutoscaleState(
        above_since=None if above is None else NOW - above,
        below_since=None if below is None else NOW - below,
    )
    decision, _ = decide(AutoscaleContext(cfg, instances, in_flight, queued, NOW), state)
    assert cfg.min_instances <= decision.desired <= cfg.max_instances
    assert len(decision.release) == max(0, len(instances) - decision.desired)
    assert len(set(decision.release)) == len(decision.release)
    assert set(decision.release) <= {i.instance_id for i in instances}
    if not instances and (in_flight or queued):
        assert decision.desired >= 1
    if len(instances) <= cfg.max_instances and len(instances) >= cfg.min_instances:
        # Any instance released below the load floor of one was idle for idle_retention.
        if decision.desired == 0:
            assert all(i.idle_s >= cfg.idle_retention_s for i in instances)
