"""Scheduler scenarios on the in-memory harness: filters, kinds, ranking, explanations."""

from __future__ import annotations

import copy
import dataclasses

import pytest

from gpufleet.server.scheduler import (
    ClusterSnapshot,
    Filter,
    GpuState,
    InstanceRequest,
    NodeState,
    PlacementFailure,
    Plan,
    SpreadPolicy,
    placement_order,
    schedule,
)
from gpufleet.server.scheduler.harness import (
    GPU_MIB,
    cluster,
    gpu,
    node,
    placement,
    plain,
    share,
    where,
    whole,
)

SPREAD = SpreadPolicy.SPREAD


def both_modes(snapshot: ClusterSnapshot, requests: list[InstanceRequest]) -> Plan:
    """Schedule with the indexes and exhaustively; the plans must be identical."""
    plan = schedule(snapshot, requests)
    assert schedule(snapshot, requests, exhaustive=True) == plan
    return plan


def only_failure(plan: Plan) -> PlacementFailure:
    assert not plan.placements, plan.placements
    assert len(plan.failures) == 1, plan.failures
    return plan.failures[0]


# --- each filter rejects, with its count -------------------------------------------------


@pytest.mark.parametrize(
    ("nodes", "request_", "expected"),
    [
        pytest.param(
            [node("a", schedulable=False), node("b", schedulable=False)],
            share("i", 1_000),
            {"node_schedulable": 2},
            id="node_schedulable",
        ),
        pytest.param(
            [node("a", labels={"zone": "a"}), node("b"), node("c", labels={"zone": "c"})],
            share("i", 1_000, selector={"zone": "b"}),
            {"node_selector": 3},
            id="node_selector",
        ),
        pytest.param(
            [node("a", cpu=4_000, cpu_reserved=3_001)],
            plain("i", cpu=1_000),
            {"cpu": 1},
            id="cpu",
        ),
        pytest.param(
            [node("a", memory=8_192, memory_reserved=8_000)],
            plain("i", memory=193),
            {"memory": 1},
            id="memory",
        ),
        pytest.param(
            [node("a", gpus=2), node("b", gpus=0)],
            whole("i", 3),
            {"gpu_count": 2},
            id="gpu_count_whole",
        ),
        pytest.param(
            [node("a", gpus=0), node("b", gpus=0), node("c", gpus=0)],
            share("i", 1_000),
            {"gpu_count": 3},
            id="gpu_count_share",
        ),
        pytest.param(
            [node("a", (gpu("a", 0, healthy=False),))],
            share("i", 1_000),
            {"gpu_health": 1},
            id="gpu_health",
        ),
        pytest.param(
            [node("a", (gpu("a", 0, owner="other"), gpu("a", 1, owner="other")))],
            share("i", 1_000),
            {"gpu_exclusive": 1},
            id="gpu_exclusive_share",
        ),
        pytest.param(
            [node("a", (gpu("a", 0, owner="other"),))],
            whole("i", 1),
            {"gpu_exclusive": 1},
            id="gpu_exclusive_whole",
        ),
        pytest.param(
            [node("a", (gpu("a", 0, reserved=1_000), gpu("a", 1, core=10)))],
            whole("i", 1),
            {"gpu_shared": 1},
            id="gpu_shared",
        ),
        pytest.param(
            [node("a", (gpu("a", 0, reserved=GPU_MIB - 999),)), node("b", 0)],
            share("i", 1_000),
            {"gpu_memory": 1, "gpu_count": 1},
            id="gpu_memory",
        ),
        pytest.param(
            [node("a", (gpu("a", 0, core=71), gpu("a", 1, core=90)))],
            share("i", 1_000, 30),
            {"gpu_core": 1},
            id="gpu_core",
        ),
    ],
)
def test_each_filter_rejects_with_its_count(nodes, request_, expected):
    failure = only_failure(both_modes(cluster(*nodes), [request_]))
    assert dict(failure.filter_rejections) == expected
    assert failure.nodes_evaluated == len(nodes)
    assert failure.instance_id == request_.instance_id
    for name in expected:
        assert name in failure.reason


