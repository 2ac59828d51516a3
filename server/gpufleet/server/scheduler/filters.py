"""Feasibility filters: which nodes and GPUs may take a request at all.

Each filter has a name (Filter) so that a failed placement can say how many nodes each
one rejected. A node is rejected by the first filter it fails, in this order:

1. node_schedulable, node_selector: static properties first, so a node the operator
   cordoned or the user's selector excludes is reported as such and not as short of
   resources (nothing would change that by freeing capacity);
2. cpu, memory: host resources, one comparison each;
3. the GPU filters, last because they look at every GPU of the node. They narrow the
   node's GPUs step by step and the node is blamed on the step that leaves too few:
   whole GPUs: gpu_count (the node has fewer GPUs than asked), gpu_health, gpu_exclusive
   (held whole by another instance), gpu_shared (holds shares: not untouched);
   a share: gpu_count (no GPU at all), gpu_health, gpu_exclusive, gpu_memory (free
   memory, capacity minus max(reserved, measured)), gpu_core (SM share over 100 %).
"""

from __future__ import annotations

import enum

from gpufleet.server.scheduler.model import InstanceRequest
from gpufleet.server.scheduler.state import WorkingGpu, WorkingNode


class Filter(enum.StrEnum):
    """Names used as keys of PlacementFailure.filter_rejections, in filter order."""

    NODE_SCHEDULABLE = "node_schedulable"
    """The node is cordoned or not ready."""
    NODE_SELECTOR = "node_selector"
    """The node lacks a label of the request's node_selector, or has another value."""
    CPU = "cpu"
    """reserved + request > allocatable CPU."""
    MEMORY = "memory"
    """reserved + request > allocatable host memory."""
    GPU_COUNT = "gpu_count"
    """The node has fewer GPUs than the request needs, free or not."""
    GPU_HEALTH = "gpu_health"
    """Too few healthy GPUs."""
    GPU_EXCLUSIVE = "gpu_exclusive"
    """Too few GPUs not held whole by another instance."""
    GPU_SHARED = "gpu_shared"
    """Whole GPUs only: too few GPUs without shares of other instances."""
    GPU_MEMORY = "gpu_memory"
    """Shares only: no GPU with enough free memory."""
    GPU_CORE = "gpu_core"
    """Shares only: no GPU with enough SM share left."""


def host_fits(node: WorkingNode, cpu_millis: int, memory_mib: int) -> Filter | None:
    """CPU then memory; a request of 0 always fits, even on an over-reserved node."""
    if cpu_millis > 0 and cpu_millis > node.cpu_free:
        return Filter.CPU
    if memory_mib > 0 and memory_mib > node.memory_free:
        return Filter.MEMORY
    return None


def share_fits(gpu: WorkingGpu, memory_mib: int, core_percent: int) -> bool:
    """The GPU can take a share of this size (health, exclusivity, memory, core)."""
    return (
        gpu.healthy
        and not gpu.owned
        and gpu.free >= memory_mib
        and (core_percent == 0 or gpu.core + core_percent <= 100)
    )


def whole_gpus(node: WorkingNode, count: int) -> tuple[WorkingGpu, ...]:
    """The first `count` wholly free GPUs by index (fewer if the node lacks them)."""
    free = tuple(gpu for gpu in node.gpus if gpu.wholly_free)
    return free[:count]


def _whole_rejection(node: WorkingNode, count: int) -> Filter | None:
    gpus = node.gpus
    if len(gpus) < count:
        return Filter.GPU_COUNT
    gpus = tuple(gpu for gpu in gpus if gpu.healthy)
    if len(gpus) < count:
        return Filter.GPU_HEALTH
    gpus = tuple(gpu for gpu in gpus if not gpu.owned)
    if len(gpus) < count:
        return Filter.GPU_EXCLUSIVE
    gpus = tuple(gpu for gpu in gpus if gpu.untouched)
    if len(gpus) < count:
        return Filter.GPU_SHARED
    return None


def _share_rejection(node: WorkingNode, memory_mib: int, core_percent: int) -> Filter | None:
    gpus = node.gpus
    if not gpus:
        return Filter.GPU_COUNT
    gpus = tuple(gpu for gpu in gpus if gpu.healthy)
    if not gpus:
        return Filter.GPU_HEALTH
    gpus = tuple(gpu for gpu in gpus if not gpu.owned)
    if not gpus:
        return Filter.GPU_EXCLUSIVE
    gpus = tuple(gpu for gpu in gpus if gpu.free >= memory_mib)
    if not gpus:
        return Filter.GPU_MEMORY
    if core_percent > 0 and not any(gpu.core + core_percent <= 100 for gpu in gpus):
        return Filter.GPU_CORE
    return None


def first_rejection(node: WorkingNode, request: InstanceRequest) -> Filter | None:
    """The first filter the node fails for this request, or None when it fits."""
    if not node.schedulable:
        return Filter.NODE_SCHEDULABLE
    if not node.matches(request.node_selector):
        return Filter.NODE_SELECTOR
    rejection = host_fits(node, request.cpu_millis, request.memory_mib)
    if rejection is not None:
        return rejection
    if request.whole:
        return _whole_rejection(node, request.gpus)
    if request.fractional:
        return _share_rejection(node, request.gpu_memory_mib, request.gpu_core_percent)
    return None
