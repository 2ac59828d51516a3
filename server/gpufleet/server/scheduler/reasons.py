"""Failure reasons for people: what was asked, what rejected it, what to change."""

from __future__ import annotations

from collections.abc import Mapping

from gpufleet.server.scheduler.filters import Filter
from gpufleet.server.scheduler.model import InstanceRequest

_HINTS: dict[Filter, str] = {
    Filter.NODE_SCHEDULABLE: "nodes are cordoned or not reporting: uncordon one or start "
    "an agent",
    Filter.NODE_SELECTOR: "no node carries every label of node_selector: label an agent "
    "(gpufleet agent --labels) or relax node_selector",
    Filter.CPU: "not enough unreserved CPU: lower cpu_millis or add nodes",
    Filter.MEMORY: "not enough unreserved host memory: lower memory_mib or add nodes",
    Filter.GPU_COUNT: "nodes have too few GPUs (whole GPUs must all be on one node): "
    "lower gpus or add nodes with more GPUs",
    Filter.GPU_HEALTH: "GPUs are unhealthy (NVML reported them lost): check the nodes' GPUs",
    Filter.GPU_EXCLUSIVE: "GPUs are held whole by other instances: scale those down or add "
    "GPUs",
    Filter.GPU_SHARED: "GPUs hold shares of other instances and whole GPUs must be "
    "untouched: ask for a share (gpu_memory_mib) or free whole GPUs",
    Filter.GPU_MEMORY: "not enough free GPU memory (capacity minus the larger of reserved "
    "and measured use): lower gpu_memory_mib or scale other deployments down",
    Filter.GPU_CORE: "the GPUs' SM share is used up: lower gpu_core_percent, or set it to 0 "
    "for no limit",
}


def describe(request: InstanceRequest) -> str:
    """The request's resources in a few words."""
    parts = []
    if request.whole:
        parts.append(f"{request.gpus} whole GPU{'s' if request.gpus > 1 else ''}")
    elif request.fractional:
        share = f"a {request.gpu_memory_mib} MiB GPU share"
        if request.gpu_core_percent > 0:
            share += f" at {request.gpu_core_percent}% SM"
        parts.append(share)
    if request.cpu_millis > 0:
        parts.append(f"{request.cpu_millis}m CPU")
    if request.memory_mib > 0:
        parts.append(f"{request.memory_mib} MiB memory")
    if not request.whole and not request.fractional:
        parts.append("no GPU")
    text = ", ".join(parts)
    if request.node_selector:
        labels = ",".join(f"{k}={v}" for k, v in sorted(request.node_selector.items()))
        text += f" on nodes labelled {labels}"
    return text


def failure_reason(
    request: InstanceRequest, rejections: Mapping[str, int], nodes_evaluated: int
) -> str:
    """One line: the request, the rejection counts (most first) and a hint for the top one."""
    what = describe(request)
    if nodes_evaluated == 0:
        return (
            f"no node for {what}: the cluster has no nodes; start an agent with "
            "gpufleet agent --server HOST:PORT --join-token TOKEN"
        )
    filter_order = list(Filter)
    ranked = sorted(
        rejections.items(), key=lambda item: (-item[1], filter_order.index(Filter(item[0])))
    )
    counts = ", ".join(
        f"{name} rejected {count} node{'s' if count > 1 else ''}" for name, count in ranked
    )
    hint = _HINTS[Filter(ranked[0][0])] if ranked else "no filter rejected a node"
    evaluated = f"{nodes_evaluated} node{'s' if nodes_evaluated > 1 else ''} evaluated"
    return f"no node fits {what} ({evaluated}): {counts}; {hint}"
