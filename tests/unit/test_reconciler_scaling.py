"""Desired instance count: min_instances, wakeups, scale-out, load, idle release, bounds."""

from __future__ import annotations

import pytest
from google.protobuf import duration_pb2

from gpufleet.server.reconciler.scaling import CountedInstance, Demand, ScaleMemory, desired_count
from gpufleet.server.spec_defaults import with_defaults
from gpufleet.v1 import deployment_pb2

NOW = 10_000.0


def spec(
    min_instances: int = 0, max_instances: int = 3, idle_s: int = 300
) -> deployment_pb2.DeploymentSpec:
    return with_defaults(
        deployment_pb2.DeploymentSpec(
            command="serve",
            scaling=deployment_pb2.ScalingSpec(
                min_instances=min_instances,
                max_instances=max_instances,
                idle_retention=duration_pb2.Duration(seconds=idle_s),
            ),
        )
    )


def ready(n: int, since: float = NOW - 1) -> list[CountedInstance]:
    return [CountedInstance(f"i{k}", ready=True, ready_since=since) for k in range(n)]


@pytest.mark.parametrize(
    ("name", "the_spec", "instances", "demand", "memory", "want"),
    [
        ("min_instances kept", spec(2), [], Demand(last_busy=NOW), ScaleMemory(), 2),
        ("nothing wanted", spec(0), [], Demand(last_busy=NOW), ScaleMemory(), 0),
        ("wakeup from zero", spec(0), [], Demand(wakeups=3, last_busy=NOW), ScaleMemory(), 1),
        ("queued call from zero", spec(0), [], Demand(queue_depth=1, last_busy=NOW),
         ScaleMemory(), 1),
        ("scale-out adds one", spec(0), ready(1), Demand(in_flight=1, scale_out_requests=1,
         last_busy=NOW), ScaleMemory(desired=1), 2),
        ("scale-out capped at max", spec(0, 2), ready(2), Demand(in_flight=2,
         scale_out_requests=2, last_busy=NOW), ScaleMemory(desired=2), 2),
        ("load needs more", spec(0, 3), ready(1), Demand(in_flight=1, queue_depth=2,
         last_busy=NOW), ScaleMemory(desired=1), 3),
        ("idle past retention is released", spec(0, idle_s=300), ready(1, since=NOW - 400),
         Demand(last_busy=NOW - 400), ScaleMemory(desired=1), 0),
        ("recent load keeps it", spec(0, idle_s=300), ready(1, since=NOW - 400),
         Demand(last_busy=NOW - 10), ScaleMemory(desired=1), 1),
        ("idle release never below min", spec(1, idle_s=0), ready(2, since=NOW - 400),
         Demand(last_busy=NOW - 400), ScaleMemory(desired=2), 1),
        ("surge instances of a rollout are not wanted ones", spec(2, 4), ready(3),
         Demand(last_busy=NOW), ScaleMemory(desired=2), 2),
    ],
)  # fmt: skip
def test_desired_count(
    name: str,
    the_spec: deployment_pb2.DeploymentSpec,
    instances: list[CountedInstance],
    demand: Demand,
    memory: ScaleMemory,
    want: int,
) -> None:
    decision, after = desired_count(the_spec, instances, demand, memory, NOW)
    assert decision.desired == want, f"{name}: {decision.reason}"
    assert after.desired == want
    assert decision.reason


def test_wakeups_are_acted_on_once_and_the_instance_is_kept() -> None:
    the_spec = spec(0)
    wakeup = Demand(wakeups=1, last_busy=NOW)
    first, memory = desired_count(the_spec, [], wakeup, ScaleMemory(), NOW)
    assert first.desired == 1
    starting = [CountedInstance("i0", ready=False)]
    second, _ = desired_count(the_spec, starting, Demand(last_busy=NOW), memory, NOW + 1)
    assert second.desired == 1
