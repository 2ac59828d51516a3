"""Prometheus metrics of the control plane, read at scrape time from the store and the node
tracker: deployments by phase, instances by deployment and state, nodes by state, and per
GPU the capacity, the reservations of placed instances and the measured use (the same
merge `gpufleet nodes` shows). Reconcile passes are counted by `ReconcileMetrics`, which
the reconciler feeds after each pass.

    plane = await start_control_plane(config)
    metrics = start_control_plane_metrics(plane, "127.0.0.1:9400", gateway=gateway)
    ...
    await metrics.stop()

Every name, type, label and unit is listed in docs/metrics.md.
"""

from __future__ import annotations

import asyncio
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import Counter, Histogram
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gpufleet.server.api.node_view import list_nodes
from gpufleet.server.metrics_http import MetricsServer, snapshot_or_none, start_metrics_server
from gpufleet.server.nodes import NodeTracker
from gpufleet.server.store import Store
from gpufleet.v1 import deployment_pb2, instance_pb2, node_pb2

if TYPE_CHECKING:
    from gpufleet.gateway.app import Gateway
    from gpufleet.server.app import ControlPlane

__all__ = [
    "ControlPlaneMetrics",
    "ControlPlaneState",
    "RECONCILE_BUCKETS_S",
    "ReconcileMetrics",
    "control_plane_families",
    "enum_label",
    "start_control_plane_metrics",
]

RECONCILE_BUCKETS_S = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
"""A pass is a store read, a pure plan and at most one commit: milliseconds, unless the
store is slow (which is what the upper buckets are there to show)."""

NodeStates = Callable[[], Mapping[str, node_pb2.NodeState.ValueType]]


@dataclass(frozen=True)
class ControlPlaneState:
    """What one scrape reads: stored deployments and instances, and the nodes merged with
    their latest heartbeat, reconciler state and reservations (api.node_view.list_nodes)."""

    deployments: Sequence[deployment_pb2.Deployment]
    instances: Sequence[instance_pb2.Instance]
    nodes: Sequence[node_pb2.Node]


def enum_label(name: str, prefix: str) -> str:
    """"INSTANCE_STATE_READY", "INSTANCE_STATE_" -> "ready"."""
    return name.removeprefix(prefix).lower()


_PHASES = deployment_pb2.DeploymentPhase
_INSTANCE_STATES = instance_pb2.InstanceState
_NODE_STATES = node_pb2.NodeState


def _all_labels(enum_names: Iterable[str], prefix: str) -> list[str]:
    """Every value but UNSPECIFIED: these series are always present (0 included), so a
    rule like `== 0` works before anything reached the state."""
    return [enum_label(n, prefix) for n in enum_names if not n.endswith("_UNSPECIFIED")]


def control_plane_families(state: ControlPlaneState) -> list[Metric]:
    """The control plane's gauges from one read (pure)."""
    return [
        *_deployment_families(state.deployments),
        _instance_family(state.deployments, state.instances),
        *_node_families(state.nodes),
        *_gpu_families(state.nodes),
    ]


def _deployment_families(deployments: Sequence[deployment_pb2.Deployment]) -> list[Metric]:
    prefix = "DEPLOYMENT_PHASE_"
    phases = Tally(enum_label(_PHASES.Name(d.status.phase), prefix) for d in deployments)
    by_phase = GaugeMetricFamily(
        "gpufleet_server_deployments",
        "Deployments by phase (unspecified: not reconciled yet).",
        labels=["phase"],
    )
    for phase in _all_labels(_PHASES.keys(), prefix):
        by_phase.add_metric([phase], phases.pop(phase, 0))
    for phase, count in sorted(phases.items()):
        by_phase.add_metric([phase], count)
    desired = GaugeMetricFamily(
        "gpufleet_server_deployment_desired_instances",
        "Instances the reconciler aims for, per deployment.",
        labels=["deployment"],
    )
    for deployment in deployments:
        desired.add_metric([deployment.name], deployment.status.desired_instances)
    return [by_phase, desired]


