"""Benchmark 3's input and its checks: a seeded cluster and request mix, a validity check
that any scheduler's assignments must pass, and the GPU lower bound.

Both schedulers of the benchmark are held to check_assignments(), recomputed from the
snapshot, so a fast scheduler cannot win by over-committing a GPU or a node.
"""

from __future__ import annotations

import math
import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from gpufleet.server.scheduler import (
    ClusterSnapshot,
    GpuState,
    InstanceRequest,
    NodeState,
    SpreadPolicy,
)

# What NVML reports as the total memory of an 80 GB H100.
H100_MEMORY_MIB = 81_559
ZONES = 4
WHOLE_GPU_COUNTS = (1, 1, 1, 2, 2, 4, 8)
SHARE_MEMORY_MIB = (2_048, 4_096, 8_192, 10_240, 16_384, 20_000, 24_576, 40_000)
# 0 means "SM share not limited", common for memory-bound models.
SHARE_CORE_PERCENT = (0, 0, 10, 20, 25, 30, 50)
HOST_CPU_MILLIS = (500, 1_000, 2_000)
HOST_MEMORY_MIB = (1_024, 4_096)


@dataclass(frozen=True, kw_only=True)
class WorkloadShape:
    """Size and mix of one benchmark input."""

    nodes: int = 1_000
    """Nodes in the cluster, all empty and schedulable."""
    gpus_per_node: int = 8
    """GPUs per node, all of gpu_memory_mib."""
    gpu_memory_mib: int = H100_MEMORY_MIB
    """Memory of every GPU."""
    instances: int = 10_000
    """Requests to place."""
    max_replicas: int = 50
    """Each deployment has 1..max_replicas instances of one shape."""
    whole_fraction: float = 0.1
    """Share of deployments asking for whole GPUs (1, 2, 4 or 8)."""
    plain_fraction: float = 0.1
    """Share of deployments asking for no GPU."""
    spread_fraction: float = 0.0
    """Share of deployments with SpreadPolicy.SPREAD, which uses more GPUs on purpose."""
    selector_fraction: float = 0.0
    """Share of deployments pinned to one of ZONES zones by a node selector."""


class Workload(NamedTuple):
    """A snapshot and the requests to place on it."""

    snapshot: ClusterSnapshot
    requests: tuple[InstanceRequest, ...]
    gpu_memory_mib: int


class Assigned(NamedTuple):
    """Where one request went, in a form both schedulers can produce."""

    request: InstanceRequest
    node_id: str
    gpu_uuids: tuple[str, ...]


class GpuBound(NamedTuple):
    """Fewest GPUs any scheduler could use for a set of placed requests."""

    memory: int
    """whole GPUs + ceil(share memory / GPU memory)."""
    sm: int
    """whole GPUs + ceil(share SM percent / 100)."""

    @property
    def best(self) -> int:
        return max(self.memory, self.sm)


def make_workload(seed: int, shape: WorkloadShape) -> Workload:
    """The same seed and shape always give the same workload."""
    rng = random.Random(seed)
    nodes = tuple(
        NodeState(
            node_id=f"node-{i:05d}",
            labels={"zone": f"z{i % ZONES}"},
            cpu_millis_total=256_000,
            memory_mib_total=2_000_000,
            gpus=tuple(
                GpuState(uuid=f"GPU-{i:05d}-{g}", index=g, memory_total_mib=shape.gpu_memory_mib)
                for g in range(shape.gpus_per_node)
            ),
        )
        for i in range(shape.nodes)
    )
    requests: list[InstanceRequest] = []
    deployment = 0
    while len(requests) < shape.instances:
        deployment += 1
        name = f"d{deployment}"
        replicas = min(rng.randint(1, shape.max_replicas), shape.instances - len(requests))
        kind = rng.random()
        gpus = memory = core = 0
        if kind < shape.whole_fraction:
            gpus = rng.choice(WHOLE_GPU_COUNTS)
        elif kind >= shape.whole_fraction + shape.plain_fraction:
            memory = rng.choice(SHARE_MEMORY_MIB)
            core = rng.choice(SHARE_CORE_PERCENT)
        selector = (
            {"zone": f"z{rng.randrange(ZONES)}"} if rng.random() < shape.selector_fraction else {}
        )
        spread = (
            SpreadPolicy.SPREAD if rng.random() < shape.spread_fraction else SpreadPolicy.BINPACK
        )
        cpu = rng.choice(HOST_CPU_MILLIS)
        host_memory = rng.choice(HOST_MEMORY_MIB)
        requests.extend(
            InstanceRequest(
                instance_id=f"{name}-{k}",
                deployment=name,
                gpus=gpus,
                gpu_memory_mib=memory,
                gpu_core_percent=core,
                cpu_millis=cpu,
                memory_mib=host_memory,
                node_selector=selector,
                spread=spread,
            )
            for k in range(replicas)
        )
    return Workload(ClusterSnapshot(nodes=nodes), tuple(requests), shape.gpu_memory_mib)


