"""NvmlProbe against a scripted pynvml that raises the real NVMLError classes."""

from __future__ import annotations

import sys

import pytest

from gpufleet.agent.gpu import GpuHealth, NvmlProbe, ProcessReading
from tests.fakes.fake_pynvml import (
    MIB,
    FakeGpu,
    FakeProcess,
    FakePynvml,
    FakeSample,
    NVMLError_DriverNotLoaded,
    NVMLError_GpuIsLost,
    NVMLError_LibraryNotFound,
    NVMLError_NoPermission,
    NVMLError_NotSupported,
    NVMLLibraryMismatchError,
)


def two_gpus() -> list[FakeGpu]:
    return [
        FakeGpu(
            uuid="GPU-aaaa",
            memory_total_bytes=81559 * MIB,
            memory_used_bytes=30000 * MIB,
            sm_util=42,
            processes=[FakeProcess(pid=101, used_gpu_memory_bytes=20000 * MIB), FakeProcess(102, 9000 * MIB)],
            samples=[FakeSample(pid=101, timestamp=1_000, sm_util=30), FakeSample(102, 1_100, 12)],
        ),
        FakeGpu(
            uuid="GPU-bbbb",
            name="NVIDIA L4",
            memory_total_bytes=23034 * MIB,
            memory_used_bytes=0,
            sm_util=0,
        ),
    ]


def started(fake: FakePynvml) -> NvmlProbe:
    probe = NvmlProbe(fake)
    assert probe.init() is None
    return probe


def test_two_gpus_normal_readings() -> None:
    fake = FakePynvml(two_gpus())
    result = started(fake).read()

    assert result.error is None
    assert result.driver_version == "550.54.15"
    first, second = result.gpus
    assert (first.uuid, first.index, first.name) == ("GPU-aaaa", 0, "NVIDIA H100 80GB HBM3")
    assert (first.memory_total_mib, first.memory_used_mib, first.sm_utilization_percent) == (81559, 30000, 42)
    assert first.health is GpuHealth.OK and first.health_message == ""
    assert first.processes == (ProcessReading(101, 20000, 30), ProcessReading(102, 9000, 12))
    assert (second.uuid, second.index, second.name, second.memory_total_mib) == ("GPU-bbbb", 1, "NVIDIA L4", 23034)
    assert second.health is GpuHealth.OK
    assert second.processes == ()


def test_used_memory_rounds_up_and_total_rounds_down_to_mib() -> None:
    gpu = FakeGpu(
        uuid="GPU-r",
        memory_total_bytes=1000 * MIB + 5,
        memory_used_bytes=10 * MIB + 1,
        processes=[FakeProcess(7, 1)],
    )
    reading = started(FakePynvml([gpu])).read().gpus[0]
    assert (reading.memory_total_mib, reading.memory_used_mib) == (1000, 11)
    assert reading.processes == (ProcessReading(7, 1, 0),)


def test_process_memory_not_reported_counts_zero_and_degrades() -> None:
    gpus = two_gpus()
    gpus[0].processes[1] = FakeProcess(pid=102, used_gpu_memory_bytes=None)
    result = started(FakePynvml(gpus)).read()

    reading = result.gpus[0]
    assert reading.health is GpuHealth.DEGRADED
    assert "pid 102" in reading.health_message and "0 MiB" in reading.health_message
    assert reading.processes == (ProcessReading(101, 20000, 30), ProcessReading(102, 0, 12))
    assert reading.memory_total_mib == 81559
    assert result.gpus[1].health is GpuHealth.OK


def test_process_utilization_not_supported_degrades_without_losing_memory() -> None:
    gpus = two_gpus()
    gpus[0].errors["nvmlDeviceGetProcessUtilization"] = NVMLError_NotSupported()
    result = started(FakePynvml(gpus)).read()

    reading = result.gpus[0]
    assert reading.health is GpuHealth.DEGRADED
    assert reading.health_message == "process SM utilization: Not Supported"
    assert reading.processes == (ProcessReading(101, 20000, 0), ProcessReading(102, 9000, 0))
    assert reading.sm_utilization_percent == 42
    assert result.gpus[1].health is GpuHealth.OK


