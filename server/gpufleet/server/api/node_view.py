"""ListNodes with live readings: the DeploymentService the control plane serves.

Stored node rows hold only what changes rarely; the latest heartbeat (memory used, SM %,
capacity), the reservations of the placed instances and the reconciler's node states are
merged in here. Per GPU: total, reserved (sum of placed requests; a whole-GPU instance
reserves the card), measured used, SM %, and the instances on it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from google.protobuf import timestamp_pb2

from gpufleet.server.api.deployment_service import DeploymentService
from gpufleet.server.nodes import NodeTracker
from gpufleet.server.placement_adapter import NodeResources, reservations
from gpufleet.server.store import Store
from gpufleet.v1 import deployment_service_pb2 as pb, node_pb2

if TYPE_CHECKING:
    import grpc

    _Context = grpc.aio.ServicerContext[Any, Any]

NodeStates = Callable[[], Mapping[str, node_pb2.NodeState.ValueType]]


async def list_nodes(
    store: Store, tracker: NodeTracker, node_states: NodeStates
) -> pb.ListNodesResponse:
    """Every node, by id, with live readings and reservations."""
    records = await store.list_node_records()
    instances = await store.list_instance_records()
    states = node_states()
    merged: list[node_pb2.Node] = []
    resources: dict[str, NodeResources] = {}
    for record in records:
        node = node_pb2.Node()
        node.CopyFrom(record.node)
        live = tracker.get(node.id)
        if live is not None:
            node.gpus.clear()
            node.gpus.extend(live.gpus)
            node.cpu_millis = live.cpu_millis
            node.memory_mib = live.memory_mib
            node.agent_version = live.agent_version
            node.advertise_host = live.advertise_host
            seen = timestamp_pb2.Timestamp()
            seen.FromMicroseconds(int(live.last_heartbeat_wall * 1_000_000))
            node.last_heartbeat_time.CopyFrom(seen)
        node.state = states.get(node.id, node.state)
        resources[node.id] = NodeResources(
            node_id=node.id,
            labels=dict(node.labels),
            cpu_millis=node.cpu_millis,
            memory_mib=node.memory_mib,
            gpus=tuple(node.gpus),
        )
        merged.append(node)
    held = reservations(instances, resources)
    for node in merged:
        reservation = held.get(node.id)
        if reservation is None:
            continue
        for gpu in node.gpus:
            slot = reservation.gpus.get(gpu.uuid)
            if slot is None:
                continue
            gpu.memory_reserved_mib = slot.memory_mib
            gpu.core_reserved_percent = slot.core_percent
            gpu.instance_ids.extend(sorted(slot.instance_ids))
    return pb.ListNodesResponse(nodes=merged)


class ControlPlaneDeploymentService(DeploymentService):
    """DeploymentService whose ListNodes shows live node readings."""

    def __init__(self, store: Store, tracker: NodeTracker, node_states: NodeStates) -> None:
        super().__init__(store)
        self._node_store = store
        self._tracker = tracker
        self._node_states = node_states

    async def ListNodes(
        self, request: pb.ListNodesRequest, context: _Context
    ) -> pb.ListNodesResponse:
        return await list_nodes(self._node_store, self._tracker, self._node_states)