def test_counts_cover_every_node_once_under_its_first_failed_filter():
    gpu_pool = {"pool": "gpu"}
    nodes = [
        # Cordoned and without CPU: counted under node_schedulable only.
        node("a", schedulable=False, cpu=0, labels=gpu_pool),
        node("b", labels={"pool": "cpu"}),
        node("c", cpu=500, labels=gpu_pool),
        node("d", memory=100, labels=gpu_pool),
        node("e", gpus=0, labels=gpu_pool),
        node("f", (gpu("f", 0, healthy=False),), labels=gpu_pool),
        node("g", (gpu("g", 0, owner="x"),), labels=gpu_pool),
        node("h", (gpu("h", 0, reserved=GPU_MIB),), labels=gpu_pool),
        node("i", (gpu("i", 0, core=100),), labels=gpu_pool),
        node("j", (gpu("j", 0, measured=GPU_MIB - 10),), labels=gpu_pool),
    ]
    request = share("r", 20_000, 10, cpu=1_000, host_memory=1_000, selector=gpu_pool)
    failure = only_failure(both_modes(cluster(*nodes), [request]))
    assert dict(failure.filter_rejections) == {
        "node_schedulable": 1,
        "node_selector": 1,
        "cpu": 1,
        "memory": 1,
        "gpu_count": 1,
        "gpu_health": 1,
        "gpu_exclusive": 1,
        "gpu_memory": 2,
        "gpu_core": 1,
    }
    assert sum(failure.filter_rejections.values()) == failure.nodes_evaluated == 10
    assert set(failure.filter_rejections) <= {str(f) for f in Filter}


@pytest.mark.parametrize(
    ("count", "blamed"),
    [(2, "gpu_shared"), (3, "gpu_exclusive"), (4, "gpu_health"), (5, "gpu_count")],
)
def test_whole_gpu_node_is_blamed_on_the_step_that_leaves_too_few(count, blamed):
    cards = (
        gpu("a", 0, healthy=False),
        gpu("a", 1, owner="other"),
        gpu("a", 2, reserved=1),
        gpu("a", 3),
    )
    failure = only_failure(both_modes(cluster(node("a", cards)), [whole("w", count)]))
    assert dict(failure.filter_rejections) == {blamed: 1}


def test_share_node_is_blamed_on_the_furthest_filter_a_gpu_reached():
    cards = (
        gpu("a", 0, healthy=False),
        gpu("a", 1, owner="other"),
        gpu("a", 2, reserved=GPU_MIB - 100),
        gpu("a", 3, core=95),
    )
    snapshot = cluster(node("a", cards))
    assert only_failure(both_modes(snapshot, [share("s", 1_000, 10)])).filter_rejections == {
        "gpu_core": 1
    }
    # Too big for every GPU: the core filter is never reached.
    big = share("s", GPU_MIB + 1, 10)
    assert only_failure(both_modes(snapshot, [big])).filter_rejections == {"gpu_memory": 1}


# --- boundaries ----------------------------------------------------------------------------


def test_exact_fits_are_placed():
    snapshot = cluster(
        node(
            "a",
            (gpu("a", 0, reserved=GPU_MIB - 1_000, core=70),),
            cpu=2_000,
            cpu_reserved=1_000,
            memory=4_096,
            memory_reserved=2_048,
        )
    )
    plan = both_modes(snapshot, [share("s", 1_000, 30, cpu=1_000, host_memory=2_048)])
    assert where(plan) == {"s": ("a", ("a-gpu0",))}


def test_zero_requests_fit_on_an_over_reserved_node():
    snapshot = cluster(
        node("a", 0, cpu=1_000, cpu_reserved=5_000, memory=1_000, memory_reserved=9_000)
    )
    plan = both_modes(snapshot, [plain("p")])
    assert where(plan) == {"p": ("a", ())}
    failure = only_failure(both_modes(snapshot, [plain("p", cpu=1)]))
    assert failure.filter_rejections == {"cpu": 1}