def test_no_sample_since_last_read_is_zero_share_not_degraded() -> None:
    gpus = two_gpus()
    gpus[0].samples = []
    reading = started(FakePynvml(gpus)).read().gpus[0]
    assert reading.health is GpuHealth.OK
    assert reading.processes == (ProcessReading(101, 20000, 0), ProcessReading(102, 9000, 0))


def test_timestamps_are_carried_per_gpu_between_reads() -> None:
    gpus = two_gpus()
    gpus[1].samples = [FakeSample(pid=300, timestamp=5_000, sm_util=80)]
    fake = FakePynvml(gpus)
    probe = started(fake)

    probe.read()
    assert fake.last_seen_timestamps == [(0, 0), (1, 0)]

    # Only samples newer than the last one seen are new information.
    gpus[0].samples.append(FakeSample(pid=101, timestamp=2_000, sm_util=55))
    second = probe.read()
    assert fake.last_seen_timestamps[2:] == [(0, 1_100), (1, 5_000)]
    assert second.gpus[0].processes == (ProcessReading(101, 20000, 55), ProcessReading(102, 9000, 0))
    assert second.gpus[1].processes == ()

    probe.read()
    assert fake.last_seen_timestamps[4:] == [(0, 2_000), (1, 5_000)]


def test_newest_sample_of_a_process_wins_and_empty_slots_are_ignored() -> None:
    gpu = FakeGpu(
        uuid="GPU-s",
        samples=[
            FakeSample(pid=9, timestamp=300, sm_util=70),
            FakeSample(pid=9, timestamp=100, sm_util=10),
            FakeSample(pid=0, timestamp=0, sm_util=0),
            FakeSample(pid=8, timestamp=200, sm_util=250),
        ],
        empty_sample_slots=3,
    )
    fake = FakePynvml([gpu])
    probe = started(fake)
    reading = probe.read().gpus[0]
    # pid 8 has no memory entry (e.g. a graphics process) but its SM share still counts;
    # a nonsensical value above 100 is clamped.
    assert reading.processes == (ProcessReading(8, 0, 100), ProcessReading(9, 0, 70))
    probe.read()
    assert fake.last_seen_timestamps[-1] == (0, 300)


def test_one_gpu_lost_while_the_other_still_reads() -> None:
    gpus = two_gpus()
    fake = FakePynvml(gpus)
    probe = started(fake)
    assert probe.read().gpus[0].health is GpuHealth.OK

    gpus[0].lost = True
    result = probe.read()

    assert result.error is None
    lost, alive = result.gpus
    assert lost.health is GpuHealth.LOST
    assert lost.uuid == "GPU-aaaa"  # remembered from the read before it was lost
    assert "GPU is lost" in lost.health_message
    assert (lost.memory_total_mib, lost.processes) == (0, ())
    assert alive.health is GpuHealth.OK and alive.uuid == "GPU-bbbb"


def test_gpu_lost_before_any_read_gets_a_placeholder_uuid() -> None:
    gpus = two_gpus()
    gpus[1].lost = True
    result = started(FakePynvml(gpus)).read()
    assert result.gpus[0].health is GpuHealth.OK
    assert (result.gpus[1].uuid, result.gpus[1].health) == ("GPU-unknown-index-1", GpuHealth.LOST)


def test_gpu_lost_in_the_middle_of_its_readings() -> None:
    gpus = two_gpus()
    gpus[1].errors["nvmlDeviceGetMemoryInfo"] = NVMLError_GpuIsLost()
    result = started(FakePynvml(gpus)).read()
    assert result.gpus[0].health is GpuHealth.OK
    assert result.gpus[1].health is GpuHealth.LOST
    assert result.gpus[1].uuid == "GPU-bbbb"
    assert "memory: GPU is lost" in result.gpus[1].health_message


def test_gpu_that_cannot_be_opened_is_lost() -> None:
    gpus = two_gpus()
    gpus[0].errors["nvmlDeviceGetHandleByIndex"] = NVMLError_NoPermission()
    result = started(FakePynvml(gpus)).read()
    assert result.gpus[0].health is GpuHealth.LOST
    assert "Insufficient Permissions" in result.gpus[0].health_message
    assert result.gpus[1].health is GpuHealth.OK


