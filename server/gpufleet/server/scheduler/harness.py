"""In-memory harness: terse builders for snapshots and requests, and plan lookups.

Used by the scheduler's tests and benchmarks (as Nomad's scheduler/testing.go is), so a
scenario reads as a few lines: node("a", gpus=2), share("i1", 20_000), schedule(...).
GPU uuids are "<node id>-gpu<index>"; a request's deployment defaults to its instance id.
"""

from __future__ import annotations

from collections.abc import Mapping

from gpufleet.server.scheduler import (
    ClusterSnapshot,
    GpuState,
    InstanceRequest,
    NodeState,
    Placement,
    Plan,
    SpreadPolicy,
)

GPU_MIB = 80_000


def gpu(
    node_id: str,
    index: int,
    *,
    total: int = GPU_MIB,
    reserved: int = 0,
    measured: int = 0,
    core: int = 0,
    owner: str | None = None,
    healthy: bool = True,
) -> GpuState:
    return GpuState(
        uuid=f"{node_id}-gpu{index}",
        index=index,
        memory_total_mib=total,
        memory_reserved_mib=reserved,
        memory_measured_mib=measured,
        core_reserved_percent=core,
        exclusive_owner=owner,
        healthy=healthy,
    )


def node(
    node_id: str,
    gpus: int | tuple[GpuState, ...] = 1,
    *,
    labels: Mapping[str, str] | None = None,
    schedulable: bool = True,
    cpu: int = 64_000,
    cpu_reserved: int = 0,
    memory: int = 512_000,
    memory_reserved: int = 0,
) -> NodeState:
    cards = tuple(gpu(node_id, i) for i in range(gpus)) if isinstance(gpus, int) else gpus
    return NodeState(
        node_id=node_id,
        labels=dict(labels or {}),
        schedulable=schedulable,
        cpu_millis_total=cpu,
        cpu_millis_reserved=cpu_reserved,
        memory_mib_total=memory,
        memory_mib_reserved=memory_reserved,
        gpus=cards,
    )


def cluster(
    *nodes: NodeState, placed: Mapping[str, Mapping[str, int]] | None = None
) -> ClusterSnapshot:
    return ClusterSnapshot(nodes=nodes, deployment_instances=dict(placed or {}))


def share(
    instance_id: str,
    memory: int,
    core: int = 0,
    *,
    deployment: str | None = None,
    cpu: int = 0,
    host_memory: int = 0,
    selector: Mapping[str, str] | None = None,
    spread: SpreadPolicy = SpreadPolicy.BINPACK,
) -> InstanceRequest:
    return InstanceRequest(
        instance_id=instance_id,
        deployment=deployment or instance_id,
        gpu_memory_mib=memory,
        gpu_core_percent=core,
        cpu_millis=cpu,
        memory_mib=host_memory,
        node_selector=dict(selector or {}),
        spread=spread,
    )


def whole(
    instance_id: str,
    count: int,
    *,
    deployment: str | None = None,
    cpu: int = 0,
    selector: Mapping[str, str] | None = None,
    spread: SpreadPolicy = SpreadPolicy.BINPACK,
) -> InstanceRequest:
    return InstanceRequest(
        instance_id=instance_id,
        deployment=deployment or instance_id,
        gpus=count,
        cpu_millis=cpu,
        node_selector=dict(selector or {}),
        spread=spread,
    )


def plain(
    instance_id: str,
    *,
    cpu: int = 0,
    memory: int = 0,
    deployment: str | None = None,
    selector: Mapping[str, str] | None = None,
    spread: SpreadPolicy = SpreadPolicy.BINPACK,
) -> InstanceRequest:
    return InstanceRequest(
        instance_id=instance_id,
        deployment=deployment or instance_id,
        cpu_millis=cpu,
        memory_mib=memory,
        node_selector=dict(selector or {}),
        spread=spread,
    )


def where(plan: Plan) -> dict[str, tuple[str, tuple[str, ...]]]:
    """instance id -> (node id, gpu uuids)."""
    return {p.instance_id: (p.node_id, p.gpu_uuids) for p in plan.placements}


def placement(plan: Plan, instance_id: str) -> Placement:
    for candidate in plan.placements:
        if candidate.instance_id == instance_id:
            return candidate
    raise KeyError(f"{instance_id} was not placed; failures: {plan.failures}")
