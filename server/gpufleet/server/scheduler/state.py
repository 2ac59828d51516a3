"""The scheduler's private, mutable copy of a snapshot, with its ranking indexes.

Each placement in a schedule() call updates this copy so that later requests see it;
the caller's ClusterSnapshot is only read. Feasibility only ever shrinks here (placements
consume capacity, nothing frees it), which the planner relies on to remember failures.

Indexes: sorted lists of (ranking key..., object) kept in step with every change, so a
request walks candidates best-first from a bisect point instead of visiting every node.
Keys are unique because they end in (node order, GPU index), so the trailing object is
never compared.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Iterable, Mapping
from typing import Any

from gpufleet.server.scheduler import ranking
from gpufleet.server.scheduler.model import ClusterSnapshot, GpuState, NodeState

Entry = tuple[Any, ...]


class WorkingGpu:
    """A GPU being filled during one schedule() call."""

    __slots__ = (
        "uuid",
        "index",
        "total",
        "free",
        "core",
        "owned",
        "untouched",
        "healthy",
        "node",
        "binpack_entry",
        "spread_entry",
    )

    def __init__(self, gpu: GpuState, node: WorkingNode) -> None:
        self.uuid = gpu.uuid
        self.index = gpu.index
        self.total = gpu.memory_total_mib
        # Free memory already counts max(reserved, measured); a share placed here lowers
        # it by exactly its request, since it adds to reserved and measured use alike.
        self.free = gpu.memory_free_mib
        self.core = gpu.core_reserved_percent
        self.owned = gpu.exclusive_owner is not None
        self.untouched = gpu.untouched
        self.healthy = gpu.healthy
        self.node = node
        self.binpack_entry: Entry | None = None
        self.spread_entry: Entry | None = None

    @property
    def shareable(self) -> bool:
        """Can take a share at all (memory and core still to be checked)."""
        return self.healthy and not self.owned

    @property
    def wholly_free(self) -> bool:
        """Can be taken whole."""
        return self.healthy and self.untouched


class WorkingNode:
    """A node being filled during one schedule() call."""

    __slots__ = (
        "node_id",
        "order",
        "labels",
        "schedulable",
        "cpu_free",
        "memory_free",
        "gpus",
        "whole_free",
        "whole_binpack_entry",
        "whole_spread_entry",
        "plain_binpack_entry",
        "plain_spread_entry",
    )

    def __init__(self, node: NodeState, order: int) -> None:
        self.node_id = node.node_id
        self.order = order
        self.labels: Mapping[str, str] = dict(node.labels)
        self.schedulable = node.schedulable
        # May start below 0 on an over-reserved node; a request of 0 still fits then.
        self.cpu_free = node.cpu_millis_total - node.cpu_millis_reserved
        self.memory_free = node.memory_mib_total - node.memory_mib_reserved
        gpus = sorted(node.gpus, key=lambda gpu: gpu.index)
        self.gpus = tuple(WorkingGpu(gpu, self) for gpu in gpus)
        self.whole_free = sum(1 for gpu in self.gpus if gpu.wholly_free)
        self.whole_binpack_entry: Entry | None = None
        self.whole_spread_entry: Entry | None = None
        self.plain_binpack_entry: Entry | None = None
        self.plain_spread_entry: Entry | None = None

    def matches(self, selector: Mapping[str, str]) -> bool:
        """Carries every label of the selector with an equal value."""
        labels = self.labels
        return all(labels.get(key) == value for key, value in selector.items())


def _move(index: list[Entry], old: Entry | None, new: Entry | None) -> None:
    if old == new:
        return
    if old is not None:
        del index[bisect_left(index, old)]
    if new is not None:
        insort(index, new)


class WorkingCluster:
    """Nodes ordered by id, ranking indexes, and replica counts for host spread."""

    def __init__(self, snapshot: ClusterSnapshot) -> None:
        ordered = sorted(snapshot.nodes, key=lambda node: node.node_id)
        self.nodes = tuple(WorkingNode(node, order) for order, node in enumerate(ordered))
        order_of = {node.node_id: node.order for node in self.nodes}
        self.replicas: dict[str, dict[int, int]] = {}
        for deployment, per_node in snapshot.deployment_instances.items():
            counts = {
                order_of[node_id]: count
                for node_id, count in per_node.items()
                if node_id in order_of and count > 0
            }
            self.replicas[deployment] = counts
        # Shares: every healthy, unowned GPU of a schedulable node.
        self.share_binpack: list[Entry] = []
        self.share_spread: list[Entry] = []
        # Whole GPUs: schedulable nodes with at least one wholly free GPU.
        self.whole_binpack: list[Entry] = []
        self.whole_spread: list[Entry] = []
        # No GPU: every schedulable node.
        self.plain_binpack: list[Entry] = []
        self.plain_spread: list[Entry] = []
        for node in self.nodes:
            self.refresh(node)
        # Placements are recorded by a version number so the planner can tell whether a
        # cached failure explanation still describes the current state.
        self.version = 0

    def refresh(self, node: WorkingNode) -> None:
        """Re-key the node and its GPUs in every index after a change."""
        binpack: Entry | None
        spread: Entry | None
        for gpu in node.gpus:
            listed = node.schedulable and gpu.shareable
            binpack = ranking.share_binpack_key(gpu) + (gpu,) if listed else None
            spread = ranking.share_spread_key(gpu) + (gpu,) if listed else None
            _move(self.share_binpack, gpu.binpack_entry, binpack)
            _move(self.share_spread, gpu.spread_entry, spread)
            gpu.binpack_entry, gpu.spread_entry = binpack, spread
        listed = node.schedulable and node.whole_free > 0
        binpack = ranking.whole_binpack_key(node) + (node,) if listed else None
        spread = ranking.whole_spread_key(node) + (node,) if listed else None
        _move(self.whole_binpack, node.whole_binpack_entry, binpack)
        _move(self.whole_spread, node.whole_spread_entry, spread)
        node.whole_binpack_entry, node.whole_spread_entry = binpack, spread
        binpack = ranking.plain_binpack_key(node) + (node,) if node.schedulable else None
        spread = ranking.plain_spread_key(node) + (node,) if node.schedulable else None
        _move(self.plain_binpack, node.plain_binpack_entry, binpack)
        _move(self.plain_spread, node.plain_spread_entry, spread)
        node.plain_binpack_entry, node.plain_spread_entry = binpack, spread

    def replicas_of(self, deployment: str) -> dict[int, int]:
        """Instances of the deployment per node order (live, updated by place())."""
        return self.replicas.setdefault(deployment, {})

    def replica_floor(self, deployment: str) -> int:
        """The fewest instances of the deployment on any node: no candidate can do better,
        so a walk may stop at the first candidate with this many."""
        counts = self.replicas_of(deployment)
        if len(counts) < len(self.nodes):
            return 0
        return min(counts.values(), default=0)

    def place(
        self,
        node: WorkingNode,
        deployment: str,
        cpu_millis: int,
        memory_mib: int,
        whole: Iterable[WorkingGpu] = (),
        share: tuple[WorkingGpu, int, int] | None = None,
    ) -> None:
        """Reserve an instance's resources: whole GPUs, or (gpu, memory, core) of a share."""
        node.cpu_free -= cpu_millis
        node.memory_free -= memory_mib
        for gpu in whole:
            gpu.owned = True
            gpu.untouched = False
            gpu.free = 0
            node.whole_free -= 1
        if share is not None:
            gpu, memory, core = share
            if gpu.wholly_free:
                node.whole_free -= 1
            gpu.untouched = False
            gpu.free -= memory
            gpu.core += core
        counts = self.replicas_of(deployment)
        counts[node.order] = counts.get(node.order, 0) + 1
        self.version += 1
        self.refresh(node)
