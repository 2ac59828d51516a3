"""Whole reconciler passes on in-memory cluster rows: placement, node loss exactly once,
the mass-silence guard, draining, deletion, status messages."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import replace

from gpufleet.server.placement_adapter import NodeResources
from gpufleet.server.reconciler.liveness import LOST, READY, SUSPECT, LivenessVerdict
from gpufleet.server.reconciler.planner import PassInput, PassResult, plan_pass
from gpufleet.server.reconciler.scaling import ScaleMemory
from gpufleet.server.spec_defaults import with_defaults
from gpufleet.server.store import ClusterRecords, DeploymentRecord, InstanceRecord, NodeRecord
from gpufleet.v1 import deployment_pb2, instance_pb2, node_pb2

NOW = 1_000_000.0
GPU_MIB = 81_559
State = instance_pb2.InstanceState
Phase = deployment_pb2.DeploymentPhase


def spec(
    min_instances: int = 2, memory_mib: int = 20_000, env: str = "1"
) -> deployment_pb2.DeploymentSpec:
    return with_defaults(
        deployment_pb2.DeploymentSpec(
            command="serve",
            env={"V": env},
            gpu=deployment_pb2.GpuRequest(memory_mib=memory_mib, core_percent=25),
            scaling=deployment_pb2.ScalingSpec(min_instances=min_instances, max_instances=4),
        )
    )


def deployment(name: str = "echo", the_spec: deployment_pb2.DeploymentSpec | None = None,
               generation: int = 1, deleting: bool = False) -> DeploymentRecord:
    d = deployment_pb2.Deployment(
        name=name, spec=the_spec or spec(), generation=generation, revision=generation
    )
    if deleting:
        d.delete_time.seconds = 1
    return DeploymentRecord(d, "0" * 64)


def node(node_id: str, state: node_pb2.NodeState.ValueType = READY) -> NodeRecord:
    return NodeRecord(node_pb2.Node(id=node_id, name=node_id, state=state), "0" * 64)


def resources(node_id: str, gpus: int = 1) -> NodeResources:
    return NodeResources(
        node_id=node_id,
        labels={},
        cpu_millis=16_000,
        memory_mib=64_000,
        gpus=[
            node_pb2.Gpu(uuid=f"GPU-{node_id}-{i}", index=i, memory_total_mib=GPU_MIB)
            for i in range(gpus)
        ],
    )


def instance(instance_id: str, node_id: str, the_spec: deployment_pb2.DeploymentSpec | None = None,
             state: int = State.INSTANCE_STATE_READY, draining: bool = False, lost: bool = False,
             deployment_name: str = "echo") -> InstanceRecord:
    return InstanceRecord(
        instance=instance_pb2.Instance(
            id=instance_id, deployment=deployment_name, node_id=node_id, generation=1,
            gpu_uuids=[f"GPU-{node_id}-0"], state=state,  # type: ignore[arg-type]
            address=f"{node_id}:9000",
        ),
        spec=the_spec or spec(), draining=draining, lost=lost,
    )


def verdict(
    states: Mapping[str, node_pb2.NodeState.ValueType],
    newly_lost: Sequence[str] = (),
    returned: Sequence[str] = (),
    held_back: Sequence[str] = (),
) -> LivenessVerdict:
    return LivenessVerdict(
        states=dict(states),
        newly_lost=tuple(newly_lost),
        returned=tuple(returned),
        held_back=tuple(held_back),
    )


def run(records: ClusterRecords, the_verdict: LivenessVerdict,
        reported: Mapping[str, frozenset[str]] | None = None,
        memory: Mapping[str, ScaleMemory] | None = None) -> PassResult:
    ids = itertools.count(1)
    return plan_pass(
        PassInput(
            records=records,
            verdict=the_verdict,
            resources={n.node.id: resources(n.node.id) for n in records.nodes},
            reported=reported or {},
            demand={},
            memory=memory or {},
            node_ttl=15.0,
            now=NOW,
            started_wall=NOW - 10,
        ),
        lambda name: f"{name}-{next(ids):04d}",
    )


def apply(records: ClusterRecords, result: PassResult) -> ClusterRecords:
    """What the store does with a batch, for the rows these tests use."""
    batch = result.batch
    rows = {r.instance.id: r for r in records.instances}
    for mark in batch.lost:
        old = rows[mark.instance_id]
        gone = instance_pb2.Instance()
        gone.CopyFrom(old.instance)
        gone.state = State.INSTANCE_STATE_FAILED
        gone.reason = mark.reason
        rows[mark.instance_id] = replace(old, instance=gone, lost=True)
    for mark in batch.drain:
        rows[mark.instance_id] = replace(rows[mark.instance_id], draining=True)
    for instance_id in batch.delete:
        rows.pop(instance_id, None)
    for new in batch.create:
        rows[new.instance.id] = InstanceRecord(new.instance, new.spec, False, False)
    nodes = [
        replace(
            n,
            node=node_pb2.Node(id=n.node.id, state=batch.node_states.get(n.node.id, n.node.state)),
        )
        for n in records.nodes
    ]
    deployments = [d for d in records.deployments if d.deployment.name not in batch.purge]
    instances = sorted(rows.values(), key=lambda r: r.instance.id)
    return ClusterRecords(records.revision + 1, deployments, instances, nodes)


def test_places_min_instances_as_shares_with_host_spread() -> None:
    records = ClusterRecords(1, [deployment()], [], [node("a"), node("b")])
    result = run(records, verdict({"a": READY, "b": READY}))
    created = result.batch.create
    assert len(created) == 2
    assert sorted(c.instance.node_id for c in created) == ["a", "b"]
    for new in created:
        assert new.instance.state == State.INSTANCE_STATE_PENDING
        assert new.instance.gpu_memory_reserved_mib == 20_000
        assert list(new.instance.gpu_uuids) == [f"GPU-{new.instance.node_id}-0"]
    assert result.touched_nodes == {"a", "b"}
    (status,) = result.batch.status
    assert status.status.phase == Phase.DEPLOYMENT_PHASE_STARTING
    assert status.status.desired_instances == 2
    assert status.observed_generation == 1


def test_second_pass_with_nothing_new_writes_nothing() -> None:
    records = ClusterRecords(1, [deployment()], [], [node("a")])
    first = run(records, verdict({"a": READY}))
    after = apply(records, first)
    # The stored status is what the first pass wrote.
    written = first.batch.status[0]
    d = after.deployments[0].deployment
    d.status.CopyFrom(written.status)
    d.observed_generation = written.observed_generation
    second = run(after, verdict({"a": READY}), memory=first.memory)
    assert second.batch.empty, second.batch


def test_lost_node_instances_are_replaced_exactly_once() -> None:
    rows = [instance("echo-1", "a"), instance("echo-2", "a"), instance("other-1", "a",
            deployment_name="other", state=State.INSTANCE_STATE_READY, draining=True)]
    records = ClusterRecords(1, [deployment(), deployment("other", spec(0))], rows,
                             [node("a"), node("b")])
    lost = verdict({"a": LOST, "b": READY}, newly_lost=["a"])
    first = run(records, lost)
    assert first.batch.node_states == {"a": LOST}
    assert sorted(m.instance_id for m in first.batch.lost) == ["echo-1", "echo-2"]
    assert all("node a lost" in m.reason for m in first.batch.lost)
    assert first.batch.delete == ("other-1",)  # draining on a lost node: just gone
    assert sorted(c.instance.node_id for c in first.batch.create) == ["b", "b"]
    # Later passes see the node LOST and the rows lost: no further replacement.
    after = apply(records, first)
    for _ in range(3):
        again = run(after, verdict({"a": LOST, "b": READY}), memory=first.memory)
        assert not again.batch.create and not again.batch.lost
        after = apply(after, again)
    assert sum(1 for r in after.instances if not r.lost) == 2


def test_mass_silence_guard_replaces_nothing() -> None:
    records = ClusterRecords(1, [deployment()], [instance("echo-1", "a"), instance("echo-2", "b")],
                             [node("a"), node("b"), node("c")])
    result = run(records, verdict({"a": SUSPECT, "b": SUSPECT, "c": READY}, held_back=["a", "b"]))
    assert not result.batch.lost and not result.batch.create and not result.batch.drain


def test_returning_node_drops_its_lost_rows() -> None:
    rows = [instance("echo-1", "a", lost=True, state=State.INSTANCE_STATE_FAILED),
            instance("echo-2", "b"), instance("echo-3", "b")]
    records = ClusterRecords(1, [deployment()], rows, [node("a", LOST), node("b")])
    result = run(records, verdict({"a": READY, "b": READY}, returned=["a"]))
    assert result.batch.node_states == {"a": READY}
    assert result.batch.delete == ("echo-1",)
    assert not result.batch.create
    assert "a" in result.touched_nodes


def test_draining_rows_go_when_stopped_or_no_longer_reported() -> None:
    rows = [instance("echo-1", "a"), instance("echo-2", "a"),
            instance("echo-3", "a", draining=True, state=State.INSTANCE_STATE_STOPPED),
            instance("echo-4", "a", draining=True, state=State.INSTANCE_STATE_DRAINING),
            instance("echo-5", "a", draining=True, state=State.INSTANCE_STATE_DRAINING)]
    records = ClusterRecords(1, [deployment()], rows, [node("a")])
    reported = {"a": frozenset({"echo-1", "echo-2", "echo-3", "echo-4"})}
    result = run(records, verdict({"a": READY}), reported=reported)
    assert sorted(result.batch.delete) == ["echo-3", "echo-5"]
    # Without a current report only the stopped one goes.
    quiet = run(records, verdict({"a": READY}))
    assert quiet.batch.delete == ("echo-3",)


def test_deleted_deployment_drains_then_purges() -> None:
    rows = [instance("echo-1", "a"), instance("echo-2", "a", lost=True)]
    records = ClusterRecords(1, [deployment(deleting=True)], rows, [node("a")])
    first = run(records, verdict({"a": READY}))
    assert [m.instance_id for m in first.batch.drain] == ["echo-1"]
    assert first.batch.delete == ("echo-2",)
    assert first.batch.purge == () and not first.batch.create and not first.batch.status
    after = apply(records, first)
    stopped = instance("echo-1", "a", draining=True, state=State.INSTANCE_STATE_STOPPED)
    after = replace(after, instances=[stopped])
    second = run(after, verdict({"a": READY}))
    assert second.batch.delete == ("echo-1",)
    assert second.batch.purge == ("echo",)


def test_unplaceable_instances_explain_why_in_the_status() -> None:
    too_big = spec(min_instances=1, memory_mib=GPU_MIB + 1)
    records = ClusterRecords(1, [deployment(the_spec=too_big)], [], [node("a")])
    result = run(records, verdict({"a": READY}))
    assert not result.batch.create
    (status,) = result.batch.status
    assert status.status.phase == Phase.DEPLOYMENT_PHASE_STARTING
    assert "1 instance(s) cannot be placed" in status.status.message
    assert "gpu_memory" in status.status.message


def test_suspect_nodes_take_no_new_instances() -> None:
    records = ClusterRecords(1, [deployment(the_spec=spec(min_instances=1))], [],
                             [node("a"), node("b")])
    result = run(records, verdict({"a": SUSPECT, "b": READY}))
    assert [c.instance.node_id for c in result.batch.create] == ["b"]


def test_rolling_update_starts_a_surge_instance_and_keeps_the_old() -> None:
    old_spec = spec(env="1")
    new_spec = spec(env="2")
    rows = [instance("echo-1", "a", old_spec), instance("echo-2", "b", old_spec)]
    records = ClusterRecords(1, [deployment(the_spec=new_spec, generation=2)], rows,
                             [node("a"), node("b")])
    memory = {"echo": ScaleMemory(desired=2)}
    result = run(records, verdict({"a": READY, "b": READY}), memory=memory)
    assert len(result.batch.create) == 1 and not result.batch.drain
    assert result.batch.create[0].instance.generation == 2
    message = result.batch.status[0].status.message
    assert "rolling out generation 2" in message
