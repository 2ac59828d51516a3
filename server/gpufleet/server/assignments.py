"""What a node is told to run: instance rows -> DesiredInstances. Pure, no I/O.

The server writes the GPU environment into each assignment (node_service.proto says the env
arrives "already including CUDA_VISIBLE_DEVICES and MPS limits"): CUDA_VISIBLE_DEVICES
lists the assigned GPU uuids (empty: no GPU visible), and a share adds
CUDA_MPS_ACTIVE_THREAD_PERCENTAGE (its SM percent, when limited) and
CUDA_MPS_PINNED_DEVICE_MEM_LIMIT ("0=<MiB>M": device ordinals count after
CUDA_VISIBLE_DEVICES, so a share's one card is device 0). The agent sets the same variables
again from the spec, so both sides agree and a deployment cannot override them.
"""

from __future__ import annotations

from collections.abc import Iterable

from gpufleet.server.store import InstanceRecord
from gpufleet.v1 import node_service_pb2

CUDA_VISIBLE_DEVICES = "CUDA_VISIBLE_DEVICES"
MPS_THREAD_PERCENTAGE = "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"
MPS_MEMORY_LIMIT = "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"


def assignment_env(record: InstanceRecord) -> dict[str, str]:
    """The deployment's env plus the GPU variables of this instance."""
    env = dict(record.spec.env)
    gpu = record.spec.gpu
    uuids = list(record.instance.gpu_uuids)
    env[CUDA_VISIBLE_DEVICES] = ",".join(uuids)
    env.pop(MPS_THREAD_PERCENTAGE, None)
    env.pop(MPS_MEMORY_LIMIT, None)
    if uuids and gpu.count == 0 and gpu.memory_mib > 0:
        if gpu.core_percent > 0:
            env[MPS_THREAD_PERCENTAGE] = str(gpu.core_percent)
        env[MPS_MEMORY_LIMIT] = ",".join(f"{i}={gpu.memory_mib}M" for i in range(len(uuids)))
    return env


def assignment(record: InstanceRecord) -> node_service_pb2.InstanceAssignment:
    """One instance as the node must run it."""
    instance = record.instance
    spec = record.spec
    return node_service_pb2.InstanceAssignment(
        instance_id=instance.id,
        deployment=instance.deployment,
        generation=instance.generation,
        command=spec.command,
        port=spec.port,
        env=assignment_env(record),
        gpu_uuids=list(instance.gpu_uuids),
        gpu_memory_mib=instance.gpu_memory_reserved_mib,
        spec=spec,
        draining=record.draining,
    )


def desired_instances(records: Iterable[InstanceRecord]) -> node_service_pb2.DesiredInstances:
    """Every instance of the node it must run or drain; lost ones are left out (stop)."""
    return node_service_pb2.DesiredInstances(
        instances=[
            assignment(r) for r in sorted(records, key=lambda r: r.instance.id) if not r.lost
        ]
    )
