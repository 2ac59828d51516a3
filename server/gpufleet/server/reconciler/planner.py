"""One reconciler pass as a pure function: cluster rows + liveness + demand -> a batch.

Order of decisions, each seeing the ones before it:

1. Nodes: persist LOST for newly lost nodes and READY for nodes heard from again.
2. Rows that settle: lost rows of a node that came back or of a deleted deployment go
   (the returning node no longer finds them in its desired set and stops them); rows on a
   newly lost node are marked lost exactly once (draining ones just go); draining rows go
   once their node reports them STOPPED or FAILED, or no longer reports them at all.
3. Deployments: a deleted one drains everything and is purged when no row is left; a live
   one gets its desired count (scaling.py) and a step (rollout.py): instances to drain and
   a number to start. Instances of lost nodes are not live any more, so the desired count
   replaces them, exactly once since the lost mark and the replacement share the batch.
4. Placement: every instance to start, across deployments, in one scheduler call over a
   snapshot that already reflects the steps above; failures become the status message.
5. Status and observed generation of every live deployment.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from gpufleet.server.placement_adapter import (
    NodeResources,
    build_snapshot,
    instance_request,
    placed_gpu_uuids,
    reservations,
)
from gpufleet.server.reconciler.liveness import LOST, READY, LivenessVerdict
from gpufleet.server.reconciler.rollout import Member, plan_step, rollout_limits, same_runtime
from gpufleet.server.reconciler.scaling import (
    CountedInstance,
    Demand,
    ScaleMemory,
    desired_count,
)
from gpufleet.server.reconciler.summary import StatusInputs, deployment_status
from gpufleet.server.scheduler import InstanceRequest, schedule
from gpufleet.server.store import (
    ClusterRecords,
    DeploymentRecord,
    InstanceMark,
    InstanceRecord,
    NewInstance,
    ReconcileBatch,
    StatusWrite,
)
from gpufleet.v1 import deployment_pb2, instance_pb2, node_pb2

_State = instance_pb2.InstanceState
_SETTLED = frozenset({_State.INSTANCE_STATE_STOPPED, _State.INSTANCE_STATE_FAILED})


@dataclass(frozen=True)
class PassInput:
    """Everything one pass looks at."""

    records: ClusterRecords
    """Deployments, instances and nodes as stored."""
    verdict: LivenessVerdict
    """Node states now."""
    resources: Mapping[str, NodeResources]
    """Per node id: labels, cpu, memory and GPU readings (live, else last persisted)."""
    reported: Mapping[str, frozenset[str]]
    """Per node with a heartbeat on its current connection: the instance ids it reported."""
    demand: Mapping[str, Demand]
    """Per deployment: gateway load and scale requests."""
    memory: Mapping[str, ScaleMemory]
    """Per deployment: the scaling policy's memory from the previous pass."""
    node_ttl: float
    """For the lost-instance reason."""
    now: float
    """Wall time, seconds since the epoch."""
    started_wall: float
    """Wall time the control plane started: the idle clock of a deployment no gateway
    reported on runs from there."""


@dataclass(frozen=True)
class PassResult:
    """The batch to commit and what to remember."""

    batch: ReconcileBatch
    memory: dict[str, ScaleMemory]
    """Scaling memory per live deployment, for the next pass."""
    touched_nodes: frozenset[str]
    """Nodes whose desired set may change with the batch."""


