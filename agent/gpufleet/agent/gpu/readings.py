"""What a GPU probe reports: plain immutable readings, no I/O.

Units follow gpufleet.v1.Gpu (node.proto): memory in MiB, utilisation in percent of one GPU.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol


class GpuHealth(enum.Enum):
    """How far a GPU reading can be trusted; mirrors gpufleet.v1.GpuHealth."""

    OK = "OK"
    """Every reading is valid."""
    DEGRADED = "DEGRADED"
    """Some readings failed or are not supported; those fields are 0 and health_message says which."""
    LOST = "LOST"
    """NVML reports the GPU lost (or it needs a reset): no readings, no new placements."""
    SIMULATED = "SIMULATED"
    """A simulated card (--simulate-gpus): usage is the sum of the declared requests."""


@dataclass(frozen=True)
class ProcessReading:
    """One process using a GPU."""

    pid: int
    """Process id as NVML sees it (the host pid namespace)."""
    memory_used_mib: int
    """GPU memory the process holds on this GPU, MiB; 0 when NVML cannot tell (see health_message)."""
    sm_percent: int
    """Share of this GPU's SMs the process used in the last sample period, 0-100."""


@dataclass(frozen=True)
class GpuReading:
    """One GPU of this node with its readings."""

    uuid: str
    """NVML uuid ("GPU-5d3a...") or a simulated one ("GPU-sim-<node>-<index>")."""
    index: int
    """NVML index on this node, the number CUDA_VISIBLE_DEVICES takes."""
    name: str
    """Product name, e.g. "NVIDIA H100 80GB HBM3"."""
    memory_total_mib: int
    """Total memory, MiB."""
    memory_used_mib: int
    """Memory in use, MiB, by every process including ones gpufleet did not start."""
    sm_utilization_percent: int
    """SM utilisation over the last sample period, 0-100."""
    health: GpuHealth
    """How far these readings can be trusted."""
    health_message: str
    """Why health is not OK; empty when it is."""
    processes: tuple[ProcessReading, ...]
    """Processes using this GPU, ordered by pid."""


@dataclass(frozen=True)
class GpuProbeResult:
    """One reading of all GPUs of the node."""

    gpus: tuple[GpuReading, ...]
    """Every GPU, ordered by index; empty when error is set."""
    driver_version: str
    """NVIDIA driver version, e.g. "550.54.15"; empty for simulated GPUs or when unknown."""
    error: str | None
    """Why no GPU could be read at all (no driver, NVML library missing); None otherwise."""


class GpuProbe(Protocol):
    """Reads the node's GPUs. Implementations never raise from read() or shutdown()."""

    def read(self) -> GpuProbeResult:
        """Read every GPU now; failures are reported in the result, not raised."""
        ...

    def shutdown(self) -> None:
        """Release what the probe holds (the NVML handle); safe to call twice."""
        ...
