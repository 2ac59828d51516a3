"""Benchmark 3's baseline: the naive first-fit scheduler.

Requests in arrival order; each takes the first node (in snapshot order) with room, and
on it the first GPUs (by index) with room. No sorting, no indexes, no ranking, no host
spread: the plain loop a first version of a scheduler would be. It honours the same hard
constraints as gpufleet's scheduler (see scheduler_workload.check_assignments).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from gpufleet.server.scheduler import ClusterSnapshot, GpuState, InstanceRequest, NodeState

from bench.scheduler_workload import Assigned


class _Gpu:
    __slots__ = ("uuid", "free", "core", "owned", "untouched", "healthy")

    def __init__(self, gpu: GpuState) -> None:
        self.uuid = gpu.uuid
        self.free = gpu.memory_free_mib
        self.core = gpu.core_reserved_percent
        self.owned = gpu.exclusive_owner is not None
        self.untouched = gpu.untouched
        self.healthy = gpu.healthy


class _Node:
    __slots__ = ("node_id", "labels", "schedulable", "cpu_free", "memory_free", "gpus")

    def __init__(self, node: NodeState) -> None:
        self.node_id = node.node_id
        self.labels = node.labels
        self.schedulable = node.schedulable
        self.cpu_free = node.cpu_millis_total - node.cpu_millis_reserved
        self.memory_free = node.memory_mib_total - node.memory_mib_reserved
        self.gpus = [_Gpu(gpu) for gpu in sorted(node.gpus, key=lambda gpu: gpu.index)]


class FirstFitResult(NamedTuple):
    assigned: list[Assigned]
    failed: int


def first_fit(snapshot: ClusterSnapshot, requests: Sequence[InstanceRequest]) -> FirstFitResult:
    """Place each request on the first node and GPUs that fit, in arrival order."""
    nodes = [_Node(node) for node in snapshot.nodes]
    assigned: list[Assigned] = []
    failed = 0
    for request in requests:
        placed = None
        for node in nodes:
            gpus = _fit(node, request)
            if gpus is not None:
                placed = _take(node, request, gpus)
                break
        if placed is None:
            failed += 1
        else:
            assigned.append(placed)
    return FirstFitResult(assigned, failed)


def _fit(node: _Node, request: InstanceRequest) -> list[_Gpu] | None:
    """The GPUs the request would take on this node, or None when it does not fit."""
    if not node.schedulable:
        return None
    if any(node.labels.get(key) != value for key, value in request.node_selector.items()):
        return None
    if request.cpu_millis > 0 and request.cpu_millis > node.cpu_free:
        return None
    if request.memory_mib > 0 and request.memory_mib > node.memory_free:
        return None
    if request.gpus > 0:
        free = [gpu for gpu in node.gpus if gpu.healthy and gpu.untouched]
        return free[: request.gpus] if len(free) >= request.gpus else None
    if request.gpu_memory_mib > 0:
        core = request.gpu_core_percent
        for gpu in node.gpus:
            if (
                gpu.healthy
                and not gpu.owned
                and gpu.free >= request.gpu_memory_mib
                and (core == 0 or gpu.core + core <= 100)
            ):
                return [gpu]
        return None
    return []


def _take(node: _Node, request: InstanceRequest, gpus: list[_Gpu]) -> Assigned:
    node.cpu_free -= request.cpu_millis
    node.memory_free -= request.memory_mib
    for gpu in gpus:
        if request.gpus > 0:
            gpu.owned = True
            gpu.free = 0
        else:
            gpu.free -= request.gpu_memory_mib
            gpu.core += request.gpu_core_percent
        gpu.untouched = False
    return Assigned(request, node.node_id, tuple(gpu.uuid for gpu in gpus))
