"""The agent's metrics from simulated GPU readings and instance statuses (no server), and its
--metrics-listen flag."""

from __future__ import annotations

from collections.abc import Iterable

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from gpufleet.agent.agent import HeartbeatReadings
from gpufleet.agent.config import ConfigError
from gpufleet.agent.gpu.readings import GpuProbeResult
from gpufleet.agent.gpu.simulated import SimulatedGpus
from gpufleet.agent.main import main as agent_main
from gpufleet.agent.metrics import AgentCounters, agent_families, parse_metrics_listen
from gpufleet.agent.runtime.status import InstanceStatusSnapshot
from gpufleet.v1 import instance_pb2

COUNTERS = AgentCounters(
    heartbeats_sent=12, heartbeat_send_failures=2, connection_failures=3, connected=True
)


class _Families(Collector):
    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self._families


def _registry(readings: HeartbeatReadings | None, counters: AgentCounters) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(_Families(agent_families(readings, counters)))
    return registry


def _status(
    instance_id: str,
    state: instance_pb2.InstanceState.ValueType,
    memory_mib: int = 0,
    sm: int = 0,
    restarts: int = 0,
    overrun: bool = False,
) -> InstanceStatusSnapshot:
    return InstanceStatusSnapshot(
        instance_id=instance_id,
        deployment="echo",
        generation=1,
        state=state,
        reason="",
        pid=100,
        port=9000,
        restart_count=restarts,
        crash_loop=False,
        gpu_memory_used_mib=memory_mib,
        sm_utilization_percent=sm,
        gpu_memory_overrun=overrun,
    )


def _readings() -> HeartbeatReadings:
    gpus = SimulatedGpus((81559, 24576), node_name="box")
    gpus.set_declared_usage(gpus.uuids[0], "echo-1", 2048, 25, pid=100)
    gpus.set_declared_usage(gpus.uuids[0], "echo-2", 1024, 10, pid=101)
    return HeartbeatReadings(
        gpus=gpus.read(),
        instances=(
            _status("echo-1", instance_pb2.INSTANCE_STATE_READY, 2048, 25, restarts=1),
            _status("echo-2", instance_pb2.INSTANCE_STATE_READY, 3000, 10, overrun=True),
            _status("echo-3", instance_pb2.INSTANCE_STATE_FAILED, restarts=4),
        ),
    )


def test_per_gpu_readings_of_simulated_cards() -> None:
    registry = _registry(_readings(), COUNTERS)
    first, second = "GPU-sim-box-0", "GPU-sim-box-1"
    assert registry.get_sample_value("gpufleet_agent_gpu_probe_up") == 1
    assert registry.get_sample_value(
        "gpufleet_agent_gpu_memory_total_mib", {"gpu_uuid": first}
    ) == 81559
    assert registry.get_sample_value(
        "gpufleet_agent_gpu_memory_used_mib", {"gpu_uuid": first}
    ) == 3072
    assert registry.get_sample_value(
        "gpufleet_agent_gpu_sm_utilization_percent", {"gpu_uuid": first}
    ) == 35
    assert registry.get_sample_value(
        "gpufleet_agent_gpu_memory_used_mib", {"gpu_uuid": second}
    ) == 0
    health = "gpufleet_agent_gpu_health"
    assert registry.get_sample_value(health, {"gpu_uuid": first, "health": "simulated"}) == 1
    assert registry.get_sample_value(health, {"gpu_uuid": first, "health": "ok"}) == 0
    assert registry.get_sample_value(
        "gpufleet_agent_gpu_info", {"gpu_uuid": second, "index": "1", "name": "Simulated GPU 24GB"}
    ) == 1


def test_per_instance_use_restarts_and_states() -> None:
    registry = _registry(_readings(), COUNTERS)
    one = {"instance_id": "echo-1", "deployment": "echo"}
    two = {"instance_id": "echo-2", "deployment": "echo"}
    failed = {"instance_id": "echo-3", "deployment": "echo"}
    assert registry.get_sample_value("gpufleet_agent_instance_gpu_memory_used_mib", one) == 2048
    assert registry.get_sample_value("gpufleet_agent_instance_sm_utilization_percent", one) == 25
    assert registry.get_sample_value("gpufleet_agent_instance_gpu_memory_overrun", one) == 0
    assert registry.get_sample_value("gpufleet_agent_instance_gpu_memory_overrun", two) == 1
    assert registry.get_sample_value("gpufleet_agent_instance_restarts_total", one) == 1
    assert registry.get_sample_value("gpufleet_agent_instance_restarts_total", failed) == 4
    assert registry.get_sample_value("gpufleet_agent_instances", {"state": "ready"}) == 2
    assert registry.get_sample_value("gpufleet_agent_instances", {"state": "failed"}) == 1
    assert registry.get_sample_value("gpufleet_agent_instances", {"state": "draining"}) == 0


def test_counters_before_the_first_heartbeat() -> None:
    registry = _registry(None, COUNTERS)
    assert registry.get_sample_value("gpufleet_agent_heartbeats_sent_total") == 12
    assert registry.get_sample_value("gpufleet_agent_heartbeat_send_failures_total") == 2
    assert registry.get_sample_value("gpufleet_agent_connection_failures_total") == 3
    assert registry.get_sample_value("gpufleet_agent_connected") == 1
    assert registry.get_sample_value("gpufleet_agent_gpu_probe_up") is None


def test_a_probe_without_gpus_reads_as_down() -> None:
    readings = HeartbeatReadings(
        gpus=GpuProbeResult(gpus=(), driver_version="", error="NVML library not found"),
        instances=(),
    )
    registry = _registry(readings, COUNTERS)
    assert registry.get_sample_value("gpufleet_agent_gpu_probe_up") == 0


@pytest.mark.parametrize(
    ("text", "expected"),
    [("9402", ("127.0.0.1", 9402)), ("[::]:9402", ("::", 9402)), ("10.0.0.5:0", ("10.0.0.5", 0))],
)
def test_metrics_listen_forms(text: str, expected: tuple[str, int]) -> None:
    assert parse_metrics_listen(text) == expected


@pytest.mark.parametrize("text", ["", "host", ":1", "h:99999"])
def test_bad_metrics_listen_is_a_config_error(text: str) -> None:
    with pytest.raises(ConfigError, match="--metrics-listen"):
        parse_metrics_listen(text)


def test_agent_refuses_a_bad_metrics_listen_before_starting(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = agent_main(
        ["--server", "127.0.0.1:1", "--simulate-gpus", "1x1024", "--metrics-listen", "x:y"]
    )
    assert code == 2
    assert "--metrics-listen 'x:y' is not HOST:PORT" in capsys.readouterr().err