def plan_pass(inputs: PassInput, new_id: Callable[[str], str]) -> PassResult:
    """Decide one pass (see the module docstring). `new_id(deployment)` names new instances."""
    records = inputs.records
    verdict = inputs.verdict
    deployments = {d.deployment.name: d for d in records.deployments}
    touched: set[str] = set(verdict.returned)

    node_states: dict[str, node_pb2.NodeState.ValueType] = {}
    for node in records.nodes:
        state = verdict.states.get(node.node.id)
        if state in (LOST, READY) and state != node.node.state and state is not None:
            node_states[node.node.id] = state

    lost: list[InstanceMark] = []
    delete: list[str] = []
    live: dict[str, list[InstanceRecord]] = defaultdict(list)
    lost_now = set(verdict.newly_lost)
    for row in records.instances:
        instance = row.instance
        node_id = instance.node_id
        deployment = deployments.get(instance.deployment)
        deleting = deployment is None or deployment.deployment.HasField("delete_time")
        if row.lost:
            if node_id in verdict.returned or deleting:
                delete.append(instance.id)
            continue
        if node_id in lost_now or verdict.states.get(node_id) == LOST:
            if row.draining or deleting:
                delete.append(instance.id)
            else:
                lost.append(
                    InstanceMark(
                        instance.id,
                        f"node {node_id} lost: no heartbeat for {inputs.node_ttl:g} s; replaced",
                    )
                )
            continue
        if row.draining:
            reported = inputs.reported.get(node_id)
            if instance.state in _SETTLED or (reported is not None and instance.id not in reported):
                delete.append(instance.id)
                touched.add(node_id)
            continue
        live[instance.deployment].append(row)

    gone = set(delete) | {mark.instance_id for mark in lost}
    remaining_rows: dict[str, int] = defaultdict(int)
    for row in records.instances:
        if row.instance.id not in gone:
            remaining_rows[row.instance.deployment] += 1

    drain: list[InstanceMark] = []
    purge: list[str] = []
    requests: list[InstanceRequest] = []
    memory: dict[str, ScaleMemory] = {}
    plans: dict[str, _DeploymentPlan] = {}
    for name, record in deployments.items():
        members = live.get(name, [])
        if record.deployment.HasField("delete_time"):
            drain.extend(InstanceMark(m.instance.id, "deployment deleted") for m in members)
            touched.update(m.instance.node_id for m in members)
            if remaining_rows[name] == 0:
                purge.append(name)
            continue
        plan, memory[name] = _plan_deployment(record, members, inputs)
        plans[name] = plan
        drain.extend(plan.drain)
        touched.update(m.instance.node_id for m in members if m.instance.id in plan.stopping)
        requests.extend(
            instance_request(new_id(name), name, record.deployment.spec) for _ in range(plan.start)
        )

    stopping = {mark.instance_id for mark in drain}
    create, unplaced = _place(inputs, requests, gone, stopping, deployments)
    touched.update(new.instance.node_id for new in create)
    touched.update(
        r.instance.node_id for r in records.instances if r.instance.id in set(delete)
    )

    status: list[StatusWrite] = []
    created_by_deployment: dict[str, list[instance_pb2.Instance]] = defaultdict(list)
    for new in create:
        created_by_deployment[new.instance.deployment].append(new.instance)
    for name, plan in plans.items():
        record = deployments[name]
        still = [m for m in live.get(name, []) if m.instance.id not in stopping]
        now_live = [m.instance for m in still] + created_by_deployment[name]
        spec = record.deployment.spec
        load = inputs.demand.get(name, Demand(last_busy=inputs.started_wall))
        updated = sum(1 for m in still if same_runtime(m.spec, spec)) + len(
            created_by_deployment[name]
        )
        written = deployment_status(
            StatusInputs(
                live=now_live,
                desired=plan.desired,
                queue_depth=load.queue_depth,
                in_flight=load.in_flight,
                blocked=plan.blocked,
                unplaced=unplaced.get(name, ""),
                rolling_to=record.deployment.generation if plan.rollout else 0,
                updated=updated,
            )
        )
        stored = record.deployment
        if (
            not stored.HasField("status")
            or stored.status != written
            or stored.observed_generation != stored.generation
        ):
            status.append(StatusWrite(name, stored.generation, written))

    batch = ReconcileBatch(
        node_states=node_states,
        lost=tuple(lost),
        drain=tuple(drain),
        delete=tuple(delete),
        create=tuple(create),
        purge=tuple(purge),
        status=tuple(status),
    )
    return PassResult(batch=batch, memory=memory, touched_nodes=frozenset(touched))


@dataclass(frozen=True)
class _DeploymentPlan:
    desired: int
    start: int
    drain: tuple[InstanceMark, ...]
    stopping: frozenset[str]
    rollout: bool
    blocked: str


