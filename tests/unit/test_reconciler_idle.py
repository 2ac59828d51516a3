"""Idle release per instance: gateway reports -> idle seconds -> which instance is drained.

The pure parts: LoadBoard's per-instance aggregation over gateways, `idle_seconds` (the
per-instance rule and its deployment-wide fallback), `desired_count`'s release order, and
one planner pass that drains the idle instance rather than the busy one.
"""

from __future__ import annotations

import pytest
from google.protobuf import duration_pb2

from gpufleet.server.load_reports import LoadBoard
from gpufleet.server.placement_adapter import NodeResources
from gpufleet.server.reconciler.liveness import READY, LivenessVerdict
from gpufleet.server.reconciler.planner import PassInput, plan_pass
from gpufleet.server.reconciler.rollout import Member, RolloutLimits, plan_step
from gpufleet.server.reconciler.scaling import (
    CountedInstance,
    Demand,
    ScaleMemory,
    desired_count,
    idle_seconds,
)
from gpufleet.server.spec_defaults import with_defaults
from gpufleet.server.store import ClusterRecords, DeploymentRecord, InstanceRecord, NodeRecord
from gpufleet.v1 import deployment_pb2, instance_pb2, node_pb2, routing_service_pb2 as rpb

NOW = 50_000.0
State = instance_pb2.InstanceState


def load(
    deployment: str = "tokens", in_flight: int = 0, *instances: tuple[str, int, float]
) -> rpb.DeploymentLoad:
    return rpb.DeploymentLoad(
        deployment=deployment,
        in_flight=in_flight,
        instances=[
            rpb.InstanceLoad(instance_id=i, in_flight=f, idle_seconds=s) for i, f, s in instances
        ],
    )


def board() -> LoadBoard:
    return LoadBoard(expire_after=3.0, started_wall=NOW - 1000)


# --- LoadBoard: per-instance aggregation ----------------------------------------------------


def test_instance_idle_is_the_minimum_over_fresh_gateways() -> None:
    loads = board()
    loads.report("g1", [load("tokens", 0, ("a", 0, 40.0), ("b", 0, 5.0))], 10.0, NOW)
    loads.report("g2", [load("tokens", 0, ("a", 0, 12.0))], 10.5, NOW)
    demand = loads.demand(11.0)["tokens"]
    assert demand.instance_idle == {"a": 12.0, "b": 5.0}
    assert not demand.unattributed


def test_calls_in_flight_on_an_instance_through_any_gateway_make_it_busy() -> None:
    loads = board()
    # A stale idle_seconds next to in_flight > 0 must not count: busy means 0.
    loads.report("g1", [load("tokens", 1, ("a", 1, 99.0))], 10.0, NOW)
    loads.report("g2", [load("tokens", 0, ("a", 0, 60.0))], 10.0, NOW)
    assert loads.demand(10.5)["tokens"].instance_idle == {"a": 0.0}


def test_an_expired_gateway_no_longer_keeps_an_instance_busy() -> None:
    loads = board()
    loads.report("g1", [load("tokens", 1, ("a", 1, 0.0))], 10.0, NOW)
    loads.report("g2", [load("tokens", 0, ("a", 0, 30.0))], 12.0, NOW)
    assert loads.demand(13.5)["tokens"].instance_idle == {"a": 30.0}  # g1 is 3.5 s old


def test_in_flight_without_instances_is_unattributed() -> None:
    loads = board()
    loads.report("old-gateway", [load("tokens", 2)], 10.0, NOW)
    loads.report("g2", [load("tokens", 0, ("a", 0, 30.0))], 10.0, NOW)
    demand = loads.demand(10.5)["tokens"]
    assert demand.unattributed
    assert demand.instance_idle == {"a": 30.0}


def test_a_new_report_replaces_the_previous_one_of_that_gateway() -> None:
    loads = board()
    loads.report("g1", [load("tokens", 1, ("a", 1, 0.0))], 10.0, NOW)
    loads.report("g1", [load("tokens", 0, ("a", 0, 0.8))], 11.0, NOW)
    assert loads.demand(11.0)["tokens"].instance_idle == {"a": 0.8}


# --- idle_seconds ---------------------------------------------------------------------------


def ready(instance_id: str = "a", since: float = NOW - 100) -> CountedInstance:
    return CountedInstance(instance_id, ready=True, ready_since=since)


@pytest.mark.parametrize(
    ("name", "instance", "demand", "want"),
    [
        ("reported idle", ready(), Demand(last_busy=NOW, instance_idle={"a": 42.0}), 42.0),
        ("reported busy", ready(), Demand(instance_idle={"a": 0.0}), 0.0),
        ("capped by the time since ready", ready(since=NOW - 3),
         Demand(instance_idle={"a": 42.0}), 3.0),
        ("not ready: the clock does not run", CountedInstance("a", ready=False),
         Demand(instance_idle={"a": 42.0}), 0.0),
        ("other instances' load does not count", ready(),
         Demand(in_flight=3, queue_depth=1, last_busy=NOW, instance_idle={"a": 42.0, "b": 0.0}),
         42.0),
        ("fallback: no report, idle deployment", ready(), Demand(last_busy=NOW - 20), 20.0),
        ("fallback: no report, busy deployment", ready(),
         Demand(in_flight=1, last_busy=NOW, instance_idle={"b": 0.0}), 0.0),
        ("fallback: unattributed calls in flight", ready(),
         Demand(in_flight=1, last_busy=NOW, instance_idle={"a": 42.0}, unattributed=True), 0.0),
        ("fallback: ready later than last busy", ready(since=NOW - 5),
         Demand(last_busy=NOW - 20), 5.0),
    ],
)  # fmt: skip
def test_idle_seconds(name: str, instance: CountedInstance, demand: Demand, want: float) -> None:
    assert idle_seconds(instance, demand, NOW) == pytest.approx(want), name