def test_core_percent_zero_ignores_the_sm_share():
    snapshot = cluster(node("a", (gpu("a", 0, core=100),)))
    assert where(both_modes(snapshot, [share("s", 1_000)])) == {"s": ("a", ("a-gpu0",))}
    assert only_failure(both_modes(snapshot, [share("s", 1_000, 1)])).filter_rejections == {
        "gpu_core": 1
    }


# --- request kinds -------------------------------------------------------------------------


def test_whole_share_and_plain_requests_get_what_they_asked_for():
    snapshot = cluster(node("a", 4))
    plan = both_modes(snapshot, [whole("w", 2), share("s", 1_000, 10), plain("p", cpu=100)])
    w, s, p = placement(plan, "w"), placement(plan, "s"), placement(plan, "p")
    assert w.exclusive and len(w.gpu_uuids) == 2 and len(set(w.gpu_uuids)) == 2
    assert not s.exclusive and len(s.gpu_uuids) == 1
    assert not set(s.gpu_uuids) & set(w.gpu_uuids)
    assert p.gpu_uuids == () and not p.exclusive
    assert not plan.failures


def test_whole_gpus_are_all_on_one_node():
    snapshot = cluster(node("a", 2), node("b", 2))
    plan = both_modes(snapshot, [whole("w", 3)])
    assert only_failure(plan).filter_rejections == {"gpu_count": 2}
    plan = both_modes(snapshot, [whole("w1", 2), whole("w2", 2)])
    assert {p.node_id for p in plan.placements} == {"a", "b"}
    for p in plan.placements:
        assert all(uuid.startswith(p.node_id + "-") for uuid in p.gpu_uuids)


def test_whole_gpus_come_in_index_order_and_skip_unfree_ones():
    cards = (gpu("a", 3), gpu("a", 0, reserved=5), gpu("a", 2), gpu("a", 1, healthy=False))
    plan = both_modes(cluster(node("a", cards)), [whole("w", 2)])
    assert where(plan) == {"w": ("a", ("a-gpu2", "a-gpu3"))}


# --- exclusivity ---------------------------------------------------------------------------


def test_exclusive_gpus_are_never_shared_within_one_call():
    snapshot = cluster(node("a", (gpu("a", 0, reserved=1_000), gpu("a", 1))))
    # SPREAD would pick the emptier gpu1 for every share, were it not held whole.
    shares = [share(f"s{i}", 1_000, deployment="d", spread=SPREAD) for i in range(3)]
    plan = both_modes(snapshot, [*shares, whole("w", 1), whole("w2", 1)])
    assert placement(plan, "w").gpu_uuids == ("a-gpu1",)
    assert all(placement(plan, s.instance_id).gpu_uuids == ("a-gpu0",) for s in shares)
    assert [f.instance_id for f in plan.failures] == ["w2"]
    assert plan.failures[0].filter_rejections == {"gpu_shared": 1}


def test_gpus_owned_in_the_snapshot_take_no_share():
    snapshot = cluster(node("a", (gpu("a", 0, owner="old"), gpu("a", 1, reserved=70_000))))
    plan = both_modes(snapshot, [share("s", 5_000)])
    assert where(plan) == {"s": ("a", ("a-gpu1",))}


def test_two_whole_requests_never_get_the_same_gpu():
    plan = both_modes(cluster(node("a", 3)), [whole("w1", 2), whole("w2", 2)])
    assert [p.instance_id for p in plan.placements] == ["w1"]
    assert plan.failures[0].filter_rejections == {"gpu_exclusive": 1}


# --- free memory counts max(reserved, measured) -------------------------------------------


def test_measured_use_above_reservation_reduces_free_memory():
    overran = gpu("a", 0, reserved=10_000, measured=50_000)
    snapshot = cluster(node("a", (overran,)))
    failure = only_failure(both_modes(snapshot, [share("s", 30_001)]))
    assert failure.filter_rejections == {"gpu_memory": 1}
    plan = both_modes(snapshot, [share("s1", 20_000), share("s2", 10_000), share("s3", 1)])
    assert sorted(p.instance_id for p in plan.placements) == ["s1", "s2"]
    assert [f.instance_id for f in plan.failures] == ["s3"]


