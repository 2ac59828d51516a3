"""Prometheus metrics of a node agent, from what its latest heartbeat reported: per GPU
memory, SM utilization and health; per instance GPU use and restarts; and the connection
counters. Nothing is measured for a scrape: the numbers are those the control plane got.

    metrics = start_agent_metrics(agent, "127.0.0.1:9402")   # GET /metrics
    ...
    await metrics.stop()

Self-contained on purpose: the server side imports the agent (`gpufleet up` embeds one),
never the reverse, so the small HTTP part is a copy of gpufleet.server.metrics_http's (with
the agent's ConfigError and default port 9402 in its messages).
Every name, type, label and unit is listed in docs/metrics.md.

The label for an instance is `instance_id`, not `instance`: Prometheus sets `instance` on
every scraped series to the scrape target and would rename ours to `exported_instance`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import Counter as Tally
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.gc_collector import GCCollector
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from gpufleet.agent.agent import Agent, AgentStartupError, HeartbeatReadings
from gpufleet.agent.config import ConfigError
from gpufleet.agent.gpu.readings import GpuHealth
from gpufleet.v1 import instance_pb2

__all__ = [
    "AgentCounters",
    "AgentMetrics",
    "DEFAULT_METRICS_HOST",
    "MetricsServer",
    "agent_families",
    "parse_metrics_listen",
    "start_agent_metrics",
]

_log = logging.getLogger(__name__)

DEFAULT_METRICS_HOST = "127.0.0.1"
"""Host a bare `--metrics-listen PORT` binds: metrics stay local unless asked otherwise."""

_INSTANCE_STATES = instance_pb2.InstanceState
_STATE_PREFIX = "INSTANCE_STATE_"


@dataclass(frozen=True)
class AgentCounters:
    """The agent's connection counters at scrape time."""

    heartbeats_sent: int
    heartbeat_send_failures: int
    connection_failures: int
    connected: bool


def agent_families(readings: HeartbeatReadings | None, counters: AgentCounters) -> list[Metric]:
    """The agent's metrics from its latest heartbeat readings and its counters (pure).
    Before the first heartbeat only the counters are there."""
    families: list[Metric] = [
        CounterMetricFamily(
            "gpufleet_agent_heartbeats_sent",
            "Heartbeats written to the control plane's Connect stream.",
            value=counters.heartbeats_sent,
        ),
        CounterMetricFamily(
            "gpufleet_agent_heartbeat_send_failures",
            "Heartbeats whose write failed because the stream broke (the agent reconnects).",
            value=counters.heartbeat_send_failures,
        ),
        CounterMetricFamily(
            "gpufleet_agent_connection_failures",
            "Attempts to register or hold the Connect stream that ended in an error.",
            value=counters.connection_failures,
        ),
        GaugeMetricFamily(
            "gpufleet_agent_connected",
            "1 while the Connect stream is open and the control plane has answered on it.",
            value=1 if counters.connected else 0,
        ),
    ]
    if readings is not None:
        families += _gpu_families(readings)
        families += _instance_families(readings)
    return families


def _gpu_families(readings: HeartbeatReadings) -> list[Metric]:
    probe = readings.gpus
    labels = ["gpu_uuid"]
    up = GaugeMetricFamily(
        "gpufleet_agent_gpu_probe_up",
        "1 when the GPU probe could read the node's GPUs, 0 when it could not at all (no "
        "driver, NVML missing; the agent log says why).",
        value=1 if probe.error is None else 0,
    )
    info = GaugeMetricFamily(
        "gpufleet_agent_gpu_info",
        "1 per GPU, carrying its NVML index and product name.",
        labels=["gpu_uuid", "index", "name"],
    )
    total = GaugeMetricFamily(
        "gpufleet_agent_gpu_memory_total_mib", "GPU memory capacity, MiB.", labels=labels
    )
    used = GaugeMetricFamily(
        "gpufleet_agent_gpu_memory_used_mib",
        "GPU memory in use by every process, including ones gpufleet did not start, MiB.",
        labels=labels,
    )
    sm = GaugeMetricFamily(
        "gpufleet_agent_gpu_sm_utilization_percent",
        "SM utilization over the last sample period, percent (0-100).",
        labels=labels,
    )
    health = GaugeMetricFamily(
        "gpufleet_agent_gpu_health",
        "1 for the GPU's current health (ok, degraded, lost, simulated), 0 for the others.",
        labels=["gpu_uuid", "health"],
    )
    for gpu in probe.gpus:
        info.add_metric([gpu.uuid, str(gpu.index), gpu.name], 1)
        total.add_metric([gpu.uuid], gpu.memory_total_mib)
        used.add_metric([gpu.uuid], gpu.memory_used_mib)
        sm.add_metric([gpu.uuid], gpu.sm_utilization_percent)
        for value in GpuHealth:
            health.add_metric([gpu.uuid, value.value.lower()], 1 if gpu.health is value else 0)
    return [up, info, total, used, sm, health]