def gpu_bound(assigned: Sequence[Assigned], gpu_memory_mib: int) -> GpuBound:
    """Lower bound on GPUs for exactly these requests, per resource."""
    whole = sum(a.request.gpus for a in assigned)
    memory = sum(a.request.gpu_memory_mib for a in assigned)
    sm = sum(a.request.gpu_core_percent for a in assigned)
    return GpuBound(
        memory=whole + math.ceil(memory / gpu_memory_mib), sm=whole + math.ceil(sm / 100)
    )


def gpus_used(assigned: Sequence[Assigned]) -> int:
    """Distinct GPUs holding at least one instance."""
    return len({uuid for a in assigned for uuid in a.gpu_uuids})


class InvalidAssignment(Exception):
    """A scheduler broke a constraint; its figures must not be reported."""


def check_assignments(snapshot: ClusterSnapshot, assigned: Sequence[Assigned]) -> None:
    """Raise InvalidAssignment unless every assignment respects the snapshot's capacity,
    exclusivity, health, schedulability and node selectors."""
    nodes = {node.node_id: node for node in snapshot.nodes}
    gpus = {gpu.uuid: (node.node_id, gpu) for node in snapshot.nodes for gpu in node.gpus}
    ids = Counter(a.request.instance_id for a in assigned)
    repeated = sorted(i for i, count in ids.items() if count > 1)
    if repeated:
        raise InvalidAssignment(f"instances placed more than once: {repeated[:5]}")
    cpu: dict[str, int] = defaultdict(int)
    host_memory: dict[str, int] = defaultdict(int)
    share_memory: dict[str, int] = defaultdict(int)
    share_core: dict[str, int] = defaultdict(int)
    holders: dict[str, list[str]] = defaultdict(list)
    exclusive: set[str] = set()
    for a in assigned:
        request, what = a.request, f"instance {a.request.instance_id}"
        node = nodes.get(a.node_id)
        if node is None or not node.schedulable:
            raise InvalidAssignment(f"{what} is on unknown or unschedulable node {a.node_id}")
        if any(node.labels.get(k) != v for k, v in request.node_selector.items()):
            raise InvalidAssignment(f"{what} is on {a.node_id}, outside its node selector")
        cpu[a.node_id] += request.cpu_millis
        host_memory[a.node_id] += request.memory_mib
        wanted = request.gpus if request.whole else (1 if request.fractional else 0)
        if len(set(a.gpu_uuids)) != wanted or len(a.gpu_uuids) != wanted:
            raise InvalidAssignment(f"{what} got GPUs {a.gpu_uuids}, wanted {wanted} distinct")
        for uuid in a.gpu_uuids:
            owner = gpus.get(uuid)
            if owner is None or owner[0] != a.node_id or not owner[1].healthy:
                raise InvalidAssignment(f"{what} got GPU {uuid}, not a healthy GPU of its node")
            holders[uuid].append(request.instance_id)
            if request.whole:
                exclusive.add(uuid)
            else:
                share_memory[uuid] += request.gpu_memory_mib
                share_core[uuid] += request.gpu_core_percent
    for node_id, node in nodes.items():
        if cpu[node_id] > max(0, node.cpu_millis_total - node.cpu_millis_reserved):
            raise InvalidAssignment(f"node {node_id}: CPU over-committed")
        if host_memory[node_id] > max(0, node.memory_mib_total - node.memory_mib_reserved):
            raise InvalidAssignment(f"node {node_id}: host memory over-committed")
    for uuid, instances in holders.items():
        gpu = gpus[uuid][1]
        if uuid in exclusive and (len(instances) > 1 or not gpu.untouched):
            raise InvalidAssignment(f"GPU {uuid} held whole but shared with {instances}")
        if gpu.exclusive_owner is not None:
            raise InvalidAssignment(f"GPU {uuid} already held whole, given to {instances}")
        if share_memory[uuid] > gpu.memory_free_mib:
            raise InvalidAssignment(f"GPU {uuid}: memory over-committed by {instances}")
        if share_core[uuid] + gpu.core_reserved_percent > 100:
            raise InvalidAssignment(f"GPU {uuid}: SM share over 100 % with {instances}")
