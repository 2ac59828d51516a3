"""detect_probe, the heartbeat message conversion and the selftest script."""

from __future__ import annotations

import json
import logging

import pytest

from gpufleet.agent.gpu import GpuHealth, GpuProbeResult, GpuReading, NvmlProbe, SimulatedGpus, detect_probe
from gpufleet.agent.gpu.proto import gpus_to_proto
from gpufleet.agent.gpu.selftest import main as selftest_main
from gpufleet.v1 import node_pb2
from tests.fakes.fake_pynvml import FakeGpu, FakePynvml, NVMLError_DriverNotLoaded, NVMLError_LibraryNotFound


def test_simulate_flag_wins_and_nvml_is_not_touched() -> None:
    fake = FakePynvml([FakeGpu(uuid="GPU-real")])
    probe = detect_probe("2x81559", node_name="n1", nvml=fake)
    assert isinstance(probe, SimulatedGpus)
    assert [gpu.uuid for gpu in probe.read().gpus] == ["GPU-sim-n1-0", "GPU-sim-n1-1"]
    assert fake.init_calls == 0


def test_malformed_simulate_flag_stops_the_agent() -> None:
    with pytest.raises(ValueError, match="COUNTxMIB"):
        detect_probe("two", nvml=FakePynvml([]))


def test_nvml_is_used_when_it_finds_gpus() -> None:
    fake = FakePynvml([FakeGpu(uuid="GPU-real")])
    probe = detect_probe(None, nvml=fake)
    assert isinstance(probe, NvmlProbe)
    assert [gpu.uuid for gpu in probe.read().gpus] == ["GPU-real"]
    probe.shutdown()
    assert fake.initialized == 0


def test_no_driver_means_no_gpus_and_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    fake = FakePynvml([], init_error=NVMLError_LibraryNotFound())
    with caplog.at_level(logging.WARNING, logger="gpufleet.agent.gpu.detect"):
        probe = detect_probe(None, nvml=fake)
    result = probe.read()
    assert (result.gpus, result.error) == ((), None)
    (record,) = caplog.records
    assert "no GPU through NVML" in record.getMessage() and "libnvidia-ml.so.1" in record.getMessage()


def test_fallback_simulation_when_nvml_is_unavailable() -> None:
    fake = FakePynvml([], init_error=NVMLError_DriverNotLoaded())
    probe = detect_probe(None, node_name="laptop", fallback_simulate="1x24576", nvml=fake)
    assert [gpu.uuid for gpu in probe.read().gpus] == ["GPU-sim-laptop-0"]


def test_nvml_without_gpus_is_released_and_falls_back() -> None:
    fake = FakePynvml([])
    probe = detect_probe(None, fallback_simulate="1x1024", nvml=fake)
    assert isinstance(probe, SimulatedGpus)
    assert fake.initialized == 0


def test_readings_convert_to_heartbeat_messages() -> None:
    def reading(index: int, health: GpuHealth) -> GpuReading:
        return GpuReading(f"GPU-{index}", index, "NVIDIA L4", 23034, 100 + index, 7, health, "why", ())

    messages = gpus_to_proto(
        GpuProbeResult(gpus=(reading(1, GpuHealth.LOST), reading(0, GpuHealth.DEGRADED)), driver_version="", error=None)
    )
    assert messages == [
        node_pb2.Gpu(
            uuid="GPU-0",
            index=0,
            name="NVIDIA L4",
            memory_total_mib=23034,
            memory_used_mib=100,
            sm_utilization_percent=7,
            health=node_pb2.GPU_HEALTH_DEGRADED,
            health_message="why",
        ),
        node_pb2.Gpu(
            uuid="GPU-1",
            index=1,
            name="NVIDIA L4",
            memory_total_mib=23034,
            memory_used_mib=101,
            sm_utilization_percent=7,
            health=node_pb2.GPU_HEALTH_LOST,
            health_message="why",
        ),
    ]
    all_kinds = GpuProbeResult(
        gpus=tuple(reading(index, health) for index, health in enumerate(GpuHealth)), driver_version="", error=None
    )
    every_health = {gpu.health for gpu in gpus_to_proto(all_kinds)}
    assert node_pb2.GPU_HEALTH_UNSPECIFIED not in every_health and len(every_health) == len(GpuHealth)


def test_selftest_prints_readings_as_json(capsys: pytest.CaptureFixture[str]) -> None:
    code = selftest_main(["--simulate-gpus", "1x24576", "--reads", "2", "--interval", "0", "--pid", "1"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    assert report["probe"] == "SimulatedGpus"
    assert len(report["readings"]) == 2
    gpu = report["readings"][0]["gpus"][0]
    assert (gpu["uuid"], gpu["memory_total_mib"], gpu["health"]) == ("GPU-sim-selftest-0", 24576, "SIMULATED")
    assert report["readings"][0]["attribution"] == {"pid-1": {"memory_used_mib": 0, "sm_percent": 0, "gpus": []}}