def test_reservation_above_measured_use_counts_too():
    snapshot = cluster(node("a", (gpu("a", 0, reserved=60_000, measured=5_000),)))
    assert only_failure(both_modes(snapshot, [share("s", 20_001)])).filter_rejections == {
        "gpu_memory": 1
    }
    assert where(both_modes(snapshot, [share("s", 20_000)])) == {"s": ("a", ("a-gpu0",))}


# --- ranking -------------------------------------------------------------------------------


def test_binpack_fills_one_gpu_before_the_next():
    snapshot = cluster(node("a", 2))
    requests = [share(f"s{i}", 20_000, deployment="d") for i in range(5)]
    plan = both_modes(snapshot, requests)
    gpus = [placement(plan, f"s{i}").gpu_uuids[0] for i in range(5)]
    assert gpus == ["a-gpu0"] * 4 + ["a-gpu1"]


def test_binpack_prefers_the_fullest_gpu_that_fits():
    cards = (gpu("a", 0, reserved=10_000), gpu("a", 1, reserved=60_000), gpu("a", 2))
    snapshot = cluster(node("a", cards))
    assert where(both_modes(snapshot, [share("s", 20_000)])) == {"s": ("a", ("a-gpu1",))}
    assert where(both_modes(snapshot, [share("s", 20_001)])) == {"s": ("a", ("a-gpu0",))}


def test_binpack_keeps_untouched_gpus_on_busy_nodes_first():
    # Equal empty GPUs: the one on the node that already holds work is taken, so node
    # "b" stays whole for an 2-GPU request.
    snapshot = cluster(node("a", 2), node("b", (gpu("b", 0, reserved=80_000), gpu("b", 1))))
    plan = both_modes(snapshot, [share("s", 40_000)])
    assert where(plan) == {"s": ("b", ("b-gpu1",))}


def test_binpack_whole_gpus_go_to_the_node_left_fullest():
    snapshot = cluster(node("a", 4), node("b", 2), node("c", (gpu("c", 0, owner="x"), gpu("c", 1))))
    assert where(both_modes(snapshot, [whole("w", 1)])) == {"w": ("c", ("c-gpu1",))}
    assert where(both_modes(snapshot, [whole("w", 2)])) == {"w": ("b", ("b-gpu0", "b-gpu1"))}


def test_spread_alternates_gpus_on_one_node():
    snapshot = cluster(node("a", 2))
    requests = [share(f"s{i}", 10_000, deployment="d", spread=SPREAD) for i in range(4)]
    plan = both_modes(snapshot, requests)
    gpus = [placement(plan, f"s{i}").gpu_uuids[0] for i in range(4)]
    assert gpus == ["a-gpu0", "a-gpu1", "a-gpu0", "a-gpu1"]


def test_spread_prefers_the_emptiest_gpu_and_node():
    snapshot = cluster(
        node("a", (gpu("a", 0, reserved=10_000), gpu("a", 1))),
        node("b", (gpu("b", 0, reserved=10_000), gpu("b", 1, reserved=5_000))),
    )
    plan = both_modes(snapshot, [share("s", 1_000, spread=SPREAD)])
    assert where(plan) == {"s": ("a", ("a-gpu1",))}


def test_spread_whole_and_plain_requests_take_the_emptiest_node():
    snapshot = cluster(
        node("a", (gpu("a", 0, owner="x"), gpu("a", 1)), cpu=8_000, cpu_reserved=1_000),
        node("b", 2, cpu=8_000, cpu_reserved=4_000),
    )
    assert where(both_modes(snapshot, [whole("w", 1, spread=SPREAD)]))["w"][0] == "b"
    assert where(both_modes(snapshot, [whole("w", 1)]))["w"][0] == "a"
    assert where(both_modes(snapshot, [plain("p", cpu=100, spread=SPREAD)]))["p"][0] == "a"
    assert where(both_modes(snapshot, [plain("p", cpu=100)]))["p"][0] == "b"