# --- desired count and which instance goes --------------------------------------------------


def spec(min_instances: int = 0, max_instances: int = 3, idle_s: int = 2) -> deployment_pb2.DeploymentSpec:
    return with_defaults(
        deployment_pb2.DeploymentSpec(
            command="serve",
            gpu=deployment_pb2.GpuRequest(memory_mib=4096, core_percent=25),
            scaling=deployment_pb2.ScalingSpec(
                min_instances=min_instances,
                max_instances=max_instances,
                idle_retention=duration_pb2.Duration(seconds=idle_s),
            ),
        )
    )


def test_the_idle_instance_is_released_while_its_neighbour_is_busy() -> None:
    demand = Demand(in_flight=1, last_busy=NOW, instance_idle={"a": 10.0, "b": 0.0})
    decision, _ = desired_count(
        spec(), [ready("a"), ready("b")], demand, ScaleMemory(desired=2), NOW
    )
    assert decision.desired == 1, decision.reason
    assert decision.release == ("a",)
    assert "idle" in decision.reason


def test_idle_release_never_goes_below_min_instances() -> None:
    demand = Demand(last_busy=NOW - 100, instance_idle={"a": 10.0, "b": 10.0})
    decision, _ = desired_count(
        spec(min_instances=1), [ready("a"), ready("b")], demand, ScaleMemory(desired=2), NOW
    )
    assert decision.desired == 1


def test_idle_shorter_than_retention_keeps_the_instance() -> None:
    demand = Demand(last_busy=NOW - 100, instance_idle={"a": 1.5})
    decision, _ = desired_count(spec(idle_s=2), [ready("a")], demand, ScaleMemory(desired=1), NOW)
    assert decision.desired == 1


def test_deployment_wide_fallback_releases_the_last_instance() -> None:
    decision, _ = desired_count(
        spec(idle_s=2), [ready("a")], Demand(last_busy=NOW - 5), ScaleMemory(desired=1), NOW
    )
    assert (decision.desired, decision.release) == (0, ("a",))


def test_plan_step_stops_the_preferred_instance_first() -> None:
    members = [
        Member("a", current=True, ready=True, failed=False, created=1.0),
        Member("b", current=True, ready=True, failed=False, created=2.0),
    ]
    limits = RolloutLimits(surge=1, unavailable=0)
    assert plan_step(members, 1, limits).stop == ("b",)  # newest without a preference
    assert plan_step(members, 1, limits, prefer_stop=("a",)).stop == ("a",)


# --- one planner pass -----------------------------------------------------------------------


def _record(instance_id: str, the_spec: deployment_pb2.DeploymentSpec) -> InstanceRecord:
    instance = instance_pb2.Instance(
        id=instance_id, deployment="tokens", node_id="n1", generation=1,
        gpu_uuids=["GPU-n1-0"], state=State.INSTANCE_STATE_READY, address="127.0.0.1:9000",
    )  # fmt: skip
    instance.ready_time.FromSeconds(int(NOW - 100))
    instance.create_time.FromSeconds(int(NOW - 100) if instance_id == "tokens-a" else int(NOW - 50))
    return InstanceRecord(instance=instance, spec=the_spec, draining=False, lost=False)


def test_a_pass_drains_the_idle_instance_and_keeps_the_busy_one() -> None:
    the_spec = spec(max_instances=2)
    deployment = deployment_pb2.Deployment(
        name="tokens", spec=the_spec, generation=1, revision=1
    )
    records = ClusterRecords(
        revision=1,
        deployments=[DeploymentRecord(deployment, "0" * 64)],
        instances=[_record("tokens-a", the_spec), _record("tokens-b", the_spec)],
        nodes=[NodeRecord(node_pb2.Node(id="n1", name="n1", state=READY), "0" * 64)],
    )
    # tokens-b is the newest, so without per-instance reports it would be the one to go.
    loads = board()
    loads.report(
        "g1", [load("tokens", 1, ("tokens-a", 0, 30.0), ("tokens-b", 1, 0.0))], 10.0, NOW
    )
    result = plan_pass(
        PassInput(
            records=records,
            verdict=LivenessVerdict(states={"n1": READY}, newly_lost=(), returned=(), held_back=()),
            resources={
                "n1": NodeResources(
                    node_id="n1", labels={}, cpu_millis=16_000, memory_mib=64_000,
                    gpus=[node_pb2.Gpu(uuid="GPU-n1-0", index=0, memory_total_mib=81_559)],
                )  # fmt: skip
            },
            reported={"n1": frozenset({"tokens-a", "tokens-b"})},
            demand=loads.demand(10.0),
            memory={"tokens": ScaleMemory(desired=2)},
            node_ttl=15.0,
            now=NOW,
            started_wall=NOW - 1000,
        ),
        lambda name: f"{name}-new",
    )
    assert [mark.instance_id for mark in result.batch.drain] == ["tokens-a"]
    assert "idle" in result.batch.drain[0].reason
    assert not result.batch.create
    [status] = result.batch.status
    assert (status.status.desired_instances, status.status.ready_instances) == (1, 1)
