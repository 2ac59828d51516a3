"""Prometheus metrics of a gateway: per-deployment calls, errors, latency and cold starts
(counted on the call path through `CallObserver`), and queue depth / in flight / ready
instances read from the admission controllers at scrape time.

    gateway = await start_gateway(config)
    metrics = start_gateway_metrics(gateway, "127.0.0.1:9401")   # GET /metrics
    ...
    await metrics.stop()

Every name, type, label and unit is listed in docs/metrics.md.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
from prometheus_client import Counter, Histogram
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gpufleet.gateway.route_table import RouteTable
from gpufleet.server.metrics_http import MetricsServer, snapshot_or_none, start_metrics_server

if TYPE_CHECKING:
    from gpufleet.gateway.app import Gateway

__all__ = [
    "COLD_START_BUCKETS_S",
    "DeploymentLive",
    "GatewayMetrics",
    "REQUEST_BUCKETS_S",
    "live_families",
    "start_gateway_metrics",
]

REQUEST_BUCKETS_S = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 300.0,
)
"""Request duration buckets: a fast unary call lands in the first ones, streams and calls
that waited for a cold start in the last ones."""

COLD_START_BUCKETS_S = (
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)
"""Cold start buckets: from a warm process pool (sub-second) to loading a large model."""


@dataclass(frozen=True, slots=True)
class DeploymentLive:
    """One deployment's admission state at scrape time."""

    deployment: str
    queue_depth: int
    """Calls waiting for a slot."""
    in_flight: int
    """Calls holding a slot."""
    ready_instances: int
    """Instances in the route table that take new calls (not draining)."""


def live_families(synced: bool, deployments: Sequence[DeploymentLive]) -> list[Metric]:
    """The scrape-time gauges from a read of the route table (pure)."""
    queue = GaugeMetricFamily(
        "gpufleet_gateway_queue_depth",
        "Calls waiting in the deployment's admission queue.",
        labels=["deployment"],
    )
    in_flight = GaugeMetricFamily(
        "gpufleet_gateway_in_flight_requests",
        "Calls holding a slot on an instance of the deployment (streams count for their "
        "whole life).",
        labels=["deployment"],
    )
    ready = GaugeMetricFamily(
        "gpufleet_gateway_ready_instances",
        "Instances of the deployment in this gateway's routing table that take new calls.",
        labels=["deployment"],
    )
    for live in deployments:
        queue.add_metric([live.deployment], live.queue_depth)
        in_flight.add_metric([live.deployment], live.in_flight)
        ready.add_metric([live.deployment], live.ready_instances)
    table = GaugeMetricFamily(
        "gpufleet_gateway_route_table_synced",
        "1 once the gateway has received its first routing table from the control plane "
        "(it keeps serving from it while the control plane is away).",
        value=1 if synced else 0,
    )
    return [queue, in_flight, ready, table]


class _Series:
    """The label-bound children of one (deployment, kind): looked up once, not per call."""

    __slots__ = ("requests", "duration")

    def __init__(self, requests: Counter, duration: Histogram) -> None:
        self.requests = requests
        self.duration = duration