def test_ties_go_to_the_smaller_node_id_then_gpu_index():
    snapshot = cluster(node("b", 2), node("a", 2), node("c", 2))
    assert where(both_modes(snapshot, [share("s", 1)])) == {"s": ("a", ("a-gpu0",))}
    spread = share("s", 1, spread=SPREAD)
    assert where(both_modes(snapshot, [spread])) == {"s": ("a", ("a-gpu0",))}


# --- host spread ---------------------------------------------------------------------------


def test_replicas_land_on_different_nodes_when_possible():
    snapshot = cluster(node("a", 2), node("b", 2), node("c", 2))
    requests = [share(f"s{i}", 10_000, deployment="d") for i in range(3)]
    plan = both_modes(snapshot, requests)
    assert sorted(p.node_id for p in plan.placements) == ["a", "b", "c"]
    assert all(p.colocated_replicas == 0 for p in plan.placements)


def test_replicas_share_a_node_only_when_every_fitting_node_has_one():
    snapshot = cluster(node("a", 1), node("b", 1), node("c", 0))
    requests = [share(f"s{i}", 10_000, deployment="d") for i in range(3)]
    plan = both_modes(snapshot, requests)
    assert sorted(p.node_id for p in plan.placements) == ["a", "a", "b"]
    assert sorted(p.colocated_replicas for p in plan.placements) == [0, 0, 1]
    # Binpack still puts the third replica on the fullest GPU among equal nodes.
    assert placement(plan, "s2").gpu_uuids == ("a-gpu0",)


def test_host_spread_counts_instances_already_running():
    snapshot = cluster(node("a", 1), node("b", 1), placed={"d": {"a": 2, "b": 1}})
    plan = both_modes(snapshot, [share("s", 1_000, deployment="d")])
    assert where(plan) == {"s": ("b", ("b-gpu0",))}
    assert placement(plan, "s").colocated_replicas == 1


def test_host_spread_beats_binpack_but_not_feasibility():
    snapshot = cluster(node("a", (gpu("a", 0, reserved=70_000),)), node("b", 1))
    plan = both_modes(snapshot, [share("s", 5_000, deployment="d")])
    assert where(plan) == {"s": ("a", ("a-gpu0",))}
    snapshot = cluster(
        node("a", (gpu("a", 0, reserved=70_000),)), node("b", 1), placed={"d": {"a": 1}}
    )
    plan = both_modes(snapshot, [share("s", 5_000, deployment="d")])
    assert where(plan) == {"s": ("b", ("b-gpu0",))}


def test_different_deployments_pack_onto_one_gpu():
    snapshot = cluster(node("a", 2), node("b", 2))
    plan = both_modes(snapshot, [share(f"s{i}", 20_000) for i in range(4)])
    assert {p.gpu_uuids for p in plan.placements} == {("a-gpu0",)}


def test_host_spread_applies_to_whole_and_plain_requests():
    snapshot = cluster(node("a", 2), node("b", 2))
    plan = both_modes(snapshot, [whole(f"w{i}", 1, deployment="d") for i in range(2)])
    assert sorted(p.node_id for p in plan.placements) == ["a", "b"]
    plan = both_modes(snapshot, [plain(f"p{i}", cpu=10, deployment="d") for i in range(2)])
    assert sorted(p.node_id for p in plan.placements) == ["a", "b"]


# --- selectors and health ------------------------------------------------------------------


def test_selector_needs_every_label_with_an_equal_value():
    snapshot = cluster(
        node("a", labels={"zone": "x"}),
        node("b", labels={"zone": "x", "gpu": "h100"}),
        node("c", labels={"zone": "y", "gpu": "h100"}),
    )
    selector = {"zone": "x", "gpu": "h100"}
    plan = both_modes(snapshot, [share("s", 1_000, selector=selector)])
    assert where(plan) == {"s": ("b", ("b-gpu0",))}


