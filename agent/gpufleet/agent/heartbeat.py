"""What a heartbeat says, computed from readings the agent already took (pure, no I/O).

Inputs: one GPU probe result, the supervisor's instance statuses and pids, the specs the
instances run. Outputs: the GPU usage each instance declares on simulated cards, the
statuses with their measured GPU use and overrun flag, and the Heartbeat message.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from gpufleet.agent.gpu.attribution import InstanceUsage
from gpufleet.agent.gpu.proto import gpus_to_proto
from gpufleet.agent.gpu.readings import GpuProbeResult
from gpufleet.agent.runtime.spec import InstanceSpec
from gpufleet.agent.runtime.status import InstanceStatusSnapshot
from gpufleet.v1 import instance_pb2, node_service_pb2

_RUNNING_STATES = frozenset({instance_pb2.INSTANCE_STATE_STARTING, instance_pb2.INSTANCE_STATE_READY})


@dataclass(frozen=True)
class HostCapacity:
    """What the node offers besides GPUs."""

    cpu_millis: int
    """Allocatable CPU, millicores (1000 per core the agent may use)."""
    memory_mib: int
    """Host memory, MiB."""


@dataclass(frozen=True)
class DeclaredUsage:
    """What one instance is taken to use of one simulated card."""

    gpu_uuid: str
    memory_mib: int
    core_percent: int


def declared_usage(spec: InstanceSpec, card_memory_mib: Mapping[str, int]) -> list[DeclaredUsage]:
    """Usage of `spec` on each of its simulated cards: its request, since nothing is measured.

    A share declares its memory request (gpu_memory_mib, else its MPS memory limit) and its
    SM share; whole cards are exclusive and declare all of each card. GPUs the node does not
    have (card_memory_mib maps uuid -> total MiB) are left out.
    """
    is_share = spec.mps_memory_limit_mib > 0 or spec.mps_core_percent > 0
    usage = []
    for uuid in spec.gpu_uuids:
        total = card_memory_mib.get(uuid)
        if total is None:
            continue
        if is_share:
            memory = spec.gpu_memory_mib or spec.mps_memory_limit_mib
            usage.append(DeclaredUsage(uuid, memory, min(100, spec.mps_core_percent)))
        else:
            usage.append(DeclaredUsage(uuid, total, 100))
    return usage


def with_gpu_usage(
    statuses: Sequence[InstanceStatusSnapshot],
    usage: Mapping[str, InstanceUsage],
    specs: Mapping[str, InstanceSpec],
) -> list[InstanceStatusSnapshot]:
    """The statuses with measured GPU memory / SM and the overrun flag filled in.

    An instance overruns when it uses more GPU memory than its spec requests (requests of 0
    mean "no limit" and never overrun).
    """
    filled = []
    for status in statuses:
        measured = usage.get(status.instance_id)
        if measured is None:
            filled.append(status)
            continue
        spec = specs.get(status.instance_id)
        limit = spec.gpu_memory_mib if spec is not None else 0
        filled.append(
            dataclasses.replace(
                status,
                gpu_memory_used_mib=measured.memory_used_mib,
                sm_utilization_percent=measured.sm_percent,
                gpu_memory_overrun=limit > 0 and measured.memory_used_mib > limit,
            )
        )
    return filled


def overrun_restarts(
    statuses: Sequence[InstanceStatusSnapshot],
    specs: Mapping[str, InstanceSpec],
    already_restarted_pids: Mapping[str, int],
) -> list[tuple[str, str]]:
    """(instance id, reason) of running instances to restart for a GPU memory overrun.

    Only deployments that ask for it (restart_on_gpu_memory_overrun), and once per process:
    an instance whose current pid was already restarted for this is left alone until the
    new process runs.
    """
    restarts = []
    for status in statuses:
        spec = specs.get(status.instance_id)
        if spec is None or not spec.restart_on_gpu_memory_overrun or not status.gpu_memory_overrun:
            continue
        if status.state not in _RUNNING_STATES or status.pid <= 0:
            continue
        if already_restarted_pids.get(status.instance_id) == status.pid:
            continue
        restarts.append(
            (
                status.instance_id,
                f"GPU memory overrun: uses {status.gpu_memory_used_mib} MiB, requested "
                f"{spec.gpu_memory_mib} MiB",
            )
        )
    return restarts


def build_heartbeat(
    gpus: GpuProbeResult,
    statuses: Sequence[InstanceStatusSnapshot],
    capacity: HostCapacity,
    agent_version: str,
    advertise_host: str,
) -> node_service_pb2.Heartbeat:
    """The heartbeat message: every GPU reading and every instance status."""
    return node_service_pb2.Heartbeat(
        gpus=gpus_to_proto(gpus),
        instances=[status.to_proto() for status in sorted(statuses, key=lambda s: s.instance_id)],
        cpu_millis=capacity.cpu_millis,
        memory_mib=capacity.memory_mib,
        agent_version=agent_version,
        advertise_host=advertise_host,
    )


def parse_meminfo_total_mib(meminfo: str) -> int:
    """MemTotal of /proc/meminfo text in MiB; 0 when the line is missing or malformed."""
    for line in meminfo.splitlines():
        name, _, rest = line.partition(":")
        if name.strip() != "MemTotal":
            continue
        parts = rest.split()
        if not parts or not parts[0].isdigit():
            return 0
        unit = parts[1].lower() if len(parts) > 1 else "kb"
        factor = {"kb": 1024, "mb": 1024 * 1024, "gb": 1024**3}.get(unit, 1)
        return int(parts[0]) * factor // (1024 * 1024)
    return 0
