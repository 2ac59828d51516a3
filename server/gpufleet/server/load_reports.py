"""Gateway load reports (RoutingService.ReportLoad), kept in memory.

Each gateway's latest queue depth and in-flight count per deployment is summed over the
gateways whose report is fresh (a gateway that stops reporting drops out after
`expire_after`). Wakeups and scale-out requests are counts since the gateway's previous
report: they are added up until the reconciler takes them.

Per instance, gateways also report calls in flight and seconds idle. An instance is only as
idle as the busiest gateway that reported it says: its idle time is the minimum over the
fresh reports that name it, and 0 when any of them has calls in flight on it. A gateway that
has calls in flight on a deployment but names no instance for it (an older gateway) cannot
say which instance is busy, so that deployment is marked `unattributed` and the reconciler
falls back to its deployment-wide idle rule.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from gpufleet.server.reconciler.scaling import Demand
from gpufleet.v1 import routing_service_pb2


@dataclass(frozen=True)
class _DeploymentReport:
    queue_depth: int
    in_flight: int
    idle: dict[str, float]
    """Per instance this gateway named: seconds idle, 0 while it has calls in flight."""


@dataclass(frozen=True)
class _GatewayReport:
    at: float
    loads: dict[str, _DeploymentReport]


def _merge(
    old: _DeploymentReport | None, load: routing_service_pb2.DeploymentLoad
) -> _DeploymentReport:
    idle = {} if old is None else dict(old.idle)
    for instance in load.instances:
        if not instance.instance_id:
            continue
        seconds = 0.0 if instance.in_flight > 0 else max(0.0, instance.idle_seconds)
        idle[instance.instance_id] = min(seconds, idle.get(instance.instance_id, seconds))
    return _DeploymentReport(
        queue_depth=(0 if old is None else old.queue_depth) + load.queue_depth,
        in_flight=(0 if old is None else old.in_flight) + load.in_flight,
        idle=idle,
    )


class LoadBoard:
    """Latest load per gateway and pending scale requests per deployment."""

    def __init__(self, expire_after: float, started_wall: float) -> None:
        self._expire_after = expire_after
        self._started_wall = started_wall
        self._reports: dict[str, _GatewayReport] = {}
        self._wakeups: dict[str, int] = defaultdict(int)
        self._scale_outs: dict[str, int] = defaultdict(int)
        self._last_busy: dict[str, float] = {}

    def report(
        self,
        gateway_id: str,
        loads: Iterable[routing_service_pb2.DeploymentLoad],
        now: float,
        now_wall: float,
    ) -> bool:
        """Store one gateway's report; True if it asks for instances (wakeups, scale-out)."""
        asks = False
        latest: dict[str, _DeploymentReport] = {}
        for load in loads:
            if not load.deployment:
                continue
            latest[load.deployment] = _merge(latest.get(load.deployment), load)
            if load.wakeups or load.scale_out_requests:
                asks = True
                self._wakeups[load.deployment] += load.wakeups
                self._scale_outs[load.deployment] += load.scale_out_requests
            if load.queue_depth or load.in_flight or load.wakeups or load.scale_out_requests:
                self._last_busy[load.deployment] = now_wall
        self._reports[gateway_id] = _GatewayReport(now, latest)
        return asks

    def demand(self, now: float, take: bool = True) -> dict[str, Demand]:
        """Per deployment with any report: summed fresh load and pending requests.

        take: the pending wakeups and scale-outs are handed out once (the reconciler acts
        on them) and reset.
        """
        for gateway_id in [
            g for g, r in self._reports.items() if now - r.at > self._expire_after
        ]:
            del self._reports[gateway_id]
        queue: dict[str, int] = defaultdict(int)
        in_flight: dict[str, int] = defaultdict(int)
        idle: dict[str, dict[str, float]] = defaultdict(dict)
        unattributed: set[str] = set()
        for report in self._reports.values():
            for name, load in report.loads.items():
                queue[name] += load.queue_depth
                in_flight[name] += load.in_flight
                if load.in_flight > 0 and not load.idle:
                    unattributed.add(name)
                seen = idle[name]
                for instance_id, seconds in load.idle.items():
                    seen[instance_id] = min(seconds, seen.get(instance_id, seconds))
        names = set(queue) | set(self._wakeups) | set(self._scale_outs) | set(self._last_busy)
        out = {
            name: Demand(
                queue_depth=queue.get(name, 0),
                in_flight=in_flight.get(name, 0),
                wakeups=self._wakeups.get(name, 0),
                scale_out_requests=self._scale_outs.get(name, 0),
                last_busy=max(self._started_wall, self._last_busy.get(name, 0.0)),
                instance_idle=dict(idle.get(name, {})),
                unattributed=name in unattributed,
            )
            for name in names
        }
        if take:
            self._wakeups.clear()
            self._scale_outs.clear()
        return out

    def forget(self, deployments: Iterable[str]) -> None:
        """Drop what is kept about deployments that no longer exist."""
        for name in deployments:
            self._wakeups.pop(name, None)
            self._scale_outs.pop(name, None)
            self._last_busy.pop(name, None)
