"""GPU probe: NVML readings per GPU and per process, simulated GPUs, attribution to instances."""

from gpufleet.agent.gpu.attribution import InstanceGpuUsage, InstanceUsage, attribute_to_instances, read_parent_pid
from gpufleet.agent.gpu.detect import detect_probe
from gpufleet.agent.gpu.nvml import NvmlProbe
from gpufleet.agent.gpu.readings import GpuHealth, GpuProbe, GpuProbeResult, GpuReading, ProcessReading
from gpufleet.agent.gpu.simulated import SimulatedGpus, parse_simulate_gpus, simulated_gpu_uuid

__all__ = [
    "GpuHealth",
    "GpuProbe",
    "GpuProbeResult",
    "GpuReading",
    "InstanceGpuUsage",
    "InstanceUsage",
    "NvmlProbe",
    "ProcessReading",
    "SimulatedGpus",
    "attribute_to_instances",
    "detect_probe",
    "parse_simulate_gpus",
    "read_parent_pid",
    "simulated_gpu_uuid",
]
