"""A scripted stand-in for the ``pynvml`` module (nvidia-ml-py), for machines without a GPU.

FakePynvml has the functions the GPU probe calls, under pynvml's names and signatures, and
returns pynvml's own result structures (c_nvmlMemory_t, c_nvmlUtilization_t,
c_nvmlProcessUtilizationSample_t, nvmlFriendlyObject). Errors are the real
``pynvml.NVMLError_*`` classes, re-exported here and set on every FakePynvml, so isinstance
checks behave exactly as they do with a driver. Like NVML, every device call before nvmlInit
raises NVMLError_Uninitialized, which catches a probe that forgets to initialise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pynvml as _real
from pynvml import (
    NVMLError,
    NVMLError_DriverNotLoaded,
    NVMLError_GpuIsLost,
    NVMLError_InvalidArgument,
    NVMLError_LibraryNotFound,
    NVMLError_NoPermission,
    NVMLError_NotFound,
    NVMLError_NotSupported,
    NVMLError_Uninitialized,
    NVMLError_Unknown,
    NVMLLibraryMismatchError,
)

__all__ = [
    "FakeGpu",
    "FakeProcess",
    "FakePynvml",
    "FakeSample",
    "NVMLError",
    "NVMLError_DriverNotLoaded",
    "NVMLError_GpuIsLost",
    "NVMLError_InvalidArgument",
    "NVMLError_LibraryNotFound",
    "NVMLError_NoPermission",
    "NVMLError_NotFound",
    "NVMLError_NotSupported",
    "NVMLError_Uninitialized",
    "NVMLError_Unknown",
    "NVMLLibraryMismatchError",
    "MIB",
]

MIB = 1024 * 1024


@dataclass
class FakeProcess:
    """One entry of nvmlDeviceGetComputeRunningProcesses."""

    pid: int
    used_gpu_memory_bytes: int | None
    """None is what pynvml returns when NVML cannot tell (NVML_VALUE_NOT_AVAILABLE)."""


@dataclass
class FakeSample:
    """One entry of nvmlDeviceGetProcessUtilization."""

    pid: int
    timestamp: int
    """CPU timestamp of the sample, microseconds."""
    sm_util: int


@dataclass
class FakeGpu:
    """Scripted readings of one GPU; tests change them between reads."""

    uuid: str | bytes
    name: str | bytes = "NVIDIA H100 80GB HBM3"
    memory_total_bytes: int = 81559 * MIB
    memory_used_bytes: int = 0
    sm_util: int = 0
    processes: list[FakeProcess] = field(default_factory=list)
    samples: list[FakeSample] = field(default_factory=list)
    errors: dict[str, BaseException] = field(default_factory=dict)
    """pynvml function name -> the exception that function raises for this GPU."""
    empty_sample_slots: int = 0
    """Zeroed entries (pid 0) appended to process utilization results, as NVML's buffer has."""
    lost: bool = False
    """Every call for this GPU, getting its handle included, raises NVMLError_GpuIsLost."""


@dataclass(frozen=True)
class FakeHandle:
    index: int


class FakePynvml:
    """Quacks like the pynvml module over scripted GPUs."""

    def __init__(
        self,
        gpus: list[FakeGpu],
        driver_version: str | bytes = "550.54.15",
        init_error: BaseException | None = None,
    ) -> None:
        self.gpus = gpus
        self.driver_version = driver_version
        self.init_error = init_error
        """Raised by nvmlInit (e.g. NVMLError_LibraryNotFound()) while set."""
        self.node_errors: dict[str, BaseException] = {}
        """Function name -> exception for calls not about one GPU (nvmlDeviceGetCount, ...)."""
        self.initialized = 0
        self.init_calls = 0
        self.last_seen_timestamps: list[tuple[int, int]] = []
        """(GPU index, lastSeenTimeStamp) of every nvmlDeviceGetProcessUtilization call."""

    def _node_call(self, name: str) -> None:
        if self.initialized <= 0:
            raise NVMLError_Uninitialized()
        if name in self.node_errors:
            raise self.node_errors[name]

    def _gpu(self, name: str, handle: Any) -> FakeGpu:
        self._node_call(name)
        if not isinstance(handle, FakeHandle) or not 0 <= handle.index < len(self.gpus):
            raise NVMLError_InvalidArgument()
        gpu = self.gpus[handle.index]
        if gpu.lost:
            raise NVMLError_GpuIsLost()
        if name in gpu.errors:
            raise gpu.errors[name]
        return gpu

    def nvmlInit(self) -> None:
        self.init_calls += 1
        if self.init_error is not None:
            raise self.init_error
        self.initialized += 1

    def nvmlShutdown(self) -> None:
        self._node_call("nvmlShutdown")
        self.initialized -= 1

    def nvmlSystemGetDriverVersion(self) -> str | bytes:
        self._node_call("nvmlSystemGetDriverVersion")
        return self.driver_version

    def nvmlDeviceGetCount(self) -> int:
        self._node_call("nvmlDeviceGetCount")
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeHandle:
        handle = FakeHandle(index)
        self._gpu("nvmlDeviceGetHandleByIndex", handle)
        return handle

    def nvmlDeviceGetUUID(self, handle: Any) -> str | bytes:
        return self._gpu("nvmlDeviceGetUUID", handle).uuid

    def nvmlDeviceGetName(self, handle: Any) -> str | bytes:
        return self._gpu("nvmlDeviceGetName", handle).name

    def nvmlDeviceGetMemoryInfo(self, handle: Any) -> Any:
        gpu = self._gpu("nvmlDeviceGetMemoryInfo", handle)
        return _real.c_nvmlMemory_t(
            total=gpu.memory_total_bytes,
            free=gpu.memory_total_bytes - gpu.memory_used_bytes,
            used=gpu.memory_used_bytes,
        )

    def nvmlDeviceGetUtilizationRates(self, handle: Any) -> Any:
        gpu = self._gpu("nvmlDeviceGetUtilizationRates", handle)
        return _real.c_nvmlUtilization_t(gpu=gpu.sm_util, memory=0)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: Any) -> list[Any]:
        gpu = self._gpu("nvmlDeviceGetComputeRunningProcesses", handle)
        return [
            _real.nvmlFriendlyObject(
                {
                    "pid": process.pid,
                    "usedGpuMemory": process.used_gpu_memory_bytes,
                    "gpuInstanceId": 0xFFFFFFFF,
                    "computeInstanceId": 0xFFFFFFFF,
                }
            )
            for process in gpu.processes
        ]

    def nvmlDeviceGetProcessUtilization(self, handle: Any, timeStamp: int) -> list[Any]:
        gpu = self._gpu("nvmlDeviceGetProcessUtilization", handle)
        self.last_seen_timestamps.append((handle.index, timeStamp))
        newer = [sample for sample in gpu.samples if sample.timestamp > timeStamp]
        if not newer:
            # NVML's documented answer when no sample is newer than lastSeenTimeStamp.
            raise NVMLError_NotFound()
        return [
            _real.c_nvmlProcessUtilizationSample_t(
                pid=sample.pid, timeStamp=sample.timestamp, smUtil=sample.sm_util, memUtil=0, encUtil=0, decUtil=0
            )
            for sample in newer
        ] + [_real.c_nvmlProcessUtilizationSample_t() for _ in range(gpu.empty_sample_slots)]


# Every error class of the real module, on every fake, as the probe looks them up by name.
for _name in dir(_real):
    if _name.startswith("NVMLError") or _name == "NVMLLibraryMismatchError":
        setattr(FakePynvml, _name, getattr(_real, _name))
