"""GPU readings as the gpufleet.v1.Gpu messages a heartbeat carries."""

from __future__ import annotations

from gpufleet.agent.gpu.readings import GpuHealth, GpuProbeResult, GpuReading
from gpufleet.v1 import node_pb2

_HEALTH = {
    GpuHealth.OK: node_pb2.GPU_HEALTH_OK,
    GpuHealth.DEGRADED: node_pb2.GPU_HEALTH_DEGRADED,
    GpuHealth.LOST: node_pb2.GPU_HEALTH_LOST,
    GpuHealth.SIMULATED: node_pb2.GPU_HEALTH_SIMULATED,
}


def gpu_to_proto(reading: GpuReading) -> node_pb2.Gpu:
    """The agent-measured fields of a Gpu; reserved and instance fields are the control plane's."""
    return node_pb2.Gpu(
        uuid=reading.uuid,
        index=reading.index,
        name=reading.name,
        memory_total_mib=reading.memory_total_mib,
        memory_used_mib=reading.memory_used_mib,
        sm_utilization_percent=reading.sm_utilization_percent,
        health=_HEALTH[reading.health],
        health_message=reading.health_message,
    )


def gpus_to_proto(result: GpuProbeResult) -> list[node_pb2.Gpu]:
    """Every GPU of a probe result, in index order."""
    return [gpu_to_proto(reading) for reading in sorted(result.gpus, key=lambda gpu: gpu.index)]
