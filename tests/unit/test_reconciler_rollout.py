"""Start/stop decisions: scaling, rolling updates with surge/unavailable, failed rollouts."""

from __future__ import annotations

from dataclasses import replace

import pytest

from gpufleet.server.reconciler.rollout import (
    Member,
    RolloutLimits,
    plan_step,
    rollout_limits,
    runtime_spec,
    same_runtime,
)
from gpufleet.v1 import deployment_pb2


def member(
    instance_id: str,
    current: bool = True,
    ready: bool = True,
    failed: bool = False,
    created: float = 0.0,
) -> Member:
    return Member(instance_id, current=current, ready=ready, failed=failed, created=created)


@pytest.mark.parametrize(
    ("min_instances", "surge", "unavailable", "want"),
    [
        (0, None, 0, RolloutLimits(1, 0)),  # default 25% of max(0, 1) rounds up to 1
        (4, None, 0, RolloutLimits(1, 0)),
        (4, 50, 25, RolloutLimits(2, 1)),
        (3, 0, 50, RolloutLimits(0, 1)),  # unavailable rounds down
        (1, 0, 50, RolloutLimits(1, 0)),  # both 0 after rounding: surge 1
        (10, 100, 100, RolloutLimits(10, 10)),
    ],
)
def test_rollout_limits(
    min_instances: int, surge: int | None, unavailable: int, want: RolloutLimits
) -> None:
    rollout = deployment_pb2.RolloutSpec(max_unavailable_percent=unavailable)
    if surge is not None:
        rollout.max_surge_percent = surge
    spec = deployment_pb2.DeploymentSpec(
        scaling=deployment_pb2.ScalingSpec(min_instances=min_instances), rollout=rollout
    )
    assert rollout_limits(spec) == want


def test_runtime_spec_ignores_what_instances_do_not_see() -> None:
    base = deployment_pb2.DeploymentSpec(command="serve", port=8000, env={"A": "1"})
    scaled = deployment_pb2.DeploymentSpec()
    scaled.CopyFrom(base)
    scaled.scaling.max_instances = 9
    scaled.traffic.max_request_concurrency = 4
    scaled.service = "svc"
    scaled.spread_policy = deployment_pb2.SPREAD_POLICY_SPREAD
    assert same_runtime(base, scaled)
    changed = deployment_pb2.DeploymentSpec()
    changed.CopyFrom(base)
    changed.env["A"] = "2"
    assert not same_runtime(base, changed)
    assert not runtime_spec(scaled).HasField("scaling")


LIMITS = RolloutLimits(surge=1, unavailable=0)


@pytest.mark.parametrize(
    ("name", "members", "desired", "start", "stop"),
    [
        ("start missing", [member("a")], 3, 2, ()),
        ("nothing to do", [member("a"), member("b")], 2, 0, ()),
        ("stop failed first", [member("a"), member("b", ready=False, failed=True)], 1, 0, ("b",)),
        ("then not ready", [member("a", created=1), member("b", ready=False, created=0)], 1, 0,
         ("b",)),
        ("then the newest ready", [member("a", created=1), member("b", created=2),
         member("c", created=3)], 1, 0, ("c", "b")),
        ("scale to zero", [member("a"), member("b")], 0, 0, ("a", "b")),
    ],
)  # fmt: skip
def test_scaling_steps(
    name: str, members: list[Member], desired: int, start: int, stop: tuple[str, ...]
) -> None:
    step = plan_step(members, desired, LIMITS)
    assert (step.start, step.stop, step.rollout, step.blocked) == (start, stop, False, ""), name


def simulate(
    members: list[Member], desired: int, limits: RolloutLimits, fail_new: bool = False
) -> list[tuple[int, int, int]]:
    """Run steps until nothing changes: new instances become ready (or fail) one pass after
    they start. Returns (total, ready, outdated) after each pass, checking the limits."""
    history: list[tuple[int, int, int]] = []
    counter = 0
    for _ in range(50):
        # Last pass's new instances finished starting.
        members = [
            replace(m, ready=not fail_new, failed=fail_new) if m.current and not m.ready else m
            for m in members
        ]
        step = plan_step(members, desired, limits)
        members = [m for m in members if m.instance_id not in step.stop]
        for _ in range(step.start):
            counter += 1
            members.append(member(f"new{counter}", ready=False, created=100.0 + counter))
        total = len(members)
        ready = sum(1 for m in members if m.ready)
        history.append((total, ready, sum(1 for m in members if not m.current)))
        assert total <= desired + limits.surge
        assert ready >= desired - limits.unavailable or fail_new
        if not step.start and not step.stop:
            break
    return history


@pytest.mark.parametrize(
    ("desired", "limits"),
    [
        (2, RolloutLimits(surge=1, unavailable=0)),
        (4, RolloutLimits(surge=2, unavailable=1)),
        (3, RolloutLimits(surge=0, unavailable=1)),
        (1, RolloutLimits(surge=1, unavailable=0)),
    ],
)
def test_rolling_update_respects_limits_and_finishes(desired: int, limits: RolloutLimits) -> None:
    old = [member(f"old{k}", current=False, created=float(k)) for k in range(desired)]
    history = simulate(old, desired, limits)
    assert history[-1] == (desired, desired, 0)


def test_failed_new_instance_stops_the_rollout_and_keeps_the_old() -> None:
    old = [member("old0", current=False), member("old1", current=False)]
    history = simulate(old, 2, LIMITS, fail_new=True)
    # One surge instance started, failed; nothing else started and no old one stopped.
    assert history[-1] == (3, 2, 2)
    step = plan_step(
        [*old, member("new1", ready=False, failed=True)], 2, LIMITS
    )
    assert step.start == 0 and step.stop == () and step.rollout
    assert "new1 failed" in step.blocked and "keep serving" in step.blocked


def test_outdated_not_ready_instances_stop_at_once() -> None:
    members = [member("old0", current=False, ready=False), member("old1", current=False)]
    step = plan_step(members, 2, LIMITS)
    assert "old0" in step.stop and "old1" not in step.stop
    assert step.start == 1


def test_rollout_to_zero_stops_every_old_instance() -> None:
    step = plan_step([member("a", current=False), member("b", current=False)], 0, LIMITS)
    assert step == replace(step, start=0) and set(step.stop) == {"a", "b"}