def test_selector_walk_through_a_large_cluster_matches_the_scan():
    nodes = [node(f"n{i:02d}", 2, labels={"zone": "x" if i % 3 == 0 else "y"}) for i in range(30)]
    requests = [
        share(f"s{i}", 50_000, deployment=f"d{i % 4}", selector={"zone": "x"}) for i in range(25)
    ]
    plan = both_modes(cluster(*nodes), requests)
    placed = {p.node_id for p in plan.placements}
    assert placed <= {f"n{i:02d}" for i in range(0, 30, 3)}
    assert len(plan.placements) == 20 and len(plan.failures) == 5
    assert plan.failures[0].filter_rejections == {"node_selector": 20, "gpu_memory": 10}


def test_unhealthy_gpus_are_skipped():
    snapshot = cluster(node("a", (gpu("a", 0, healthy=False), gpu("a", 1), gpu("a", 2))))
    plan = both_modes(snapshot, [share("s", 1_000), whole("w", 1)])
    assert placement(plan, "s").gpu_uuids == ("a-gpu2",)
    assert placement(plan, "w").gpu_uuids == ("a-gpu1",)


def test_unschedulable_nodes_take_nothing():
    snapshot = cluster(node("a", 1, schedulable=False), node("b", 0, schedulable=False))
    plan = both_modes(snapshot, [share("s", 1), whole("w", 1), plain("p")])
    assert not plan.placements
    assert all(f.filter_rejections == {"node_schedulable": 2} for f in plan.failures)


# --- order, determinism, input untouched ---------------------------------------------------


def test_placement_order_is_largest_first_then_input_order():
    requests = [
        plain("p-small", cpu=1),
        share("s-small", 1_000),
        share("s-core", 1_000, 90),
        whole("w1", 1),
        plain("p-big", cpu=5),
        share("s-big", 40_000),
        whole("w4", 4),
        share("s-small-2", 1_000),
    ]
    order = [requests[i].instance_id for i in placement_order(requests, GPU_MIB)]
    assert order == [
        "w4",
        "w1",
        "s-core",
        "s-big",
        "s-small",
        "s-small-2",
        "p-big",
        "p-small",
    ]


def test_larger_requests_are_placed_first_whatever_the_input_order():
    snapshot = cluster(node("a", (gpu("a", 0, reserved=30_000),)))
    plan = both_modes(snapshot, [share("small", 10_000), share("large", 50_000)])
    assert [p.instance_id for p in plan.placements] == ["large"]
    assert [f.instance_id for f in plan.failures] == ["small"]


def test_plans_are_deterministic_and_ignore_node_order():
    nodes = [node(f"n{i}", 2, labels={"zone": str(i % 2)}) for i in range(6)]
    requests = [
        share(f"s{i}", 7_000 * (i % 5 + 1), 10 * (i % 4), deployment=f"d{i % 3}")
        for i in range(30)
    ] + [whole(f"w{i}", i % 2 + 1) for i in range(4)]
    first = schedule(cluster(*nodes), requests)
    assert schedule(cluster(*nodes), requests) == first
    assert schedule(cluster(*reversed(nodes)), requests) == first
    assert schedule(cluster(*nodes), requests, exhaustive=True) == first


def test_the_snapshot_and_requests_are_not_changed():
    snapshot = cluster(
        node("a", (gpu("a", 0, reserved=1_000, measured=2_000, core=10), gpu("a", 1))),
        node("b", 2, labels={"zone": "x"}),
        placed={"d": {"a": 1}},
    )
    requests = [share("s", 1_000, 10, deployment="d"), whole("w", 1), plain("p", cpu=1)]
    before = copy.deepcopy((snapshot, requests))
    first = schedule(snapshot, requests)
    assert (snapshot, requests) == before
    assert schedule(snapshot, requests) == first


# --- failures ------------------------------------------------------------------------------


def test_failure_reason_says_what_was_asked_what_rejected_it_and_what_to_do():
    snapshot = cluster(node("a", (gpu("a", 0, reserved=79_000),)), node("b", 0), node("c", 0))
    request = share("s", 2_000, 25, cpu=500, host_memory=1_024, selector={})
    failure = only_failure(both_modes(snapshot, [request]))
    assert failure.deployment == "s"
    assert "2000 MiB GPU share at 25% SM" in failure.reason
    assert "500m CPU" in failure.reason and "1024 MiB memory" in failure.reason
    assert "gpu_count rejected 2 nodes, gpu_memory rejected 1 node" in failure.reason
    assert "add nodes with more GPUs" in failure.reason  # hint for the top filter
    assert "3 nodes evaluated" in failure.reason


