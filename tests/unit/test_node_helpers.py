"""Node-side helpers: assignment env, heartbeat write filtering, addresses, node auth,
register validation, route endpoints, gateway load board."""

from __future__ import annotations

import pytest

from gpufleet.server.api.node_handlers import validate_register
from gpufleet.server.api.node_session import address_of, peer_host, report_of, worth_writing
from gpufleet.server.api.routes import endpoints
from gpufleet.server.assignments import assignment, desired_instances
from gpufleet.server.auth import NODE_ID_METADATA, NodeCredentials, node_guard
from gpufleet.server.load_reports import LoadBoard
from gpufleet.server.store import InstanceRecord
from gpufleet.server.tokens import sha256_hex
from gpufleet.v1 import deployment_pb2, instance_pb2, node_service_pb2, routing_service_pb2

State = instance_pb2.InstanceState


def record(
    gpu: deployment_pb2.GpuRequest,
    uuids: list[str],
    *,
    draining: bool = False,
    lost: bool = False,
    state: instance_pb2.InstanceState.ValueType = State.INSTANCE_STATE_READY,
    ready_time: bool = True,
    instance_id: str = "echo-1",
) -> InstanceRecord:
    instance = instance_pb2.Instance(
        id=instance_id, deployment="echo", generation=3, node_id="node-1", gpu_uuids=uuids,
        state=state, address="10.0.0.5:9000", gpu_memory_reserved_mib=gpu.memory_mib,
    )
    if ready_time:
        instance.ready_time.seconds = 5
    return InstanceRecord(
        instance,
        deployment_pb2.DeploymentSpec(command="serve --port $PORT", env={"A": "1"}, gpu=gpu),
        draining,
        lost,
    )


def test_share_assignment_carries_gpu_and_mps_env() -> None:
    got = assignment(record(deployment_pb2.GpuRequest(memory_mib=2048, core_percent=25), ["GPU-x"]))
    assert got.env["CUDA_VISIBLE_DEVICES"] == "GPU-x"
    assert got.env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "25"
    assert got.env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == "0=2048M"
    assert got.env["A"] == "1"
    assert (got.instance_id, got.generation, got.command, got.gpu_memory_mib) == (
        "echo-1", 3, "serve --port $PORT", 2048,
    )


def test_whole_gpu_and_cpu_only_assignments() -> None:
    whole = assignment(record(deployment_pb2.GpuRequest(count=2), ["GPU-a", "GPU-b"]))
    assert whole.env["CUDA_VISIBLE_DEVICES"] == "GPU-a,GPU-b"
    assert "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE" not in whole.env
    cpu = assignment(record(deployment_pb2.GpuRequest(), []))
    assert cpu.env["CUDA_VISIBLE_DEVICES"] == ""


def test_desired_set_leaves_lost_out_and_flags_draining() -> None:
    gpu = deployment_pb2.GpuRequest()
    desired = desired_instances(
        [
            record(gpu, [], instance_id="b", draining=True),
            record(gpu, [], instance_id="a"),
            record(gpu, [], instance_id="c", lost=True),
        ]
    )
    assert [(a.instance_id, a.draining) for a in desired.instances] == [("a", False), ("b", True)]


@pytest.mark.parametrize(
    ("host", "port", "want"),
    [("10.0.0.5", 9000, "10.0.0.5:9000"), ("::1", 9000, "[::1]:9000"), ("h", 0, ""),
     ("", 9000, "")],
)  # fmt: skip
def test_address_of(host: str, port: int, want: str) -> None:
    assert address_of(host, port) == want


@pytest.mark.parametrize(
    ("peer", "want"),
    [("ipv4:127.0.0.1:4242", "127.0.0.1"), ("ipv6:[::1]:4242", "::1"), ("unix:/tmp/s", "")],
)
def test_peer_host(peer: str, want: str) -> None:
    assert peer_host(peer) == want