def test_several_unsupported_readings_are_all_named() -> None:
    gpus = two_gpus()
    gpus[0].errors["nvmlDeviceGetUtilizationRates"] = NVMLError_NotSupported()
    gpus[0].errors["nvmlDeviceGetComputeRunningProcesses"] = NVMLLibraryMismatchError("use a versioned function")
    reading = started(FakePynvml(gpus)).read().gpus[0]
    assert reading.health is GpuHealth.DEGRADED
    assert reading.sm_utilization_percent == 0
    assert "SM utilization: Not Supported" in reading.health_message
    assert "processes: use a versioned function" in reading.health_message
    # Process SM shares still come through without the process list.
    assert reading.processes == (ProcessReading(101, 0, 30), ProcessReading(102, 0, 12))


def test_library_not_found_at_init() -> None:
    fake = FakePynvml(two_gpus(), init_error=NVMLError_LibraryNotFound())
    probe = NvmlProbe(fake)

    message = probe.init()
    assert message is not None
    assert "libnvidia-ml.so.1" in message and "--simulate-gpus" in message
    result = probe.read()
    assert result.gpus == ()
    assert result.error == message
    probe.shutdown()


def test_driver_not_loaded_at_init_then_loaded() -> None:
    fake = FakePynvml(two_gpus(), init_error=NVMLError_DriverNotLoaded())
    probe = NvmlProbe(fake)
    result = probe.read()
    assert result.gpus == ()
    assert result.error is not None and "driver is not loaded" in result.error

    fake.init_error = None
    result = probe.read()
    assert result.error is None and len(result.gpus) == 2


def test_driver_unloaded_while_running_reinitialises_on_next_read() -> None:
    fake = FakePynvml(two_gpus())
    probe = started(fake)
    fake.node_errors["nvmlDeviceGetCount"] = NVMLError_DriverNotLoaded()

    result = probe.read()
    assert result.gpus == ()
    assert result.error is not None and "Driver Not Loaded" in result.error
    assert fake.initialized == 0

    del fake.node_errors["nvmlDeviceGetCount"]
    assert len(probe.read().gpus) == 2
    assert fake.init_calls == 2


def test_unexpected_exception_is_reported_not_raised() -> None:
    gpus = two_gpus()
    gpus[0].errors["nvmlDeviceGetName"] = RuntimeError("ctypes blew up")
    result = started(FakePynvml(gpus)).read()
    assert result.gpus == ()
    assert result.error is not None and "ctypes blew up" in result.error


def test_bytes_from_older_pynvml_are_decoded() -> None:
    gpus = [FakeGpu(uuid=b"GPU-bytes", name=b"Tesla V100-SXM2-16GB")]
    result = started(FakePynvml(gpus, driver_version=b"470.82.01")).read()
    assert result.driver_version == "470.82.01"
    assert (result.gpus[0].uuid, result.gpus[0].name) == ("GPU-bytes", "Tesla V100-SXM2-16GB")


def test_read_initialises_lazily_and_shutdown_is_idempotent() -> None:
    fake = FakePynvml(two_gpus())
    probe = NvmlProbe(fake)
    assert len(probe.read().gpus) == 2
    assert fake.initialized == 1
    probe.shutdown()
    probe.shutdown()
    assert fake.initialized == 0


def test_missing_nvidia_ml_py_is_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    probe = NvmlProbe()
    message = probe.init()
    assert message is not None and "gpufleet[agent]" in message
    assert probe.read().error == message


def test_unexpected_exception_at_init_is_reported_not_raised() -> None:
    probe = NvmlProbe(FakePynvml([], init_error=OSError("libnvidia-ml.so.1: wrong ELF class")))
    message = probe.init()
    assert message is not None and "wrong ELF class" in message


def test_driver_version_that_cannot_be_read_is_empty() -> None:
    fake = FakePynvml(two_gpus())
    fake.node_errors["nvmlSystemGetDriverVersion"] = NVMLError_NotSupported()
    result = started(fake).read()
    assert (result.driver_version, result.error, len(result.gpus)) == ("", None, 2)
