"""One agent's Connect stream: applies its heartbeats to liveness and the store.

Per heartbeat, memory only: the tracker's liveness and readings. SQLite is written only
when something worth keeping changed: the node's static description (GPU set, capacity,
versions, address) and instance reports whose state, reason, pid, address, restarts or
overrun changed, or whose measured GPU use moved noticeably (measured values jitter every
second on real cards; ListNodes shows the live readings anyway).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from google.protobuf import timestamp_pb2

from gpufleet.server.nodes import NodeTracker
from gpufleet.server.store import InstanceReport, Store
from gpufleet.v1 import node_pb2, node_service_pb2

# A measured GPU memory change is persisted when it is at least this many MiB and this
# share of the last persisted value; SM utilisation when it moved this many points.
MEMORY_CHANGE_MIB = 64
MEMORY_CHANGE_SHARE = 0.05
SM_CHANGE_PERCENT = 10
# The store keeps readings in SQLite INTEGER columns (signed 64-bit). A uint64 reading above
# that is no real measurement; it is kept as the largest storable value rather than
# failing the agent's stream on every heartbeat.
_LARGEST_STORED = 2**63 - 1


def address_of(host: str, port: int) -> str:
    """"host:port" as gateways dial it ("[v6]:port" for IPv6); empty without a port."""
    if port <= 0 or not host:
        return ""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def peer_host(peer: str) -> str:
    """The host of a grpc peer string ("ipv4:10.0.0.5:4242", "ipv6:[::1]:4242")."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv6":
        host = rest.rpartition(":")[0]
        return host.strip("[]")
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    return ""


def report_of(status: node_service_pb2.InstanceStatus, host: str) -> InstanceReport:
    """The store form of one heartbeat InstanceStatus."""
    return InstanceReport(
        instance_id=status.instance_id,
        state=status.state,
        reason=status.reason,
        pid=status.pid,
        address=address_of(host, status.port),
        restart_count=status.restart_count,
        crash_loop=status.crash_loop,
        gpu_memory_used_mib=min(status.gpu_memory_used_mib, _LARGEST_STORED),
        sm_utilization_percent=status.sm_utilization_percent,
        gpu_memory_overrun=status.gpu_memory_overrun,
    )


def worth_writing(old: InstanceReport | None, new: InstanceReport) -> bool:
    """True when `new` differs from the last persisted report in a way worth a write."""
    if old is None:
        return True
    if (
        old.state,
        old.reason,
        old.pid,
        old.address,
        old.restart_count,
        old.crash_loop,
        old.gpu_memory_overrun,
    ) != (
        new.state,
        new.reason,
        new.pid,
        new.address,
        new.restart_count,
        new.crash_loop,
        new.gpu_memory_overrun,
    ):
        return True
    memory_delta = abs(new.gpu_memory_used_mib - old.gpu_memory_used_mib)
    if memory_delta >= max(MEMORY_CHANGE_MIB, MEMORY_CHANGE_SHARE * old.gpu_memory_used_mib):
        return True
    return abs(new.sm_utilization_percent - old.sm_utilization_percent) >= SM_CHANGE_PERCENT


def static_description(heartbeat: node_service_pb2.Heartbeat, host: str) -> bytes:
    """What of a heartbeat is persisted on change: GPUs without measurements, capacity,
    version and address."""
    node = node_pb2.Node(
        cpu_millis=heartbeat.cpu_millis,
        memory_mib=min(heartbeat.memory_mib, _LARGEST_STORED),
        agent_version=heartbeat.agent_version,
        advertise_host=host,
    )
    for gpu in heartbeat.gpus:
        node.gpus.add(
            uuid=gpu.uuid,
            index=gpu.index,
            name=gpu.name,
            memory_total_mib=gpu.memory_total_mib,
            health=gpu.health,
            health_message=gpu.health_message,
        )
    return node.SerializeToString(deterministic=True)


class NodeSession:
    """Heartbeat handling for one Connect stream of one node."""

    def __init__(
        self,
        node_id: str,
        connection: int,
        store: Store,
        tracker: NodeTracker,
        wake_reconciler: Callable[[], None],
        fallback_host: str,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._node_id = node_id
        self._connection = connection
        self._store = store
        self._tracker = tracker
        self._wake = wake_reconciler
        self._fallback_host = fallback_host
        self._monotonic = monotonic
        self._wall = wall
        self._persisted_description: bytes | None = None
        self._persisted_reports: dict[str, InstanceReport] = {}
        self._reported: frozenset[str] | None = None

    async def on_heartbeat(self, heartbeat: node_service_pb2.Heartbeat) -> None:
        """Record liveness and readings; persist what changed."""
        host = heartbeat.advertise_host or self._fallback_host
        now_wall = self._wall()
        live = self._tracker.heartbeat(
            self._node_id, self._connection, heartbeat, host, self._monotonic(), now_wall
        )
        description = static_description(heartbeat, host)
        if description != self._persisted_description:
            node = node_pb2.Node.FromString(description)
            node.id = self._node_id
            node.gpus.clear()
            node.gpus.extend(heartbeat.gpus)
            seen = timestamp_pb2.Timestamp()
            seen.FromMicroseconds(int(now_wall * 1_000_000))
            node.last_heartbeat_time.CopyFrom(seen)
            await self._store.update_node_info(node)
            self._persisted_description = description
        reports = [report_of(status, host) for status in heartbeat.instances]
        persisted = self._persisted_reports
        changed = [r for r in reports if worth_writing(persisted.get(r.instance_id), r)]
        if changed:
            await self._store.report_instances(self._node_id, changed)
            for report in changed:
                self._persisted_reports[report.instance_id] = report
        for gone in set(self._persisted_reports) - live.reported:
            del self._persisted_reports[gone]
        # The first heartbeat may bring a node back; a changed instance set may settle
        # draining instances: both are the reconciler's to act on, at once.
        if self._reported is None or live.reported != self._reported:
            self._wake()
        self._reported = live.reported