def status(**fields: int) -> node_service_pb2.InstanceStatus:
    base = {"state": State.INSTANCE_STATE_READY, "pid": 10, "port": 9000,
            "gpu_memory_used_mib": 2000, "sm_utilization_percent": 30}
    base.update(fields)
    return node_service_pb2.InstanceStatus(instance_id="echo-1", **base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("change", "written"),
    [
        ({}, False),
        ({"gpu_memory_used_mib": 2050}, False),  # jitter
        ({"gpu_memory_used_mib": 2200}, True),
        ({"sm_utilization_percent": 35}, False),
        ({"sm_utilization_percent": 45}, True),
        ({"state": State.INSTANCE_STATE_FAILED}, True),
        ({"pid": 11}, True),
        ({"port": 9001}, True),
        ({"restart_count": 1}, True),
    ],
)
def test_heartbeat_reports_are_written_only_on_real_change(
    change: dict[str, int], written: bool
) -> None:
    old = report_of(status(), "10.0.0.5")
    new = report_of(status(**change), "10.0.0.5")
    assert worth_writing(old, new) is written
    assert worth_writing(None, new)


def test_node_guard_needs_the_nodes_own_secret() -> None:
    credentials = NodeCredentials({"node-1": sha256_hex("s1"), "node-2": sha256_hex("s2")})
    guard = node_guard(credentials)
    assert guard.verify("s1", [(NODE_ID_METADATA, "node-1")])
    assert not guard.verify("s2", [(NODE_ID_METADATA, "node-1")])
    assert not guard.verify("s1", [])
    assert not guard.verify("s1", [(NODE_ID_METADATA, "node-9")])
    assert guard.required_metadata == (NODE_ID_METADATA,)


def test_register_validation() -> None:
    from gpufleet.v1 import node_service_pb2 as pb

    assert validate_register(pb.RegisterRequest(node_name="gpu-1", labels={"zone": "a"})) == []
    labels = {"bad key": "v", "k": "x" * 300}
    bad = validate_register(pb.RegisterRequest(node_name="", labels=labels))
    assert [v.field for v in bad] == ["node_name", "labels['bad key']", "labels['k']"]


def test_route_endpoints() -> None:
    gpu = deployment_pb2.GpuRequest()
    rows = [
        record(gpu, [], instance_id="ready"),
        record(gpu, [], instance_id="draining", draining=True, state=State.INSTANCE_STATE_DRAINING),
        record(
            gpu, [], instance_id="starting", state=State.INSTANCE_STATE_STARTING, ready_time=False
        ),
        record(gpu, [], instance_id="drain-never-ready", draining=True,
               state=State.INSTANCE_STATE_DRAINING, ready_time=False),
        record(gpu, [], instance_id="stopped", draining=True, state=State.INSTANCE_STATE_STOPPED),
        record(gpu, [], instance_id="lost", lost=True),
    ]
    got = [(e.instance_id, e.draining) for e in endpoints(rows, deleting=False)]
    assert got == [("draining", True), ("ready", False)]
    assert [(e.instance_id, e.draining) for e in endpoints(rows, deleting=True)] == [
        ("draining", True), ("ready", True),
    ]


def test_load_board_sums_fresh_gateways_and_hands_requests_out_once() -> None:
    board = LoadBoard(expire_after=3.0, started_wall=1000.0)
    load = routing_service_pb2.DeploymentLoad
    busy = load(deployment="echo", queue_depth=2, in_flight=1, wakeups=1)
    assert board.report("g1", [busy], 10.0, 2000.0)
    assert not board.report("g2", [load(deployment="echo", in_flight=3)], 11.0, 2001.0)
    demand = board.demand(12.0)["echo"]
    assert (demand.queue_depth, demand.in_flight, demand.wakeups) == (2, 4, 1)
    assert demand.last_busy == 2001.0
    assert board.demand(12.0)["echo"].wakeups == 0
    later = board.demand(13.5)["echo"]  # g1 expired
    assert (later.queue_depth, later.in_flight) == (0, 3)