def _instance_families(readings: HeartbeatReadings) -> list[Metric]:
    labels = ["instance_id", "deployment"]
    memory = GaugeMetricFamily(
        "gpufleet_agent_instance_gpu_memory_used_mib",
        "GPU memory held by the instance's processes over all GPUs, MiB.",
        labels=labels,
    )
    sm = GaugeMetricFamily(
        "gpufleet_agent_instance_sm_utilization_percent",
        "SM share the instance's processes used, summed over GPUs, percent of one GPU.",
        labels=labels,
    )
    overrun = GaugeMetricFamily(
        "gpufleet_agent_instance_gpu_memory_overrun",
        "1 when the instance uses more GPU memory than its deployment requested.",
        labels=labels,
    )
    restarts = CounterMetricFamily(
        "gpufleet_agent_instance_restarts",
        "Times the agent restarted the instance's process (crash or overrun).",
        labels=labels,
    )
    states = Tally(
        _INSTANCE_STATES.Name(status.state).removeprefix(_STATE_PREFIX).lower()
        for status in readings.instances
    )
    by_state = GaugeMetricFamily(
        "gpufleet_agent_instances",
        "Instances on this node by state.",
        labels=["state"],
    )
    for name in _INSTANCE_STATES.keys():
        if not name.endswith("_UNSPECIFIED"):
            label = name.removeprefix(_STATE_PREFIX).lower()
            by_state.add_metric([label], states.pop(label, 0))
    for label, count in sorted(states.items()):
        by_state.add_metric([label], count)
    for status in readings.instances:
        key = [status.instance_id, status.deployment]
        memory.add_metric(key, status.gpu_memory_used_mib)
        sm.add_metric(key, status.sm_utilization_percent)
        overrun.add_metric(key, 1 if status.gpu_memory_overrun else 0)
        restarts.add_metric(key, status.restart_count)
    return [by_state, memory, sm, overrun, restarts]


class AgentMetrics(Collector):
    """Reads the agent's latest readings and counters at scrape time. These are replaced
    (never mutated) by the event loop, so the scrape thread reads them directly."""

    def __init__(self, agent: Agent) -> None:
        self._agent = agent

    def counters(self) -> AgentCounters:
        """The connection counters now."""
        agent = self._agent
        return AgentCounters(
            heartbeats_sent=agent.heartbeats_sent,
            heartbeat_send_failures=agent.heartbeat_send_failures,
            connection_failures=agent.connection_failures,
            connected=agent.connected.is_set(),
        )

    def collect(self) -> Iterable[Metric]:
        return agent_families(self._agent.last_readings, self.counters())

    def describe(self) -> Iterator[Metric]:
        return iter(())


def parse_metrics_listen(text: str, flag: str = "--metrics-listen") -> tuple[str, int]:
    """"HOST:PORT", "[v6]:PORT" or a bare "PORT" (on 127.0.0.1) -> (host, port).

    The host comes back without brackets. Raises ConfigError naming `flag` when malformed.
    """
    value = text.strip()
    if value.isdigit():
        host, port_text = DEFAULT_METRICS_HOST, value
    else:
        host, sep, port_text = value.rpartition(":")
        if not sep:
            host = ""
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or not port_text.isdigit() or int(port_text) > 65535:
        raise ConfigError(
            f"{flag} {text!r} is not HOST:PORT or PORT with a port 0-65535, e.g. "
            f"127.0.0.1:9402, [::1]:9402 or 9402 (= {DEFAULT_METRICS_HOST}:9402)"
        )
    return host, int(port_text)


@dataclass
class MetricsServer:
    """A running `/metrics` HTTP endpoint."""

    host: str
    """The host it is bound to, as given (no brackets)."""
    port: int
    """The bound port (the real one when port 0 was asked for)."""
    registry: CollectorRegistry
    """What it serves."""
    _httpd: WSGIServer
    _thread: threading.Thread
    _stopped: bool = field(default=False)

    @property
    def address(self) -> str:
        """"HOST:PORT" to scrape ("[v6]:PORT" for IPv6)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        """http://HOST:PORT/metrics"""
        return f"http://{self.address}/metrics"

    async def stop(self) -> None:
        """Stop serving and close the socket (a scrape in progress may still finish)."""
        if self._stopped:
            return
        self._stopped = True
        # shutdown() waits for the serving thread's next poll (up to half a second).
        await asyncio.to_thread(self._close)

    def _close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5.0)


def start_agent_metrics(
    agent: Agent, listen: str, *, process_metrics: bool = True
) -> MetricsServer:
    """Serve `agent`'s metrics (and the process_* series) at http://`listen`/metrics.

    `listen` as parse_metrics_listen takes it; port 0 picks a free one. Raises ConfigError
    for a malformed address and AgentStartupError when it cannot be bound.
    """
    host, port = parse_metrics_listen(listen)
    registry = CollectorRegistry()
    registry.register(AgentMetrics(agent))
    if process_metrics:
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
    try:
        httpd, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as err:
        raise AgentStartupError(
            f"cannot serve metrics on {listen}: {err.strerror or err}; is the port in use? "
            "pick another --metrics-listen (port 0 picks a free one)"
        ) from None
    server = MetricsServer(host, httpd.server_port, registry, httpd, thread)
    _log.info("metrics on %s", server.url)
    return server