def _instance_family(
    deployments: Sequence[deployment_pb2.Deployment],
    instances: Sequence[instance_pb2.Instance],
) -> Metric:
    prefix = "INSTANCE_STATE_"
    counts = Tally(
        (i.deployment, enum_label(_INSTANCE_STATES.Name(i.state), prefix)) for i in instances
    )
    family = GaugeMetricFamily(
        "gpufleet_server_instances",
        "Instances by deployment and state (as the agents last reported them).",
        labels=["deployment", "state"],
    )
    names = sorted({d.name for d in deployments} | {i.deployment for i in instances})
    for name in names:
        for label in _all_labels(_INSTANCE_STATES.keys(), prefix):
            family.add_metric([name, label], counts.pop((name, label), 0))
    for (name, label), count in sorted(counts.items()):
        family.add_metric([name, label], count)
    return family


def _node_families(nodes: Sequence[node_pb2.Node]) -> list[Metric]:
    prefix = "NODE_STATE_"
    states = Tally(enum_label(_NODE_STATES.Name(n.state), prefix) for n in nodes)
    by_state = GaugeMetricFamily(
        "gpufleet_server_nodes",
        "Registered nodes by state (ready, suspect: heartbeats late, lost: past the node "
        "TTL, cordoned).",
        labels=["state"],
    )
    for label in _all_labels(_NODE_STATES.keys(), prefix):
        by_state.add_metric([label], states.pop(label, 0))
    for label, count in sorted(states.items()):
        by_state.add_metric([label], count)
    info = GaugeMetricFamily(
        "gpufleet_server_node_info",
        "1 per node, carrying its name and agent version (join on `node`).",
        labels=["node", "name", "agent_version"],
    )
    heartbeat = GaugeMetricFamily(
        "gpufleet_server_node_last_heartbeat_timestamp_seconds",
        "Wall time of the node's latest heartbeat, seconds since the epoch.",
        labels=["node"],
    )
    for node in nodes:
        info.add_metric([node.id, node.name, node.agent_version], 1)
        if node.HasField("last_heartbeat_time"):
            seen = node.last_heartbeat_time
            heartbeat.add_metric([node.id], seen.seconds + seen.nanos / 1e9)
    return [by_state, info, heartbeat]


def _gpu_families(nodes: Sequence[node_pb2.Node]) -> list[Metric]:
    labels = ["node", "gpu_uuid"]
    total = GaugeMetricFamily(
        "gpufleet_server_gpu_memory_total_mib", "GPU memory capacity, MiB.", labels=labels
    )
    reserved = GaugeMetricFamily(
        "gpufleet_server_gpu_memory_reserved_mib",
        "GPU memory reserved by the instances placed on the GPU (a whole-GPU instance "
        "reserves all of it), MiB.",
        labels=labels,
    )
    used = GaugeMetricFamily(
        "gpufleet_server_gpu_memory_used_mib",
        "GPU memory in use as the node's agent last measured it (every process), MiB.",
        labels=labels,
    )
    sm_used = GaugeMetricFamily(
        "gpufleet_server_gpu_sm_utilization_percent",
        "SM utilization as the node's agent last measured it, percent (0-100).",
        labels=labels,
    )
    sm_reserved = GaugeMetricFamily(
        "gpufleet_server_gpu_core_reserved_percent",
        "SM share reserved by the instances placed on the GPU, percent (0-100).",
        labels=labels,
    )
    for node in nodes:
        for gpu in node.gpus:
            key = [node.id, gpu.uuid]
            total.add_metric(key, gpu.memory_total_mib)
            reserved.add_metric(key, gpu.memory_reserved_mib)
            used.add_metric(key, gpu.memory_used_mib)
            sm_used.add_metric(key, gpu.sm_utilization_percent)
            sm_reserved.add_metric(key, gpu.core_reserved_percent)
    return [total, reserved, used, sm_used, sm_reserved]


