"""Ranking keys: among candidates that pass every filter, the smallest rank wins.

The full rank of a candidate is ``(replicas, key)``:

* ``replicas`` is the host-spread penalty: instances of the request's deployment already
  on the candidate's node (including ones placed earlier in the same call). It comes
  first, so replicas land on different nodes whenever some node without one fits, and
  otherwise on the node with the fewest.
* ``key`` depends on the request kind and its SpreadPolicy, and always ends in
  (node order, GPU index) so that ties go to the smaller node id, then the smaller GPU
  index, and every plan is deterministic.

GPU share, BINPACK: ``(free MiB, wholly free GPUs on the node, ...)``. The GPU with the
least free memory that still fits ends up fullest (best fit, in absolute MiB so the
largest holes stay open for the largest shares whatever the card size); between equal
GPUs, the node with fewer untouched GPUs is preferred, which keeps whole GPUs and whole
nodes free for whole-GPU requests. SPREAD negates both: the emptiest GPU on the emptiest
node.

Whole GPUs, BINPACK: ``(wholly free GPUs on the node, ...)``: the node left with the
fewest untouched GPUs after placement. SPREAD: the node with the most.

No GPU, BINPACK: ``(free CPU millis, free memory MiB, ...)``: the fullest node by CPU,
then memory. SPREAD: the emptiest.

A placement's keys are recomputed after every change, so they are index keys too
(state.WorkingCluster): BINPACK walks an index upward from the first entry with enough
free capacity, SPREAD walks its own index from the start.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gpufleet.server.scheduler.state import WorkingGpu, WorkingNode


def share_binpack_key(gpu: WorkingGpu) -> tuple[int, int, int, int]:
    """Fullest GPU first, then the fullest node."""
    return (gpu.free, gpu.node.whole_free, gpu.node.order, gpu.index)


def share_spread_key(gpu: WorkingGpu) -> tuple[int, int, int, int]:
    """Emptiest GPU first, then the emptiest node."""
    return (-gpu.free, -gpu.node.whole_free, gpu.node.order, gpu.index)


def whole_binpack_key(node: WorkingNode) -> tuple[int, int]:
    """Node with the fewest untouched GPUs first."""
    return (node.whole_free, node.order)


def whole_spread_key(node: WorkingNode) -> tuple[int, int]:
    """Node with the most untouched GPUs first."""
    return (-node.whole_free, node.order)


def plain_binpack_key(node: WorkingNode) -> tuple[int, int, int]:
    """Node with the least free CPU, then memory, first."""
    return (node.cpu_free, node.memory_free, node.order)


def plain_spread_key(node: WorkingNode) -> tuple[int, int, int]:
    """Node with the most free CPU, then memory, first."""
    return (-node.cpu_free, -node.memory_free, node.order)