def _plan_deployment(
    record: DeploymentRecord, members: Sequence[InstanceRecord], inputs: PassInput
) -> tuple[_DeploymentPlan, ScaleMemory]:
    deployment = record.deployment
    spec = deployment.spec
    counted = [
        CountedInstance(
            instance_id=m.instance.id,
            ready=m.instance.state == _State.INSTANCE_STATE_READY,
            ready_since=(
                m.instance.ready_time.ToMicroseconds() / 1e6
                if m.instance.HasField("ready_time")
                else None
            ),
        )
        for m in members
    ]
    decision, memory = desired_count(
        spec,
        counted,
        inputs.demand.get(deployment.name, Demand(last_busy=inputs.started_wall)),
        inputs.memory.get(deployment.name, ScaleMemory()),
        inputs.now,
    )
    current = {m.instance.id: same_runtime(m.spec, spec) for m in members}
    step = plan_step(
        [
            Member(
                instance_id=m.instance.id,
                current=current[m.instance.id],
                ready=m.instance.state == _State.INSTANCE_STATE_READY,
                failed=m.instance.state == _State.INSTANCE_STATE_FAILED or m.instance.crash_loop,
                created=m.instance.create_time.ToMicroseconds() / 1e6,
            )
            for m in members
        ],
        decision.desired,
        rollout_limits(spec),
        prefer_stop=decision.release,
    )
    drain = tuple(
        InstanceMark(
            instance_id,
            f"replaced by generation {deployment.generation}"
            if not current[instance_id]
            else f"scaled down: {decision.reason}",
        )
        for instance_id in step.stop
    )
    return (
        _DeploymentPlan(
            desired=decision.desired,
            start=step.start,
            drain=drain,
            stopping=frozenset(step.stop),
            rollout=step.rollout,
            blocked=step.blocked,
        ),
        memory,
    )


def _place(
    inputs: PassInput,
    requests: Sequence[InstanceRequest],
    gone: set[str],
    stopping: set[str],
    deployments: Mapping[str, DeploymentRecord],
) -> tuple[list[NewInstance], dict[str, str]]:
    """Schedule the new instances; returns them and, per deployment, why some did not fit."""
    if not requests:
        return [], {}
    records = inputs.records
    holding = [r for r in records.instances if r.instance.id not in gone]
    held = reservations(holding, inputs.resources)
    per_deployment: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for row in holding:
        if not row.lost and not row.draining and row.instance.id not in stopping:
            per_deployment[row.instance.deployment][row.instance.node_id] += 1
    nodes = [inputs.resources[n.node.id] for n in records.nodes if n.node.id in inputs.resources]
    snapshot = build_snapshot(
        nodes,
        held,
        [n.node.id for n in records.nodes if inputs.verdict.schedulable(n.node.id)],
        {name: dict(counts) for name, counts in per_deployment.items()},
    )
    plan = schedule(snapshot, requests)
    create: list[NewInstance] = []
    totals = {
        (node.node_id, gpu.uuid): gpu.memory_total_mib for node in nodes for gpu in node.gpus
    }
    for placement in plan.placements:
        record = deployments[placement.deployment]
        spec = record.deployment.spec
        uuids = placed_gpu_uuids(placement)
        reserved = (
            sum(totals.get((placement.node_id, uuid), 0) for uuid in uuids)
            if spec.gpu.count > 0
            else spec.gpu.memory_mib
        )
        create.append(
            NewInstance(
                instance=instance_pb2.Instance(
                    id=placement.instance_id,
                    deployment=placement.deployment,
                    generation=record.deployment.generation,
                    node_id=placement.node_id,
                    gpu_uuids=uuids,
                    state=_State.INSTANCE_STATE_PENDING,
                    reason="placed; waiting for the node to start it",
                    gpu_memory_reserved_mib=reserved,
                ),
                spec=_copy(spec),
            )
        )
    failures: dict[str, list[str]] = defaultdict(list)
    for failure in plan.failures:
        failures[failure.deployment].append(failure.reason)
    unplaced = {
        name: f"{len(reasons)} instance(s) cannot be placed: {reasons[0]}"
        for name, reasons in failures.items()
    }
    return create, unplaced


def _copy(spec: deployment_pb2.DeploymentSpec) -> deployment_pb2.DeploymentSpec:
    out = deployment_pb2.DeploymentSpec()
    out.CopyFrom(spec)
    return out