class ReconcileMetrics(Collector):
    """Reconcile passes: the reconciler calls `observe_pass` after each one."""

    def __init__(self) -> None:
        self._passes = Counter(
            "gpufleet_server_reconcile_passes",
            "Reconcile passes by result (ok, failed: logged and retried by the next pass).",
            ["result"],
            registry=None,
        )
        self._duration = Histogram(
            "gpufleet_server_reconcile_duration_seconds",
            "Duration of one reconcile pass: store read, plan and commit.",
            buckets=RECONCILE_BUCKETS_S,
            registry=None,
        )
        # Both results exist from the start, so that a rate of failures reads 0, not nothing.
        self._ok = self._passes.labels("ok")
        self._failed = self._passes.labels("failed")

    def observe_pass(self, seconds: float, failed: bool) -> None:
        """One pass took `seconds`; `failed`: it raised."""
        (self._failed if failed else self._ok).inc()
        self._duration.observe(seconds)

    def collect(self) -> Iterable[Metric]:
        yield from self._passes.collect()
        yield from self._duration.collect()


class ControlPlaneMetrics(Collector):
    """Scrape-time gauges of the control plane; reads the store on the event loop."""

    def __init__(
        self,
        store: Store,
        tracker: NodeTracker,
        node_states: NodeStates,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._store = store
        self._tracker = tracker
        self._node_states = node_states
        self._loop = loop

    @classmethod
    def for_plane(
        cls, plane: ControlPlane, loop: asyncio.AbstractEventLoop
    ) -> ControlPlaneMetrics:
        """The metrics of a running control plane (node states from its reconciler)."""
        reconciler = plane.reconciler

        def node_states() -> Mapping[str, node_pb2.NodeState.ValueType]:
            return {} if reconciler is None else reconciler.node_states

        return cls(plane.store, plane.node_tracker, node_states, loop)

    async def read(self) -> ControlPlaneState:
        """One consistent-enough read: a store snapshot, then the merged node list."""
        snapshot = await self._store.snapshot()
        nodes = await list_nodes(self._store, self._tracker, self._node_states)
        return ControlPlaneState(
            deployments=[record.deployment for record in snapshot.deployments],
            instances=snapshot.instances,
            nodes=list(nodes.nodes),
        )

    def collect(self) -> Iterable[Metric]:
        state = snapshot_or_none(self._loop, self.read, "the control plane's store")
        if state is not None:
            yield from control_plane_families(state)

    def describe(self) -> Iterator[Metric]:
        # Registering must not read the store (that would wait for the loop).
        return iter(())


def start_control_plane_metrics(
    plane: ControlPlane,
    listen: str,
    *,
    gateway: Gateway | None = None,
    reconcile: ReconcileMetrics | None = None,
    extra: Sequence[Collector] = (),
) -> MetricsServer:
    """Serve the control plane's metrics at http://`listen`/metrics: its gauges, the
    embedded `gateway`'s metrics when given, reconcile passes when `reconcile` is the
    ReconcileMetrics its reconciler feeds, any `extra` collectors (`gpufleet up` adds its
    agent's), and the process_* series. Call it on the plane's event loop.

    `listen` is "HOST:PORT", "[v6]:PORT" or a bare "PORT" (127.0.0.1); port 0 picks a free
    one. Raises StartupError for a malformed or busy address. Stop it with
    `await server.stop()` before the plane.
    """
    collectors: list[Collector] = [
        ControlPlaneMetrics.for_plane(plane, asyncio.get_running_loop())
    ]
    if reconcile is not None:
        collectors.append(reconcile)
    if gateway is not None:
        collectors.append(gateway.metrics)
    collectors.extend(extra)
    return start_metrics_server(listen, collectors)
