"""Metrics of the control plane and the gateway without a server: the pure metric families
from fake state, the gateway's call accounting, the status of a forwarded call, the
loop bridge, and the --metrics-listen parsing."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any, cast

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from gpufleet.gateway.call_observer import (
    CLIENT_CANCELLED,
    DEADLINE_PASSED,
    GATEWAY_INTERNAL,
    INSTANCE_STATUS,
    UNKNOWN_DEPLOYMENT,
    call_outcome,
)
from gpufleet.gateway.main import main as gateway_main
from gpufleet.gateway.metrics import DeploymentLive, GatewayMetrics, live_families
from gpufleet.gateway.route_table import RouteTable
from gpufleet.gateway.rpc_errors import CallError
from gpufleet.gateway.upstreams import UpstreamPool
from gpufleet.server.errors import StartupError
from gpufleet.server.metrics import ControlPlaneState, ReconcileMetrics, control_plane_families
from gpufleet.server.metrics_http import parse_metrics_listen, read_on_loop
from gpufleet.v1 import deployment_pb2, instance_pb2, node_pb2


class _Families(Collector):
    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self._families


def _registry(*collectors: Collector) -> CollectorRegistry:
    registry = CollectorRegistry()
    for collector in collectors:
        registry.register(collector)
    return registry


def _value(registry: CollectorRegistry, metric: str, **labels: str) -> float | None:
    return registry.get_sample_value(metric, labels)


# --- control plane ---------------------------------------------------------------------------


def _deployment(name: str, phase: int, desired: int) -> deployment_pb2.Deployment:
    return deployment_pb2.Deployment(
        name=name,
        status=deployment_pb2.DeploymentStatus(
            phase=cast(deployment_pb2.DeploymentPhase.ValueType, phase),
            desired_instances=desired,
        ),
    )


def _instance(instance_id: str, deployment: str, state: int) -> instance_pb2.Instance:
    return instance_pb2.Instance(
        id=instance_id,
        deployment=deployment,
        state=cast(instance_pb2.InstanceState.ValueType, state),
    )


def _plane_state() -> ControlPlaneState:
    seen = Timestamp(seconds=1_700_000_000, nanos=500_000_000)
    nodes = [
        node_pb2.Node(
            id="node-a",
            name="box-a",
            agent_version="0.1.0",
            state=node_pb2.NODE_STATE_READY,
            last_heartbeat_time=seen,
            gpus=[
                node_pb2.Gpu(
                    uuid="GPU-0",
                    memory_total_mib=81559,
                    memory_reserved_mib=4096,
                    memory_used_mib=5000,
                    sm_utilization_percent=40,
                    core_reserved_percent=50,
                ),
                node_pb2.Gpu(uuid="GPU-1", memory_total_mib=24576),
            ],
        ),
        node_pb2.Node(id="node-b", name="box-b", state=node_pb2.NODE_STATE_LOST),
    ]
    return ControlPlaneState(
        deployments=[
            _deployment("echo", deployment_pb2.DEPLOYMENT_PHASE_RUNNING, 2),
            _deployment("idle", deployment_pb2.DEPLOYMENT_PHASE_STANDBY, 0),
        ],
        instances=[
            _instance("echo-1", "echo", instance_pb2.INSTANCE_STATE_READY),
            _instance("echo-2", "echo", instance_pb2.INSTANCE_STATE_READY),
            _instance("echo-3", "echo", instance_pb2.INSTANCE_STATE_STARTING),
        ],
        nodes=nodes,
    )


def test_control_plane_counts_deployments_instances_and_nodes_by_state() -> None:
    registry = _registry(_Families(control_plane_families(_plane_state())))
    assert _value(registry, "gpufleet_server_deployments", phase="running") == 1
    assert _value(registry, "gpufleet_server_deployments", phase="standby") == 1
    assert _value(registry, "gpufleet_server_deployments", phase="failed") == 0
    assert _value(registry, "gpufleet_server_deployments", phase="unspecified") is None
    assert _value(registry, "gpufleet_server_deployment_desired_instances", deployment="echo") == 2
    assert _value(registry, "gpufleet_server_instances", deployment="echo", state="ready") == 2
    assert _value(registry, "gpufleet_server_instances", deployment="echo", state="starting") == 1
    # Zero series exist for every state of every deployment, also one without instances.
    assert _value(registry, "gpufleet_server_instances", deployment="echo", state="failed") == 0
    assert _value(registry, "gpufleet_server_instances", deployment="idle", state="ready") == 0
    assert _value(registry, "gpufleet_server_nodes", state="ready") == 1
    assert _value(registry, "gpufleet_server_nodes", state="lost") == 1
    assert _value(registry, "gpufleet_server_nodes", state="suspect") == 0
    assert (
        _value(registry, "gpufleet_server_node_info", node="node-a", name="box-a",
               agent_version="0.1.0")
        == 1
    )
    assert (
        _value(registry, "gpufleet_server_node_last_heartbeat_timestamp_seconds", node="node-a")
        == 1_700_000_000.5
    )
    assert (
        _value(registry, "gpufleet_server_node_last_heartbeat_timestamp_seconds", node="node-b")
        is None
    )


def test_control_plane_gpu_gauges_show_reserved_and_measured() -> None:
    registry = _registry(_Families(control_plane_families(_plane_state())))
    gpu = {"node": "node-a", "gpu_uuid": "GPU-0"}
    assert _value(registry, "gpufleet_server_gpu_memory_total_mib", **gpu) == 81559
    assert _value(registry, "gpufleet_server_gpu_memory_reserved_mib", **gpu) == 4096
    assert _value(registry, "gpufleet_server_gpu_memory_used_mib", **gpu) == 5000
    assert _value(registry, "gpufleet_server_gpu_sm_utilization_percent", **gpu) == 40
    assert _value(registry, "gpufleet_server_gpu_core_reserved_percent", **gpu) == 50
    idle = {"node": "node-a", "gpu_uuid": "GPU-1"}
    assert _value(registry, "gpufleet_server_gpu_memory_total_mib", **idle) == 24576
    assert _value(registry, "gpufleet_server_gpu_memory_reserved_mib", **idle) == 0


def test_an_unknown_enum_value_still_counts() -> None:
    state = ControlPlaneState(
        deployments=[_deployment("new", deployment_pb2.DEPLOYMENT_PHASE_UNSPECIFIED, 0)],
        instances=[],
        nodes=[],
    )
    registry = _registry(_Families(control_plane_families(state)))
    assert _value(registry, "gpufleet_server_deployments", phase="unspecified") == 1


def test_reconcile_metrics_count_passes_and_durations() -> None:
    reconcile = ReconcileMetrics()
    registry = _registry(reconcile)
    assert _value(registry, "gpufleet_server_reconcile_passes_total", result="failed") == 0
    reconcile.observe_pass(0.003, failed=False)
    reconcile.observe_pass(0.2, failed=False)
    reconcile.observe_pass(1.5, failed=True)
    assert _value(registry, "gpufleet_server_reconcile_passes_total", result="ok") == 2
    assert _value(registry, "gpufleet_server_reconcile_passes_total", result="failed") == 1
    assert _value(registry, "gpufleet_server_reconcile_duration_seconds_count") == 3
    assert _value(registry, "gpufleet_server_reconcile_duration_seconds_bucket", le="0.005") == 1
    assert _value(registry, "gpufleet_server_reconcile_duration_seconds_sum") == pytest.approx(
        1.703
    )


# --- gateway ----------------------------------------------------------------------------------


def test_live_families_per_deployment() -> None:
    families = live_families(
        True,
        [
            DeploymentLive("echo", queue_depth=3, in_flight=2, ready_instances=1),
            DeploymentLive("cold", queue_depth=0, in_flight=0, ready_instances=0),
        ],
    )
    registry = _registry(_Families(families))
    assert _value(registry, "gpufleet_gateway_queue_depth", deployment="echo") == 3
    assert _value(registry, "gpufleet_gateway_in_flight_requests", deployment="echo") == 2
    assert _value(registry, "gpufleet_gateway_ready_instances", deployment="echo") == 1
    assert _value(registry, "gpufleet_gateway_ready_instances", deployment="cold") == 0
    assert _value(registry, "gpufleet_gateway_route_table_synced") == 1


async def _scrape(registry: CollectorRegistry, metric: str, **labels: str) -> float | None:
    # As the HTTP server does: from another thread, while the loop runs.
    return await asyncio.to_thread(registry.get_sample_value, metric, labels)


async def test_gateway_metrics_account_each_outcome_once() -> None:
    metrics = GatewayMetrics(RouteTable(UpstreamPool()), asyncio.get_running_loop())
    registry = _registry(metrics)
    exhausted = grpc.StatusCode.RESOURCE_EXHAUSTED
    # A refused call, an unknown deployment, a cold start served, an instance error, and a
    # call cancelled in the queue.
    metrics.arrived("echo", "model_infer")
    metrics.rejected("echo", "model_infer", exhausted, "QUEUE_FULL")
    metrics.arrived(UNKNOWN_DEPLOYMENT, "proxy")
    metrics.rejected(UNKNOWN_DEPLOYMENT, "proxy", grpc.StatusCode.NOT_FOUND, "ROUTE_TARGET_NOT_FOUND")
    metrics.arrived("echo", "model_infer")
    metrics.cold_start("echo")
    metrics.admitted("echo", "model_infer", True, 2.0)
    metrics.ended("echo", "model_infer", grpc.StatusCode.OK, "", 2.01)
    metrics.arrived("echo", "model_infer")
    metrics.admitted("echo", "model_infer", False, 0.0)
    metrics.ended("echo", "model_infer", grpc.StatusCode.INVALID_ARGUMENT, INSTANCE_STATUS, 0.004)
    metrics.arrived("echo", "model_stream_infer")
    metrics.ended("echo", "model_stream_infer", grpc.StatusCode.CANCELLED, CLIENT_CANCELLED, None)

    async def value(metric: str, **labels: str) -> float | None:
        return await _scrape(registry, metric, **labels)

    assert await value("gpufleet_gateway_requests_total", deployment="echo", kind="model_infer") == 3
    assert (
        await value("gpufleet_gateway_requests_total", deployment="echo", kind="model_stream_infer")
        == 1
    )
    assert (
        await value("gpufleet_gateway_requests_total", deployment=UNKNOWN_DEPLOYMENT, kind="proxy")
        == 1
    )
    assert await value("gpufleet_gateway_rejected_total", deployment="echo", reason="QUEUE_FULL") == 1
    assert (
        await value(
            "gpufleet_gateway_errors_total",
            deployment="echo",
            code="RESOURCE_EXHAUSTED",
            reason="QUEUE_FULL",
        )
        == 1
    )
    assert (
        await value(
            "gpufleet_gateway_errors_total",
            deployment="echo",
            code="INVALID_ARGUMENT",
            reason=INSTANCE_STATUS,
        )
        == 1
    )
    assert (
        await value(
            "gpufleet_gateway_errors_total",
            deployment="echo",
            code="CANCELLED",
            reason=CLIENT_CANCELLED,
        )
        == 1
    )
    # Cancelled in the queue: an error, not a rejection, and no duration.
    assert (
        await value("gpufleet_gateway_rejected_total", deployment="echo", reason=CLIENT_CANCELLED)
        is None
    )
    assert (
        await value(
            "gpufleet_gateway_request_duration_seconds_count",
            deployment="echo",
            kind="model_infer",
        )
        == 2
    )
    assert (
        await value(
            "gpufleet_gateway_request_duration_seconds_count",
            deployment="echo",
            kind="model_stream_infer",
        )
        == 0
    )
    assert await value("gpufleet_gateway_cold_starts_total", deployment="echo") == 1
    assert await value("gpufleet_gateway_cold_start_duration_seconds_count", deployment="echo") == 1
    assert await value("gpufleet_gateway_cold_start_duration_seconds_sum", deployment="echo") == 2.0
    # The empty route table still answers the scrape-time part.
    assert await value("gpufleet_gateway_route_table_synced") == 0


class _Context:
    """The two ServicerContext methods call_outcome reads."""

    def __init__(self, code: grpc.StatusCode | None = None, remaining: float | None = None):
        self._code = code
        self._remaining = remaining

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def time_remaining(self) -> float | None:
        return self._remaining


def _outcome(error: BaseException | None, context: _Context) -> tuple[grpc.StatusCode, str]:
    return call_outcome(error, cast(grpc.aio.ServicerContext[Any, Any], context))


def test_call_outcome_names_who_ended_the_call() -> None:
    assert _outcome(None, _Context()) == (grpc.StatusCode.OK, "")
    refused = CallError(grpc.StatusCode.RESOURCE_EXHAUSTED, "full", reason="QUEUE_FULL")
    assert _outcome(refused, _Context()) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "QUEUE_FULL")
    from_instance = _Context(code=grpc.StatusCode.UNAVAILABLE)
    assert _outcome(grpc.aio.AbortError(), from_instance) == (
        grpc.StatusCode.UNAVAILABLE,
        INSTANCE_STATUS,
    )
    cancelled = asyncio.CancelledError()
    assert _outcome(cancelled, _Context(remaining=None)) == (
        grpc.StatusCode.CANCELLED,
        CLIENT_CANCELLED,
    )
    assert _outcome(cancelled, _Context(remaining=3.0)) == (
        grpc.StatusCode.CANCELLED,
        CLIENT_CANCELLED,
    )
    assert _outcome(cancelled, _Context(remaining=0.0)) == (
        grpc.StatusCode.DEADLINE_EXCEEDED,
        DEADLINE_PASSED,
    )
    assert _outcome(KeyError("bug"), _Context()) == (grpc.StatusCode.INTERNAL, GATEWAY_INTERNAL)


# --- the loop bridge and the flag -------------------------------------------------------------


async def test_read_on_loop_refuses_the_loop_thread_and_times_out() -> None:
    loop = asyncio.get_running_loop()

    async def answer() -> int:
        return 42

    async def stuck() -> int:
        await asyncio.Event().wait()
        return 0

    with pytest.raises(RuntimeError, match="own thread"):
        read_on_loop(loop, answer)
    assert await asyncio.to_thread(read_on_loop, loop, answer) == 42
    with pytest.raises(TimeoutError):
        await asyncio.to_thread(read_on_loop, loop, stuck, 0.05)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("9400", ("127.0.0.1", 9400)),
        ("0.0.0.0:9400", ("0.0.0.0", 9400)),
        ("[::1]:0", ("::1", 0)),
        (" localhost:65535 ", ("localhost", 65535)),
    ],
)
def test_metrics_listen_forms(text: str, expected: tuple[str, int]) -> None:
    assert parse_metrics_listen(text) == expected


@pytest.mark.parametrize("text", ["", "host", "host:", ":9400", "host:port", "host:65536"])
def test_bad_metrics_listen_names_the_flag(text: str) -> None:
    with pytest.raises(StartupError, match="--metrics-listen"):
        parse_metrics_listen(text)


def test_gateway_refuses_a_bad_metrics_listen_before_starting(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = gateway_main(["--token", "t", "--metrics-listen", "nine"])
    assert code == 2
    assert "--metrics-listen 'nine' is not HOST:PORT" in capsys.readouterr().err
