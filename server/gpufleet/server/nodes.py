"""Node liveness bookkeeping in memory: last heartbeat, latest readings, reported instances.

Heartbeats arrive every second or so from every node; none of this is written to SQLite
per heartbeat (the node session persists what changes, see api/node_session.py). A
restarted control plane starts empty: liveness then runs from its start (grace period).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass

from gpufleet.v1 import node_pb2, node_service_pb2


@dataclass(frozen=True)
class NodeLive:
    """The latest heartbeat of one node."""

    node_id: str
    connection: int
    """Which Connect stream sent it; a newer stream replaces an older one."""
    connected: bool
    """The stream is still open."""
    last_heartbeat: float
    """Monotonic time it arrived."""
    last_heartbeat_wall: float
    """Wall time it arrived, seconds since the epoch (for ListNodes)."""
    gpus: tuple[node_pb2.Gpu, ...]
    """GPU readings (measured fields only)."""
    cpu_millis: int
    memory_mib: int
    agent_version: str
    advertise_host: str
    """Host gateways dial: the heartbeat's advertise_host, else the stream's peer address."""
    reported: frozenset[str]
    """Instance ids in the heartbeat."""


class NodeTracker:
    """Latest heartbeat per node, for liveness, the scheduler and ListNodes."""

    def __init__(self) -> None:
        self._nodes: dict[str, NodeLive] = {}
        self._connections = itertools.count(1)
        self._current: dict[str, int] = {}

    def connect(self, node_id: str) -> int:
        """A new Connect stream of the node; returns its connection number."""
        connection = next(self._connections)
        self._current[node_id] = connection
        return connection

    def disconnect(self, node_id: str, connection: int) -> None:
        """The stream ended; its reported set is no longer current."""
        if self._current.get(node_id) != connection:
            return
        del self._current[node_id]
        live = self._nodes.get(node_id)
        if live is not None and live.connection == connection:
            self._nodes[node_id] = _replace_connected(live, False)

    def heartbeat(
        self,
        node_id: str,
        connection: int,
        heartbeat: node_service_pb2.Heartbeat,
        host: str,
        now: float,
        now_wall: float,
    ) -> NodeLive:
        """Record a heartbeat; returns what was recorded."""
        live = NodeLive(
            node_id=node_id,
            connection=connection,
            connected=self._current.get(node_id) == connection,
            last_heartbeat=now,
            last_heartbeat_wall=now_wall,
            gpus=tuple(heartbeat.gpus),
            cpu_millis=heartbeat.cpu_millis,
            memory_mib=heartbeat.memory_mib,
            agent_version=heartbeat.agent_version,
            advertise_host=host,
            reported=frozenset(i.instance_id for i in heartbeat.instances),
        )
        self._nodes[node_id] = live
        return live

    def get(self, node_id: str) -> NodeLive | None:
        """The latest heartbeat of a node, if any arrived since start."""
        return self._nodes.get(node_id)

    def last_heartbeat(self, node_id: str) -> float | None:
        """Monotonic time of the node's latest heartbeat; None if none since start."""
        live = self._nodes.get(node_id)
        return None if live is None else live.last_heartbeat

    def reported(self) -> Mapping[str, frozenset[str]]:
        """Instance ids each connected node reported in its latest heartbeat."""
        return {
            node_id: live.reported for node_id, live in self._nodes.items() if live.connected
        }


def _replace_connected(live: NodeLive, connected: bool) -> NodeLive:
    return NodeLive(
        node_id=live.node_id,
        connection=live.connection,
        connected=connected,
        last_heartbeat=live.last_heartbeat,
        last_heartbeat_wall=live.last_heartbeat_wall,
        gpus=live.gpus,
        cpu_millis=live.cpu_millis,
        memory_mib=live.memory_mib,
        agent_version=live.agent_version,
        advertise_host=live.advertise_host,
        reported=live.reported,
    )