def test_failure_reason_for_a_selector_names_the_labels():
    failure = only_failure(both_modes(cluster(node("a")), [whole("w", 2, selector={"z": "q"})]))
    assert "2 whole GPUs on nodes labelled z=q" in failure.reason
    assert "--labels" in failure.reason


def test_failure_reason_for_a_request_without_gpu():
    failure = only_failure(both_modes(cluster(node("a", cpu=100)), [plain("p", cpu=200)]))
    assert "fits 200m CPU, no GPU (1 node evaluated): cpu rejected 1 node" in failure.reason


def test_failure_on_an_empty_cluster_says_to_start_an_agent():
    failure = only_failure(both_modes(cluster(), [share("s", 1)]))
    assert failure.nodes_evaluated == 0 and failure.filter_rejections == {}
    assert "no nodes" in failure.reason and "gpufleet agent" in failure.reason


def test_repeated_failures_share_an_explanation_of_the_current_state():
    snapshot = cluster(node("a", 1), node("b", 1))
    requests = [share(f"s{i}", 60_000, deployment="d") for i in range(4)]
    plan = both_modes(snapshot, requests)
    assert len(plan.placements) == 2
    assert [dict(f.filter_rejections) for f in plan.failures] == [{"gpu_memory": 2}] * 2


def test_failure_explanation_reflects_placements_made_earlier_in_the_call():
    snapshot = cluster(node("a", 1), node("b", 1))
    requests = [share("big", 60_000)] + [share(f"t{i}", 30_000) for i in range(3)]
    plan = both_modes(snapshot, requests)
    # Both GPUs were free before the call; the failure explains the state it met.
    assert [f.instance_id for f in plan.failures] == ["t2"]
    assert plan.failures[0].filter_rejections == {"gpu_memory": 2}


# --- validation ----------------------------------------------------------------------------


def test_duplicate_instance_ids_are_rejected():
    with pytest.raises(ValueError, match="more than once"):
        schedule(cluster(node("a")), [share("s", 1), share("s", 2)])


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"gpus": 1, "gpu_memory_mib": 1}, "not both"),
        ({"gpu_core_percent": 101, "gpu_memory_mib": 1}, "0-100"),
        ({"gpu_core_percent": 10}, "needs memory"),
        ({"cpu_millis": -1}, "cpu_millis is -1"),
        ({"instance_id": ""}, "instance_id is empty"),
    ],
)
def test_bad_requests_are_rejected_with_the_fix(fields, message):
    base = {"instance_id": "i", "deployment": "d"}
    with pytest.raises(ValueError, match=message):
        InstanceRequest(**(base | fields))


def test_bad_snapshots_are_rejected_with_the_fix():
    with pytest.raises(ValueError, match="node ids repeat"):
        cluster(node("a"), node("a"))
    with pytest.raises(ValueError, match="uuids repeat"):
        cluster(node("a", (gpu("x", 0),)), node("b", (gpu("x", 0),)))
    with pytest.raises(ValueError, match="indexes"):
        node("a", (gpu("a", 0), dataclasses.replace(gpu("a", 1), index=0)))
    with pytest.raises(ValueError, match="memory_reserved_mib is -1"):
        GpuState(uuid="g", index=0, memory_total_mib=1, memory_reserved_mib=-1)
    with pytest.raises(ValueError, match="node_id is empty"):
        NodeState(node_id="")


def test_gpu_state_free_memory_and_untouched():
    assert gpu("a", 0, reserved=10, measured=30, total=100).memory_free_mib == 70
    assert gpu("a", 0, reserved=300, measured=30, total=100).memory_free_mib == 0
    assert gpu("a", 0, measured=30).untouched
    assert not gpu("a", 0, core=1).untouched
    assert not gpu("a", 0, owner="x").untouched
