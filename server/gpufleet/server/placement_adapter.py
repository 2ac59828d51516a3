"""Store rows and live GPU readings -> the scheduler's snapshot and requests. Pure, no I/O.

Reservations come from every instance row that still holds its resources: live, draining
(until its node reports it stopped) and pending ones alike; lost instances hold nothing.
A whole-GPU instance owns its cards (all their memory, all their SM); a share reserves its
memory and SM percent on its card.

Inside the scheduler a GPU is named "<node id>/<uuid>": simulated cards of two agents that
registered with the same node name carry the same uuid, and the snapshot needs unique ones.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from gpufleet.server.scheduler import (
    ClusterSnapshot,
    GpuState,
    InstanceRequest,
    NodeState,
    Placement,
    SpreadPolicy,
)
from gpufleet.server.store import InstanceRecord
from gpufleet.v1 import deployment_pb2, node_pb2

_log = logging.getLogger(__name__)

FULL_CORE_PERCENT = 100


@dataclass(frozen=True, slots=True)
class NodeResources:
    """What a node offers, from its latest heartbeat (or the last persisted one)."""

    node_id: str
    labels: Mapping[str, str]
    cpu_millis: int
    memory_mib: int
    gpus: Sequence[node_pb2.Gpu]
    """Readings: uuid, index, total and used memory, SM %, health."""


@dataclass
class GpuReservation:
    """What placed instances hold on one GPU."""

    memory_mib: int = 0
    core_percent: int = 0
    exclusive_owner: str | None = None
    instance_ids: list[str] = field(default_factory=list)


@dataclass
class NodeReservation:
    """What placed instances hold on one node."""

    cpu_millis: int = 0
    memory_mib: int = 0
    gpus: dict[str, GpuReservation] = field(default_factory=lambda: defaultdict(GpuReservation))
    """By GPU uuid."""


def reservations(
    instances: Iterable[InstanceRecord], nodes: Mapping[str, NodeResources]
) -> dict[str, NodeReservation]:
    """Resources held per node by the instances that still hold any (not lost)."""
    held: dict[str, NodeReservation] = defaultdict(NodeReservation)
    for record in instances:
        if record.lost:
            continue
        instance = record.instance
        node = held[instance.node_id]
        gpu = record.spec.gpu
        node.cpu_millis += record.spec.cpu_millis
        node.memory_mib += record.spec.memory_mib
        totals = {g.uuid: g.memory_total_mib for g in nodes[instance.node_id].gpus} if (
            instance.node_id in nodes
        ) else {}
        for uuid in instance.gpu_uuids:
            slot = node.gpus[uuid]
            slot.instance_ids.append(instance.id)
            if gpu.count > 0:
                slot.exclusive_owner = instance.id
                slot.memory_mib += totals.get(uuid, 0)
                slot.core_percent += FULL_CORE_PERCENT
            else:
                slot.memory_mib += gpu.memory_mib
                slot.core_percent += gpu.core_percent
    return dict(held)


def scheduler_gpu_id(node_id: str, uuid: str) -> str:
    """The name a GPU has inside the scheduler."""
    return f"{node_id}/{uuid}"


def build_snapshot(
    nodes: Sequence[NodeResources],
    held: Mapping[str, NodeReservation],
    schedulable: Iterable[str],
    live_per_deployment: Mapping[str, Mapping[str, int]],
) -> ClusterSnapshot:
    """The scheduler's view: every node, READY ones schedulable, GPUs with their readings."""
    allowed = set(schedulable)
    states: list[NodeState] = []
    for node in nodes:
        reservation = held.get(node.node_id, NodeReservation())
        gpus: list[GpuState] = []
        indexes: set[int] = set()
        for gpu in sorted(node.gpus, key=lambda g: g.index):
            if gpu.index in indexes or not gpu.uuid:
                _log.warning(
                    "node %s reports GPU %r at index %d twice or without uuid; ignoring it",
                    node.node_id,
                    gpu.uuid,
                    gpu.index,
                )
                continue
            indexes.add(gpu.index)
            slot = reservation.gpus.get(gpu.uuid, GpuReservation())
            gpus.append(
                GpuState(
                    uuid=scheduler_gpu_id(node.node_id, gpu.uuid),
                    index=gpu.index,
                    memory_total_mib=gpu.memory_total_mib,
                    memory_reserved_mib=slot.memory_mib,
                    memory_measured_mib=gpu.memory_used_mib,
                    core_reserved_percent=slot.core_percent,
                    exclusive_owner=slot.exclusive_owner,
                    healthy=gpu.health != node_pb2.GPU_HEALTH_LOST,
                )
            )
        states.append(
            NodeState(
                node_id=node.node_id,
                labels=dict(node.labels),
                schedulable=node.node_id in allowed,
                cpu_millis_total=node.cpu_millis,
                cpu_millis_reserved=reservation.cpu_millis,
                memory_mib_total=node.memory_mib,
                memory_mib_reserved=reservation.memory_mib,
                gpus=tuple(gpus),
            )
        )
    return ClusterSnapshot(nodes=tuple(states), deployment_instances=live_per_deployment)


def instance_request(
    instance_id: str, deployment: str, spec: deployment_pb2.DeploymentSpec
) -> InstanceRequest:
    """What one instance of `spec` asks the scheduler for."""
    gpu = spec.gpu
    return InstanceRequest(
        instance_id=instance_id,
        deployment=deployment,
        gpus=gpu.count,
        gpu_memory_mib=gpu.memory_mib if gpu.count == 0 else 0,
        gpu_core_percent=gpu.core_percent if gpu.count == 0 and gpu.memory_mib > 0 else 0,
        cpu_millis=spec.cpu_millis,
        memory_mib=spec.memory_mib,
        node_selector=dict(spec.node_selector),
        spread=(
            SpreadPolicy.SPREAD
            if spec.spread_policy == deployment_pb2.SPREAD_POLICY_SPREAD
            else SpreadPolicy.BINPACK
        ),
    )


def placed_gpu_uuids(placement: Placement) -> tuple[str, ...]:
    """The NVML uuids of a placement (undoing scheduler_gpu_id)."""
    prefix = f"{placement.node_id}/"
    return tuple(
        uuid[len(prefix) :] if uuid.startswith(prefix) else uuid for uuid in placement.gpu_uuids
    )