class GatewayMetrics(Collector):
    """The gateway's metrics: a `CallObserver` for the dispatcher and a prometheus
    `Collector` for the registry. Observer methods run on the event loop; `collect` runs on
    the scrape thread and reads the route table on the loop."""

    def __init__(self, table: RouteTable, loop: asyncio.AbstractEventLoop) -> None:
        self._table = table
        self._loop = loop
        self._requests = Counter(
            "gpufleet_gateway_requests",
            "Calls sent to a deployment (ModelInfer, ModelStreamInfer, ModelMetadata and "
            "proxied calls), counted on arrival.",
            ["deployment", "kind"],
            registry=None,
        )
        self._errors = Counter(
            "gpufleet_gateway_errors",
            "Calls that ended with a status other than OK: refused by the gateway, failed on "
            "the instance, or cancelled.",
            ["deployment", "code", "reason"],
            registry=None,
        )
        self._rejected = Counter(
            "gpufleet_gateway_rejected",
            "Calls the gateway refused before they reached an instance (queue full, rate "
            "limit, quota, queue timeout, unknown target, bad token or route rule).",
            ["deployment", "reason"],
            registry=None,
        )
        self._duration = Histogram(
            "gpufleet_gateway_request_duration_seconds",
            "Time from a call's arrival at the gateway to its end, for calls that reached an "
            "instance; includes the wait in the queue.",
            ["deployment", "kind"],
            buckets=REQUEST_BUCKETS_S,
            registry=None,
        )
        self._cold_starts = Counter(
            "gpufleet_gateway_cold_starts",
            "Calls that reached admission while the deployment had no ready instance.",
            ["deployment"],
            registry=None,
        )
        self._cold_start_duration = Histogram(
            "gpufleet_gateway_cold_start_duration_seconds",
            "For cold starts that got an instance: time from the call's arrival until it "
            "got a slot.",
            ["deployment"],
            buckets=COLD_START_BUCKETS_S,
            registry=None,
        )
        self._series: dict[tuple[str, str], _Series] = {}

    # ----- CallObserver (event loop)

    def arrived(self, deployment: str, kind: str) -> None:
        self._bound(deployment, kind).requests.inc()

    def cold_start(self, deployment: str) -> None:
        self._cold_starts.labels(deployment).inc()

    def rejected(self, deployment: str, kind: str, code: grpc.StatusCode, reason: str) -> None:
        self._errors.labels(deployment, code.name, reason).inc()
        self._rejected.labels(deployment, reason).inc()

    def admitted(self, deployment: str, kind: str, cold: bool, waited_s: float) -> None:
        if cold:
            self._cold_start_duration.labels(deployment).observe(waited_s)

    def ended(
        self,
        deployment: str,
        kind: str,
        code: grpc.StatusCode,
        reason: str,
        seconds: float | None,
    ) -> None:
        if code is not grpc.StatusCode.OK:
            self._errors.labels(deployment, code.name, reason).inc()
        if seconds is not None:
            self._bound(deployment, kind).duration.observe(seconds)

    def _bound(self, deployment: str, kind: str) -> _Series:
        key = (deployment, kind)
        series = self._series.get(key)
        if series is None:
            series = _Series(
                self._requests.labels(deployment, kind), self._duration.labels(deployment, kind)
            )
            self._series[key] = series
        return series

    # ----- Collector (scrape thread)

    def collect(self) -> Iterable[Metric]:
        for metric in (
            self._requests,
            self._errors,
            self._rejected,
            self._duration,
            self._cold_starts,
            self._cold_start_duration,
        ):
            yield from metric.collect()
        live = snapshot_or_none(self._loop, self._read_live, "the gateway's routing table")
        if live is not None:
            yield from live_families(*live)

    async def _read_live(self) -> tuple[bool, list[DeploymentLive]]:
        return self._table.synced, [
            DeploymentLive(
                deployment=state.name,
                queue_depth=state.admission.queue_depth,
                in_flight=state.admission.in_flight,
                ready_instances=sum(
                    1 for view in state.admission.endpoint_views() if not view.draining
                ),
            )
            for state in self._table.deployments()
        ]

    def describe(self) -> Iterator[Metric]:
        # Registering must not read the route table (that would wait for the loop).
        return iter(())


def start_gateway_metrics(gateway: Gateway, listen: str) -> MetricsServer:
    """Serve `gateway`'s metrics (plus the process_* series) at http://`listen`/metrics.

    `listen` is "HOST:PORT", "[v6]:PORT" or a bare "PORT" (127.0.0.1); port 0 picks a free
    one (see MetricsServer.port). Raises StartupError for a malformed or busy address.
    Stop it with `await server.stop()` before the gateway.
    """
    return start_metrics_server(listen, [gateway.metrics])
