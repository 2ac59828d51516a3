"""The plain HTTP `/metrics` endpoint of the control plane and the gateway, and the bridge
that lets scrape-time collectors read state owned by the asyncio event loop.

The endpoint is prometheus_client's WSGI server on a daemon thread: a scrape never runs on
the event loop, so a slow scrape cannot delay a call. Collectors that read loop-owned state
(the route table, the store) hop onto the loop with `read_on_loop` for the few microseconds
the read takes; counters and histograms updated on the call path are thread-safe already.

The agent has its own copy of the server part (gpufleet.agent.metrics), because the agent
never imports server code (the dependency runs the other way: `gpufleet up` embeds an
agent).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from gpufleet.server.errors import StartupError

__all__ = [
    "DEFAULT_METRICS_HOST",
    "DEFAULT_READ_TIMEOUT_S",
    "MetricsServer",
    "parse_metrics_listen",
    "read_on_loop",
    "snapshot_or_none",
    "start_metrics_server",
]

_log = logging.getLogger(__name__)

DEFAULT_METRICS_HOST = "127.0.0.1"
"""Host a bare `--metrics-listen PORT` binds: metrics stay local unless asked otherwise."""
DEFAULT_READ_TIMEOUT_S = 5.0
"""Longest a scrape waits for the event loop; a loop busier than that is worth a gap."""

_T = TypeVar("_T")


def parse_metrics_listen(text: str, flag: str = "--metrics-listen") -> tuple[str, int]:
    """"HOST:PORT", "[v6]:PORT" or a bare "PORT" (on 127.0.0.1) -> (host, port).

    The host comes back without brackets. Raises StartupError naming `flag` when malformed.
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
        raise StartupError(
            f"{flag} {text!r} is not HOST:PORT or PORT with a port 0-65535, e.g. "
            f"127.0.0.1:9400, [::1]:9400 or 9400 (= {DEFAULT_METRICS_HOST}:9400)"
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


def start_metrics_server(
    listen: str, collectors: Iterable[Collector], *, process_metrics: bool = True
) -> MetricsServer:
    """Serve `collectors` on plain HTTP at `listen` (see parse_metrics_listen).

    `process_metrics` adds the standard process_*, python_info and python_gc_* series.
    Raises StartupError for a malformed or busy address.
    """
    host, port = parse_metrics_listen(listen)
    registry = CollectorRegistry()
    for collector in collectors:
        registry.register(collector)
    if process_metrics:
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
    try:
        httpd, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as err:
        raise StartupError(
            f"cannot serve metrics on {listen}: {err.strerror or err}; is the port in use? "
            "pick another --metrics-listen (port 0 picks a free one)"
        ) from None
    server = MetricsServer(host, httpd.server_port, registry, httpd, thread)
    _log.info("metrics on %s", server.url)
    return server


def read_on_loop(
    loop: asyncio.AbstractEventLoop,
    read: Callable[[], Awaitable[_T]],
    timeout_s: float = DEFAULT_READ_TIMEOUT_S,
) -> _T:
    """Run `read()` on `loop` and wait for its result from another thread (a scrape).

    Raises RuntimeError when called on the loop's own thread (it would wait for itself) or
    when the loop is closed, TimeoutError after `timeout_s`, or whatever `read` raised.
    """
    try:
        running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        raise RuntimeError(
            "read_on_loop was called on the event loop's own thread; scrape from another "
            "thread (the metrics HTTP server does) or read the state directly"
        )

    async def run() -> _T:
        return await read()

    future = asyncio.run_coroutine_threadsafe(run(), loop)
    try:
        return future.result(timeout_s)
    except TimeoutError:
        future.cancel()
        raise


def snapshot_or_none(
    loop: asyncio.AbstractEventLoop,
    read: Callable[[], Awaitable[_T]],
    what: str,
    timeout_s: float = DEFAULT_READ_TIMEOUT_S,
) -> _T | None:
    """`read_on_loop` for a collector: a failed read is logged and gives None, so that the
    scrape still returns every other metric (the gap shows in the graphs)."""
    try:
        return read_on_loop(loop, read, timeout_s)
    except TimeoutError:
        _log.warning(
            "metrics: reading %s took over %gs (event loop busy); left out of this scrape",
            what,
            timeout_s,
        )
    except Exception as err:  # noqa: BLE001 - a scrape must not fail on one source
        _log.warning("metrics: cannot read %s (%s); left out of this scrape", what, err)
    return None
