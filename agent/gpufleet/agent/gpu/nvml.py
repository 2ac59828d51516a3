"""GPU readings through NVML (nvidia-ml-py, import name ``pynvml``).

The pynvml module is a constructor argument, so tests hand in a fake at exactly that boundary
and everything above it is the code that runs on a GPU node.

How NVML errors map to readings (the probe never raises to its caller):
- library missing, driver not loaded, NVML uninitialised: the whole result has ``error`` set
  and no GPUs; the next read() tries to initialise NVML again.
- GPU lost, reset required, GPU not found, or its handle cannot be opened: that GPU is LOST,
  the other GPUs are still read.
- any other error on one reading (not supported, no permission, ...): that field is 0, the GPU
  is DEGRADED and health_message names the field and the error.
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from gpufleet.agent.gpu.readings import GpuHealth, GpuProbeResult, GpuReading, ProcessReading

_log = logging.getLogger(__name__)

_MIB = 1024 * 1024
_T = TypeVar("_T")

_SIMULATE_HINT = "or run the agent with --simulate-gpus COUNTxMIB (e.g. 2x81559) to simulate GPUs"

# Error classes by name, looked up on the injected module; older nvidia-ml-py releases lack
# some of them, which then simply never match.
_LOST_ERROR_NAMES = ("NVMLError_GpuIsLost", "NVMLError_ResetRequired", "NVMLError_GpuNotFound")
_UNUSABLE_ERROR_NAMES = (
    "NVMLError_LibraryNotFound",
    "NVMLError_DriverNotLoaded",
    "NVMLError_Uninitialized",
    "NVMLError_LibRmVersionMismatch",
)
_INIT_ADVICE = {
    "NVMLError_LibraryNotFound": "the NVML library (libnvidia-ml.so.1) is not installed: "
    f"install the NVIDIA driver, {_SIMULATE_HINT}",
    "NVMLError_DriverNotLoaded": "the NVIDIA kernel driver is not loaded: load it (nvidia-smi "
    f"must work), {_SIMULATE_HINT}",
    "NVMLError_NoPermission": "the agent may not use NVML: run it as a user that can open "
    f"/dev/nvidia*, {_SIMULATE_HINT}",
    "NVMLError_LibRmVersionMismatch": "the NVML library and the loaded kernel driver differ in "
    "version, typically after a driver upgrade: reload the nvidia kernel module or reboot",
}


class _GpuLost(Exception):
    """Nothing more can be read from this GPU."""


class _NvmlUnusable(Exception):
    """NVML as a whole stopped working (driver unloaded, library gone)."""


def _text(value: object) -> str:
    # nvidia-ml-py before 11.515 returns bytes for names and uuids.
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def _mib_floor(num_bytes: int) -> int:
    return max(0, int(num_bytes)) // _MIB


def _mib_ceil(num_bytes: int) -> int:
    # Used memory rounds up so that a share's measured use is never under-reported.
    return -(-max(0, int(num_bytes)) // _MIB)


def _percent(value: int) -> int:
    return min(100, max(0, int(value)))


class NvmlProbe:
    """Reads the node's GPUs through NVML. Thread-safe; read() may run in a worker thread."""

    def __init__(self, nvml: Any = None) -> None:
        """nvml: the pynvml module, or a fake with the same names; None imports pynvml."""
        self._import_error: str | None = None
        if nvml is None:
            try:
                nvml = importlib.import_module("pynvml")
            except ImportError as err:
                self._import_error = (
                    f"nvidia-ml-py is not installed ({err}): pip install 'gpufleet[agent]', "
                    f"{_SIMULATE_HINT}"
                )
        self._nvml: Any = nvml
        self._lock = threading.Lock()
        self._initialized = False
        # Process utilisation is read incrementally: NVML returns only samples newer than the
        # timestamp passed in, so the newest one seen is kept per GPU uuid between reads.
        self._last_sample_timestamp: dict[str, int] = {}
        # A GPU whose uuid can no longer be read keeps the uuid it had on earlier reads.
        self._uuid_by_index: dict[int, str] = {}
        self._lost_errors: tuple[type[BaseException], ...] = ()
        self._unusable_errors: tuple[type[BaseException], ...] = ()
        self._reading_errors: tuple[type[BaseException], ...] = ()
        self._no_samples_errors: tuple[type[BaseException], ...] = ()
        if nvml is not None:
            self._lost_errors = self._error_classes(_LOST_ERROR_NAMES)
            self._unusable_errors = self._error_classes(_UNUSABLE_ERROR_NAMES)
            self._reading_errors = self._error_classes(("NVMLError", "NVMLLibraryMismatchError"))
            self._no_samples_errors = self._error_classes(("NVMLError_NotFound",))

    def _error_classes(self, names: Iterable[str]) -> tuple[type[BaseException], ...]:
        found = (getattr(self._nvml, name, None) for name in names)
        return tuple(cls for cls in found if isinstance(cls, type) and issubclass(cls, BaseException))

    def init(self) -> str | None:
        """Initialise NVML. Returns None when it works, else why not and what to do about it."""
        with self._lock:
            return self._init_locked()

    def shutdown(self) -> None:
        """Release NVML; safe to call twice. A later read() initialises it again."""
        with self._lock:
            self._shutdown_locked()

    def read(self) -> GpuProbeResult:
        """Read every GPU now. Never raises: failures are in the result."""
        with self._lock:
            try:
                return self._read_locked()
            except Exception as err:  # the heartbeat loop must survive any driver surprise
                _log.exception("unexpected error while reading GPUs through NVML")
                return GpuProbeResult(gpus=(), driver_version="", error=f"unexpected error reading NVML: {err!r}")

    def _init_locked(self) -> str | None:
        if self._initialized:
            return None
        if self._nvml is None:
            return self._import_error
        try:
            self._nvml.nvmlInit()
        except self._reading_errors as err:
            advice = _INIT_ADVICE.get(type(err).__name__)
            if advice is None:
                return f"NVML initialisation failed ({err}); {_SIMULATE_HINT}"
            return f"NVML initialisation failed ({err}): {advice}"
        except Exception as err:  # init() reports, never raises, like read()
            _log.exception("unexpected error while initialising NVML")
            return f"NVML initialisation failed unexpectedly ({err!r}); {_SIMULATE_HINT}"
        self._initialized = True
        return None

    def _shutdown_locked(self) -> None:
        if not self._initialized:
            return
        self._initialized = False
        try:
            self._nvml.nvmlShutdown()
        except self._reading_errors as err:
            _log.warning("NVML shutdown failed (%s); the driver state is released at process exit", err)

    def _read_locked(self) -> GpuProbeResult:
        init_error = self._init_locked()
        if init_error is not None:
            return GpuProbeResult(gpus=(), driver_version="", error=init_error)
        try:
            driver_version = self._driver_version()
            count = self._node_call("GPU count", self._nvml.nvmlDeviceGetCount)
            gpus = tuple(self._read_gpu(index) for index in range(int(count)))
        except _NvmlUnusable as err:
            # Shut down so that the next read initialises NVML afresh, e.g. after the
            # driver is reloaded.
            self._shutdown_locked()
            return GpuProbeResult(gpus=(), driver_version="", error=str(err))
        return GpuProbeResult(gpus=gpus, driver_version=driver_version, error=None)

    def _driver_version(self) -> str:
        try:
            return _text(self._nvml.nvmlSystemGetDriverVersion())
        except self._unusable_errors as err:
            raise _NvmlUnusable(f"NVML stopped working while reading the driver version: {err}") from err
        except self._reading_errors as err:
            # Only a label in the heartbeat: not worth a warning on every read.
            _log.debug("cannot read the NVIDIA driver version: %s", err)
            return ""

    def _node_call(self, what: str, call: Callable[[], _T]) -> _T:
        try:
            return call()
        except self._reading_errors as err:
            raise _NvmlUnusable(f"NVML cannot read the {what}: {err}") from err

    def _field(self, what: str, call: Callable[[], _T], notes: list[str]) -> _T | None:
        """One NVML reading of one GPU: None (with a note) when it fails but the GPU is alive."""
        try:
            return call()
        except self._lost_errors as err:
            raise _GpuLost(f"{what}: {err}") from err
        except self._unusable_errors as err:
            raise _NvmlUnusable(f"NVML stopped working while reading {what}: {err}") from err
        except self._reading_errors as err:
            notes.append(f"{what}: {err}")
            return None

    def _lost(self, index: int, uuid: str | None, message: str) -> GpuReading:
        known_uuid = uuid or self._uuid_by_index.get(index) or f"GPU-unknown-index-{index}"
        return GpuReading(
            uuid=known_uuid,
            index=index,
            name="",
            memory_total_mib=0,
            memory_used_mib=0,
            sm_utilization_percent=0,
            health=GpuHealth.LOST,
            health_message=f"GPU {index} is lost ({message}); no new placements until NVML reads it again",
            processes=(),
        )

    def _read_gpu(self, index: int) -> GpuReading:
        nvml = self._nvml
        notes: list[str] = []
        uuid: str | None = None
        try:
            handle = self._field("handle", lambda: nvml.nvmlDeviceGetHandleByIndex(index), notes)
            if handle is None:
                # Without a handle (e.g. a GPU outside this container's device cgroup) nothing
                # of this GPU can be read, which is what LOST means to the scheduler.
                return self._lost(index, None, f"cannot open it, {notes[0]}")
            raw_uuid = self._field("uuid", lambda: nvml.nvmlDeviceGetUUID(handle), notes)
            if raw_uuid is not None:
                uuid = _text(raw_uuid)
                self._uuid_by_index[index] = uuid
            else:
                uuid = self._uuid_by_index.get(index, f"GPU-unknown-index-{index}")
            raw_name = self._field("name", lambda: nvml.nvmlDeviceGetName(handle), notes)
            memory = self._field("memory", lambda: nvml.nvmlDeviceGetMemoryInfo(handle), notes)
            utilization = self._field("SM utilization", lambda: nvml.nvmlDeviceGetUtilizationRates(handle), notes)
            processes = self._read_processes(handle, uuid, notes)
        except _GpuLost as err:
            return self._lost(index, uuid, str(err))
        return GpuReading(
            uuid=uuid,
            index=index,
            name=_text(raw_name) if raw_name is not None else "",
            memory_total_mib=_mib_floor(memory.total) if memory is not None else 0,
            memory_used_mib=_mib_ceil(memory.used) if memory is not None else 0,
            sm_utilization_percent=_percent(utilization.gpu) if utilization is not None else 0,
            health=GpuHealth.DEGRADED if notes else GpuHealth.OK,
            health_message="; ".join(notes),
            processes=processes,
        )

    def _read_processes(self, handle: object, uuid: str, notes: list[str]) -> tuple[ProcessReading, ...]:
        nvml = self._nvml
        memory_by_pid: dict[int, int] = {}
        unknown_memory: list[int] = []
        running = self._field("processes", lambda: nvml.nvmlDeviceGetComputeRunningProcesses(handle), notes)
        for process in running or ():
            pid = int(process.pid)
            used = process.usedGpuMemory
            if used is None:
                unknown_memory.append(pid)
            memory_by_pid[pid] = memory_by_pid.get(pid, 0) + (_mib_ceil(used) if used is not None else 0)
        if unknown_memory:
            pids = ", ".join(str(pid) for pid in sorted(set(unknown_memory)))
            notes.append(f"process memory: NVML does not report it for pid {pids} (counted as 0 MiB)")
        sm_by_pid = self._read_process_sm(handle, uuid, notes)
        return tuple(
            ProcessReading(pid=pid, memory_used_mib=memory_by_pid.get(pid, 0), sm_percent=sm_by_pid.get(pid, 0))
            for pid in sorted(memory_by_pid.keys() | sm_by_pid.keys())
        )

    def _read_process_sm(self, handle: object, uuid: str, notes: list[str]) -> dict[int, int]:
        nvml = self._nvml
        last_seen = self._last_sample_timestamp.get(uuid, 0)
        try:
            samples = nvml.nvmlDeviceGetProcessUtilization(handle, last_seen)
        except self._no_samples_errors:
            # NVML's answer when no process used the GPU since last_seen: all shares are 0.
            return {}
        except self._lost_errors as err:
            raise _GpuLost(f"process SM utilization: {err}") from err
        except self._unusable_errors as err:
            raise _NvmlUnusable(f"NVML stopped working while reading process SM utilization: {err}") from err
        except self._reading_errors as err:
            # pynvml raises NVMLError(NVML_SUCCESS) when the sizing call finds no sample at
            # all; like NOT_FOUND, that means no process used the GPU since last_seen.
            if getattr(err, "value", None) == 0:
                return {}
            notes.append(f"process SM utilization: {err}")
            return {}
        newest: dict[int, tuple[int, int]] = {}
        for sample in samples:
            pid = int(sample.pid)
            stamp = int(sample.timeStamp)
            # Unused slots of NVML's sample buffer come back with pid 0.
            if pid == 0:
                continue
            # Read from timestamp 0, NVML may return several samples of one process: the
            # newest one is its current share.
            if pid not in newest or stamp >= newest[pid][0]:
                newest[pid] = (stamp, _percent(sample.smUtil))
            last_seen = max(last_seen, stamp)
        self._last_sample_timestamp[uuid] = last_seen
        return {pid: sm for pid, (_, sm) in newest.items()}
