"""Property tests of the scheduler: no GPU over-committed, feasible requests placed,
and the indexed walk agrees with evaluating every node."""

from __future__ import annotations

import copy
from collections import Counter, defaultdict

from hypothesis import given, settings
from hypothesis import strategies as st

from gpufleet.server.scheduler import (
    ClusterSnapshot,
    GpuState,
    InstanceRequest,
    NodeState,
    Plan,
    SpreadPolicy,
    schedule,
)

EXAMPLES = settings(max_examples=100, deadline=None)
DEPLOYMENTS = ("d0", "d1", "d2")
LABELS = {"zone": ("a", "b"), "gpu": ("h100", "l4")}


def small(upper: int, *edges: int) -> st.SearchStrategy[int]:
    """Often 0 or an edge value, else up to `upper`: limits are where bugs hide."""
    return st.one_of(st.sampled_from((0, *edges)), st.integers(0, upper))


@st.composite
def labels(draw: st.DrawFn) -> dict[str, str]:
    keys = draw(st.sets(st.sampled_from(sorted(LABELS))))
    return {key: draw(st.sampled_from(LABELS[key])) for key in sorted(keys)}


@st.composite
def gpu_states(draw: st.DrawFn, uuid: str, index: int, empty: bool) -> GpuState:
    total = draw(st.sampled_from([1_000, 2_000, 4_000]))
    if empty:
        return GpuState(uuid=uuid, index=index, memory_total_mib=total)
    return GpuState(
        uuid=uuid,
        index=index,
        memory_total_mib=total,
        memory_reserved_mib=draw(small(total + 500, total // 2, total - 1, total)),
        memory_measured_mib=draw(small(total + 500, total // 2, total - 1, total)),
        core_reserved_percent=draw(small(110, 50, 75, 99, 100)),
        exclusive_owner=draw(st.sampled_from([None, None, None, "old"])),
        healthy=draw(st.sampled_from([True, True, True, False])),
    )


@st.composite
def node_states(draw: st.DrawFn, node_id: str, empty: bool) -> NodeState:
    count = draw(st.integers(0, 4))
    # Indexes in any order and with gaps, as NVML may report after a GPU is lost.
    indexes = draw(st.permutations(range(count + 1)))[:count]
    cpu = draw(st.sampled_from([0, 1_000, 4_000]))
    memory = draw(st.sampled_from([0, 1_024, 8_192]))
    return NodeState(
        node_id=node_id,
        labels=draw(labels()),
        schedulable=True if empty else draw(st.sampled_from([True, True, True, False])),
        cpu_millis_total=cpu,
        cpu_millis_reserved=0 if empty else draw(small(cpu + 1_000)),
        memory_mib_total=memory,
        memory_mib_reserved=0 if empty else draw(small(memory + 1_000)),
        gpus=tuple(draw(gpu_states(f"{node_id}-g{i}", i, empty)) for i in indexes),
    )


@st.composite
def snapshots(draw: st.DrawFn, max_nodes: int = 6, empty: bool = False) -> ClusterSnapshot:
    count = draw(st.integers(0 if not empty else 1, max_nodes))
    ids = [f"n{i}" for i in draw(st.permutations(range(count)))]
    nodes = tuple(draw(node_states(node_id, empty)) for node_id in ids)
    placed: dict[str, dict[str, int]] = {}
    if not empty and ids:
        for deployment in draw(st.sets(st.sampled_from(DEPLOYMENTS))):
            on = draw(st.sets(st.sampled_from(ids), min_size=1))
            placed[deployment] = {node_id: draw(st.integers(1, 2)) for node_id in sorted(on)}
    return ClusterSnapshot(nodes=nodes, deployment_instances=placed)


@st.composite
def requests(draw: st.DrawFn, instance_id: str) -> InstanceRequest:
    kind = draw(st.sampled_from(["whole", "share", "share", "plain"]))
    gpu: dict[str, int] = {}
    if kind == "whole":
        gpu = {"gpus": draw(st.integers(1, 3))}
    elif kind == "share":
        gpu = {
            "gpu_memory_mib": draw(
                st.one_of(st.sampled_from([1, 500, 1_000, 1_001, 2_000]), st.integers(1, 4_500))
            ),
            "gpu_core_percent": draw(small(100, 1, 25, 50, 51, 100)),
        }
    return InstanceRequest(
        instance_id=instance_id,
        deployment=draw(st.sampled_from(DEPLOYMENTS)),
        cpu_millis=draw(small(3_000, 1, 1_000)),
        memory_mib=draw(small(3_000, 1, 1_024)),
        node_selector=draw(st.one_of(st.just({}), labels())),
        spread=draw(st.sampled_from(SpreadPolicy)),
        **gpu,
    )


@st.composite
def request_lists(draw: st.DrawFn, max_size: int = 12) -> list[InstanceRequest]:
    count = draw(st.integers(0, max_size))
    return [draw(requests(f"i{i}")) for i in range(count)]


def check_never_over_committed(
    snapshot: ClusterSnapshot, batch: list[InstanceRequest], plan: Plan
) -> None:
    """Replay the plan with independent bookkeeping and check every limit."""
    by_id = {request.instance_id: request for request in batch}
    decided = [p.instance_id for p in plan.placements] + [f.instance_id for f in plan.failures]
    assert sorted(decided) == sorted(by_id), "every request is placed or failed, once"
    nodes = {node.node_id: node for node in snapshot.nodes}
    gpus = {gpu.uuid: (node.node_id, gpu) for node in snapshot.nodes for gpu in node.gpus}
    memory_used: Counter[str] = Counter()
    core_used: Counter[str] = Counter()
    cpu_used: Counter[str] = Counter()
    host_memory_used: Counter[str] = Counter()
    owners: defaultdict[str, list[str]] = defaultdict(list)
    tenants: defaultdict[str, list[str]] = defaultdict(list)
    for placed in plan.placements:
        request = by_id[placed.instance_id]
        node = nodes[placed.node_id]
        assert placed.deployment == request.deployment
        assert node.schedulable
        assert all(node.labels.get(k) == v for k, v in request.node_selector.items())
        cpu_used[node.node_id] += request.cpu_millis
        host_memory_used[node.node_id] += request.memory_mib
        assert placed.exclusive == request.whole
        assert list(placed.gpu_uuids) == sorted(placed.gpu_uuids, key=lambda u: gpus[u][1].index)
        for uuid in placed.gpu_uuids:
            node_id, gpu = gpus[uuid]
            assert node_id == node.node_id, "all GPUs of an instance are on its node"
            assert gpu.healthy
        if request.whole:
            assert len(set(placed.gpu_uuids)) == len(placed.gpu_uuids) == request.gpus
            for uuid in placed.gpu_uuids:
                assert gpus[uuid][1].untouched
                owners[uuid].append(placed.instance_id)
        elif request.fractional:
            (uuid,) = placed.gpu_uuids
            assert gpus[uuid][1].exclusive_owner is None
            memory_used[uuid] += request.gpu_memory_mib
            core_used[uuid] += request.gpu_core_percent
            tenants[uuid].append(placed.instance_id)
        else:
            assert placed.gpu_uuids == ()
    for uuid, (_, gpu) in gpus.items():
        assert len(owners[uuid]) <= 1, f"{uuid} has owners {owners[uuid]}"
        assert not (owners[uuid] and tenants[uuid]), f"{uuid} is exclusive and shared"
        assert memory_used[uuid] <= gpu.memory_free_mib
        if core_used[uuid] > 0:
            assert gpu.core_reserved_percent + core_used[uuid] <= 100
    for node_id, node in nodes.items():
        if cpu_used[node_id] > 0:
            assert node.cpu_millis_reserved + cpu_used[node_id] <= node.cpu_millis_total
        if host_memory_used[node_id] > 0:
            assert node.memory_mib_reserved + host_memory_used[node_id] <= node.memory_mib_total
    for failure in plan.failures:
        assert sum(failure.filter_rejections.values()) == failure.nodes_evaluated
        assert failure.nodes_evaluated == len(snapshot.nodes)
        assert failure.reason


@EXAMPLES
@given(snapshot=snapshots(), batch=request_lists())
def test_no_gpu_is_ever_over_committed(snapshot, batch):
    check_never_over_committed(snapshot, batch, schedule(snapshot, batch))


@EXAMPLES
@given(snapshot=snapshots(max_nodes=10), batch=request_lists(max_size=16))
def test_indexed_plan_equals_the_exhaustive_one_and_input_is_untouched(snapshot, batch):
    before = copy.deepcopy((snapshot, batch))
    plan = schedule(snapshot, batch)
    assert (snapshot, batch) == before
    assert schedule(snapshot, batch, exhaustive=True) == plan
    assert schedule(snapshot, batch) == plan


@st.composite
def feasible_single(draw: st.DrawFn) -> tuple[ClusterSnapshot, InstanceRequest]:
    """An empty cluster and one request that fits one of its nodes by construction."""
    snapshot = draw(snapshots(empty=True))
    target = draw(st.sampled_from(snapshot.nodes))
    kinds = ["plain"] + (["whole", "share"] if target.gpus else [])
    kind = draw(st.sampled_from(kinds))
    gpu: dict[str, int] = {}
    if kind == "whole":
        gpu = {"gpus": draw(st.integers(1, len(target.gpus)))}
    elif kind == "share":
        largest = max(g.memory_total_mib for g in target.gpus)
        gpu = {
            "gpu_memory_mib": draw(st.integers(1, largest)),
            "gpu_core_percent": draw(st.integers(0, 100)),
        }
    selector_keys = draw(st.sets(st.sampled_from(sorted(target.labels) or ["-"])))
    request = InstanceRequest(
        instance_id="only",
        deployment=draw(st.sampled_from(DEPLOYMENTS)),
        cpu_millis=draw(st.integers(0, target.cpu_millis_total)),
        memory_mib=draw(st.integers(0, target.memory_mib_total)),
        node_selector={k: target.labels[k] for k in selector_keys if k in target.labels},
        spread=draw(st.sampled_from(SpreadPolicy)),
        **gpu,
    )
    return snapshot, request


@EXAMPLES
@given(case=feasible_single())
def test_every_feasible_single_request_is_placed_on_an_empty_cluster(case):
    snapshot, request = case
    plan = schedule(snapshot, [request])
    assert not plan.failures, plan.failures
    (placed,) = plan.placements
    assert placed.colocated_replicas == 0
    check_never_over_committed(snapshot, [request], plan)
