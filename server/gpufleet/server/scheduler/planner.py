"""schedule(): place a batch of instances on a snapshot and return a plan.

For each request, in placement_order(): feasibility filters (filters.py), then ranking
(ranking.py) among the nodes and GPUs that pass, then the winner's resources are reserved
in the scheduler's working copy so later requests of the same call see them. A request
nothing fits gets a PlacementFailure with per-filter node counts.

Speed: candidates are walked best-first from sorted indexes (state.py) and the walk stops
at the first candidate that passes every filter on a node with as few replicas of the
deployment as any node has (usually none), so a typical request looks at a handful of
entries, not at every node. A failure costs one pass over all nodes, to count the
rejections, once per distinct request shape and cluster state. The exhaustive mode
evaluates every node with the filter chain for every request instead; it gives the same
plan and exists to check the indexes against the plain definition.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from gpufleet.server.scheduler import ranking
from gpufleet.server.scheduler.filters import (
    Filter,
    first_rejection,
    host_fits,
    share_fits,
    whole_gpus,
)
from gpufleet.server.scheduler.model import (
    ClusterSnapshot,
    InstanceRequest,
    Placement,
    PlacementFailure,
    Plan,
    SpreadPolicy,
)
from gpufleet.server.scheduler.reasons import failure_reason
from gpufleet.server.scheduler.state import WorkingCluster, WorkingGpu, WorkingNode

SelectorKey = tuple[tuple[str, str], ...]
Shape = tuple[int, int, int, int, int, SelectorKey]


def _selector_key(request: InstanceRequest) -> SelectorKey:
    return tuple(sorted(request.node_selector.items()))


def _shape(request: InstanceRequest) -> Shape:
    """Everything feasibility depends on (deployment and policy only affect ranking)."""
    return (
        request.gpus,
        request.gpu_memory_mib,
        request.gpu_core_percent,
        request.cpu_millis,
        request.memory_mib,
        _selector_key(request),
    )


def placement_order(
    requests: Sequence[InstanceRequest], reference_gpu_memory_mib: int
) -> list[int]:
    """Positions of `requests` in the order they are placed: largest first.

    Whole-GPU requests first, by GPU count; then shares by their size on a reference GPU,
    memory / reference_gpu_memory_mib + core_percent / 100; then GPU-less requests by CPU
    and memory; each descending, and equal requests keep their input order.

    Why largest first: best-fit decreasing packs far tighter than arrival order (small
    shares placed first leave holes the large ones cannot use). Whole GPUs go before any
    share so shares do not break up the untouched GPUs they need. Shares are sized on
    both dimensions because a GPU fills up on memory or on SM share, whichever runs out
    first: sorting by memory alone leaves small-memory, high-SM shares for last, when
    only GPUs with spare memory but no SM share are left (about 10 % more GPUs on a
    mixed load). Equal shapes end up adjacent, so one failure explanation serves them all.
    A caller that needs priorities (a cold start someone waits on) schedules those first,
    in a call of their own.
    """
    reference = max(1, reference_gpu_memory_mib)

    def key(position: int) -> tuple[int, float, Shape, int]:
        request = requests[position]
        shape = _shape(request)
        negated = (-shape[0], -shape[1], -shape[2], -shape[3], -shape[4], shape[5])
        if request.whole:
            return (0, -float(request.gpus), negated, position)
        if request.fractional:
            size = request.gpu_memory_mib / reference + request.gpu_core_percent / 100
            return (1, -size, negated, position)
        return (2, 0.0, negated, position)

    return sorted(range(len(requests)), key=key)


@dataclass(frozen=True, slots=True)
class _Choice:
    node: WorkingNode
    gpus: tuple[WorkingGpu, ...]
    replicas: int


@dataclass(frozen=True, slots=True)
class _Explanation:
    version: int
    rejections: Mapping[str, int]


def _candidates(
    node: WorkingNode, request: InstanceRequest, binpack: bool
) -> list[tuple[tuple[int, ...], tuple[WorkingGpu, ...]]]:
    """(ranking key, GPUs) for each way a node that passed the filters can take a request."""
    if request.whole:
        key = ranking.whole_binpack_key if binpack else ranking.whole_spread_key
        return [(key(node), whole_gpus(node, request.gpus))]
    if request.fractional:
        gpu_key = ranking.share_binpack_key if binpack else ranking.share_spread_key
        memory, core = request.gpu_memory_mib, request.gpu_core_percent
        return [(gpu_key(gpu), (gpu,)) for gpu in node.gpus if share_fits(gpu, memory, core)]
    plain_key = ranking.plain_binpack_key if binpack else ranking.plain_spread_key
    return [(plain_key(node), ())]


class _Planner:
    def __init__(self, snapshot: ClusterSnapshot, exhaustive: bool) -> None:
        self._cluster = WorkingCluster(snapshot)
        self._exhaustive = exhaustive
        self._selected: dict[SelectorKey, tuple[frozenset[int], tuple[WorkingNode, ...]]] = {}
        # Shapes that failed: capacity only shrinks during a call, so they fail again.
        self._infeasible: dict[Shape, _Explanation] = {}

    def place(self, request: InstanceRequest) -> Placement | PlacementFailure:
        shape = _shape(request)
        known = self._infeasible.get(shape)
        choice = None if known is not None else self._choose(request)
        if choice is None:
            return self._fail(request, shape, known)
        node = choice.node
        self._cluster.place(
            node,
            request.deployment,
            request.cpu_millis,
            request.memory_mib,
            whole=choice.gpus if request.whole else (),
            share=(
                (choice.gpus[0], request.gpu_memory_mib, request.gpu_core_percent)
                if request.fractional
                else None
            ),
        )
        return Placement(
            instance_id=request.instance_id,
            deployment=request.deployment,
            node_id=node.node_id,
            gpu_uuids=tuple(gpu.uuid for gpu in choice.gpus),
            exclusive=request.whole,
            colocated_replicas=choice.replicas,
        )

    def _fail(
        self, request: InstanceRequest, shape: Shape, known: _Explanation | None
    ) -> PlacementFailure:
        version = self._cluster.version
        if known is None or known.version != version:
            known = _Explanation(version, self._explain(request))
            self._infeasible[shape] = known
        nodes = len(self._cluster.nodes)
        return PlacementFailure(
            instance_id=request.instance_id,
            deployment=request.deployment,
            reason=failure_reason(request, known.rejections, nodes),
            filter_rejections=dict(known.rejections),
            nodes_evaluated=nodes,
        )

    def _explain(self, request: InstanceRequest) -> dict[str, int]:
        counts = dict.fromkeys(Filter, 0)
        for node in self._cluster.nodes:
            rejection = first_rejection(node, request)
            if rejection is not None:
                counts[rejection] += 1
        return {str(name): count for name, count in counts.items() if count > 0}

    def _nodes_matching(
        self, request: InstanceRequest
    ) -> tuple[frozenset[int], tuple[WorkingNode, ...]]:
        key = _selector_key(request)
        found = self._selected.get(key)
        if found is None:
            nodes = tuple(n for n in self._cluster.nodes if n.matches(request.node_selector))
            found = (frozenset(n.order for n in nodes), nodes)
            self._selected[key] = found
        return found

    def _choose(self, request: InstanceRequest) -> _Choice | None:
        replicas = self._cluster.replicas_of(request.deployment)
        floor = self._cluster.replica_floor(request.deployment)
        if self._exhaustive:
            return self._scan(self._cluster.nodes, request, replicas)
        allowed: frozenset[int] | None = None
        if request.node_selector:
            allowed, nodes = self._nodes_matching(request)
            # A few matching nodes are cheaper to scan than an index walk that would skip
            # about len(all nodes) / len(matching) entries per matching one.
            if len(nodes) <= math.isqrt(len(self._cluster.nodes)):
                return self._scan(nodes, request, replicas)
        if request.whole:
            return self._walk_whole(request, allowed, replicas, floor)
        if request.fractional:
            return self._walk_share(request, allowed, replicas, floor)
        return self._walk_plain(request, allowed, replicas, floor)

    @staticmethod
    def _scan(
        nodes: Sequence[WorkingNode], request: InstanceRequest, replicas: Mapping[int, int]
    ) -> _Choice | None:
        """Every node through the filter chain; the smallest (replicas, key) wins."""
        binpack = request.spread is SpreadPolicy.BINPACK
        best: _Choice | None = None
        best_rank: tuple[int, tuple[int, ...]] | None = None
        for node in nodes:
            if first_rejection(node, request) is not None:
                continue
            count = replicas.get(node.order, 0)
            for key, gpus in _candidates(node, request, binpack):
                rank = (count, key)
                if best_rank is None or rank < best_rank:
                    best_rank, best = rank, _Choice(node, gpus, count)
        return best

    # The walks below inline the checks of filters.py for speed; the exhaustive mode and
    # the property tests hold them to the same answers. Each returns at the first
    # candidate on a node with `floor` replicas (no node has fewer, so it has the best
    # possible rank), else the candidate on the node with the fewest replicas, first in
    # key order among equals.

    def _walk_share(
        self,
        request: InstanceRequest,
        allowed: frozenset[int] | None,
        replicas: Mapping[int, int],
        floor: int,
    ) -> _Choice | None:
        memory, core = request.gpu_memory_mib, request.gpu_core_percent
        cpu, host_memory = request.cpu_millis, request.memory_mib
        binpack = request.spread is SpreadPolicy.BINPACK
        if binpack:
            index = self._cluster.share_binpack
            start = bisect_left(index, (memory,))
        else:
            index = self._cluster.share_spread
            start = 0
        best: _Choice | None = None
        for position in range(start, len(index)):
            entry = index[position]
            if not binpack and -entry[0] < memory:
                break
            gpu: WorkingGpu = entry[-1]
            if core and gpu.core + core > 100:
                continue
            node = gpu.node
            if allowed is not None and node.order not in allowed:
                continue
            if (cpu and cpu > node.cpu_free) or (host_memory and host_memory > node.memory_free):
                continue
            count = replicas.get(node.order, 0)
            if count <= floor:
                return _Choice(node, (gpu,), count)
            if best is None or count < best.replicas:
                best = _Choice(node, (gpu,), count)
        return best

    def _walk_whole(
        self,
        request: InstanceRequest,
        allowed: frozenset[int] | None,
        replicas: Mapping[int, int],
        floor: int,
    ) -> _Choice | None:
        wanted = request.gpus
        binpack = request.spread is SpreadPolicy.BINPACK
        if binpack:
            index = self._cluster.whole_binpack
            start = bisect_left(index, (wanted,))
        else:
            index = self._cluster.whole_spread
            start = 0
        best: WorkingNode | None = None
        best_count = 0
        for position in range(start, len(index)):
            entry = index[position]
            if not binpack and -entry[0] < wanted:
                break
            node: WorkingNode = entry[-1]
            if allowed is not None and node.order not in allowed:
                continue
            if host_fits(node, request.cpu_millis, request.memory_mib) is not None:
                continue
            count = replicas.get(node.order, 0)
            if best is None or count < best_count:
                best, best_count = node, count
                if count <= floor:
                    break
        if best is None:
            return None
        return _Choice(best, whole_gpus(best, wanted), best_count)

    def _walk_plain(
        self,
        request: InstanceRequest,
        allowed: frozenset[int] | None,
        replicas: Mapping[int, int],
        floor: int,
    ) -> _Choice | None:
        cpu = request.cpu_millis
        binpack = request.spread is SpreadPolicy.BINPACK
        if binpack:
            index = self._cluster.plain_binpack
            start = bisect_left(index, (cpu,)) if cpu else 0
        else:
            index = self._cluster.plain_spread
            start = 0
        best: WorkingNode | None = None
        best_count = 0
        for position in range(start, len(index)):
            entry = index[position]
            if not binpack and cpu and -entry[0] < cpu:
                break
            node: WorkingNode = entry[-1]
            if allowed is not None and node.order not in allowed:
                continue
            if host_fits(node, cpu, request.memory_mib) is not None:
                continue
            count = replicas.get(node.order, 0)
            if best is None or count < best_count:
                best, best_count = node, count
                if count <= floor:
                    break
        if best is None:
            return None
        return _Choice(best, (), best_count)


def schedule(
    snapshot: ClusterSnapshot,
    requests: Sequence[InstanceRequest],
    *,
    exhaustive: bool = False,
) -> Plan:
    """Place `requests` on `snapshot`; the snapshot is not changed.

    Requests are placed in placement_order(); each placement is seen by the later ones.
    `exhaustive` evaluates every node for every request instead of walking the indexes:
    the same plan, much slower; it is there to check the indexes.

    Raises ValueError when two requests share an instance id.
    """
    ids = [request.instance_id for request in requests]
    if len(set(ids)) != len(ids):
        repeated = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(
            f"schedule: instance ids {repeated} appear more than once; each request "
            "needs its own instance id"
        )
    planner = _Planner(snapshot, exhaustive)
    placements: list[Placement] = []
    failures: list[PlacementFailure] = []
    reference = max(
        (gpu.memory_total_mib for node in snapshot.nodes for gpu in node.gpus), default=1
    )
    for position in placement_order(requests, reference):
        outcome = planner.place(requests[position])
        if isinstance(outcome, Placement):
            placements.append(outcome)
        else:
            failures.append(outcome)
    return Plan(placements=tuple(placements), failures=tuple(failures))
