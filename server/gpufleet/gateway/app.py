"""Assemble and start a gateway: route watch, load reports, and the data plane server.

The data plane port serves, in lookup order: grpc.health.v1 and server reflection,
`inference.GRPCInferenceService`, and the transparent proxy for every other method.
Admission control is the gateway's own (admission.py); grpcio's maximum_concurrent_rpcs is
deliberately not set, because it would refuse calls that should queue.

`start_gateway` returns without waiting for the control plane: the gateway starts serving
at once and ServerReady / health turn on once the first route snapshot arrived. Calls made
before that get NOT_FOUND for every deployment.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
# The public name is health.aio, which the installed type stubs do not declare.
from grpc_health.v1._async import HealthServicer as AsyncHealthServicer
from grpc_reflection.v1alpha import reflection

from gpufleet.gateway.admission import DeploymentAdmission
from gpufleet.gateway.config import AdmissionConfig
from gpufleet.gateway.dispatch import Dispatcher
from gpufleet.gateway.h2.front import Front
from gpufleet.gateway.load_reporter import LoadReporter
from gpufleet.gateway.metrics import GatewayMetrics
from gpufleet.gateway.oip_service import SERVICE_NAME as INFERENCE_SERVICE
from gpufleet.gateway.oip_service import InferenceService
from gpufleet.gateway.proxy import ProxyHandler
from gpufleet.gateway.route_table import RouteTable
from gpufleet.gateway.route_watch import RouteWatcher
from gpufleet.gateway.settings import GatewayConfig
from gpufleet.gateway.tls import (
    control_plane_credentials,
    data_plane_credentials,
    data_plane_ssl_context,
)
from gpufleet.gateway.upstreams import UpstreamPool
from gpufleet.server.api.error_mapping import DecodeGuardInterceptor
from gpufleet.server.errors import StartupError
from gpufleet.v1 import routing_service_pb2_grpc

__all__ = ["DEFAULT_STOP_GRACE_SECONDS", "Gateway", "GatewayConfig", "start_gateway"]

_log = logging.getLogger(__name__)

DEFAULT_STOP_GRACE_SECONDS = 5.0

# See gpufleet.server.app: a busy port must be an error, not a silently shared one.
_SERVER_OPTIONS = [("grpc.so_reuseport", 0)]
# Pings at the control plane's default minimum interval (5 min) find a silently dead peer
# without getting the watch closed for "too many pings".
_CONTROL_CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 300_000),
    ("grpc.keepalive_timeout_ms", 20_000),
]


@dataclass
class Gateway:
    """A running gateway."""

    port: int
    """The bound data plane port (the real one when the config asked for port 0)."""
    address: str
    """"HOST:PORT" as listened on."""
    gateway_id: str
    """This gateway's id in load reports."""
    server: grpc.aio.Server
    """The gRPC server behind the data plane port (the port itself with `front` None)."""
    table: RouteTable
    """The routing table copy."""
    watcher: RouteWatcher
    """The WatchRoutes client."""
    reporter: LoadReporter
    """The ReportLoad client."""
    upstreams: UpstreamPool
    """The channels to instances."""
    metrics: GatewayMetrics
    """Per-deployment call metrics; serve them with gateway.metrics.start_gateway_metrics."""
    front: Front | None
    """The HTTP/2 server on the data plane port (gateway/h2/front.py), unless disabled."""
    _control_channel: grpc.aio.Channel
    _health: AsyncHealthServicer
    _tasks: list[asyncio.Task[None]]
    _stopped: bool = field(default=False)

    async def wait_synced(self, timeout: float | None = None) -> None:
        """Wait for the first route snapshot; TimeoutError after `timeout` seconds."""
        await asyncio.wait_for(self.table.wait_synced(), timeout)

    async def stop(self, grace: float = DEFAULT_STOP_GRACE_SECONDS) -> None:
        """Stop serving: health goes NOT_SERVING, queued calls fail, calls in flight get
        `grace` seconds to finish, then the control plane clients and channels close."""
        if self._stopped:
            return
        self._stopped = True
        try:
            await self._health.enter_graceful_shutdown()
            self.table.close()
            if self.front is None:
                await self.server.stop(grace)
            else:
                await asyncio.gather(self.front.stop(grace), self.server.stop(grace))
        finally:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self.upstreams.close()
            await self._control_channel.close(None)
        _log.info("gateway %s stopped", self.gateway_id)


async def start_gateway(config: GatewayConfig) -> Gateway:
    """Start serving on `config.listen` and start watching routes on the control plane.

    Raises StartupError (bad TLS files, malformed or busy listen address).
    """
    host, _ = split_listen(config.listen)
    server_credentials = data_plane_credentials(config)
    channel_credentials = control_plane_credentials(config)
    message_options = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
    ]
    if channel_credentials is None:
        control_channel = grpc.aio.insecure_channel(
            config.server_address, options=_CONTROL_CHANNEL_OPTIONS
        )
    else:
        control_channel = grpc.aio.secure_channel(
            config.server_address, channel_credentials, options=_CONTROL_CHANNEL_OPTIONS
        )
    stub = routing_service_pb2_grpc.RoutingServiceStub(control_channel)
    auth = (("authorization", f"Bearer {config.admin_token}"),)
    upstreams = UpstreamPool(options=message_options)

    table: RouteTable | None = None

    def admissions() -> list[DeploymentAdmission]:
        return [] if table is None else [s.admission for s in table.deployments()]

    reporter = LoadReporter(stub, admissions, gateway_id=config.gateway_id, metadata=auth)

    def make_admission(name: str, admission_config: AdmissionConfig) -> DeploymentAdmission:
        return DeploymentAdmission(name, admission_config, on_demand=reporter.demand)

    table = RouteTable(upstreams, make_admission)
    watcher = RouteWatcher(
        stub,
        table,
        gateway_id=config.gateway_id,
        metadata=auth,
        initial_backoff_s=config.reconnect_initial_backoff_s,
        max_backoff_s=config.reconnect_max_backoff_s,
    )
    metrics = GatewayMetrics(table, asyncio.get_running_loop())
    dispatcher = Dispatcher(table, upstreams, metrics)
    server = grpc.aio.server(
        options=[*_SERVER_OPTIONS, *message_options],
        interceptors=[DecodeGuardInterceptor()],
    )
    health_servicer = AsyncHealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [INFERENCE_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    server.add_generic_rpc_handlers((InferenceService(table, dispatcher).generic_handler(),))
    server.add_generic_rpc_handlers((ProxyHandler(dispatcher),))
    front: Front | None = None
    try:
        if config.http2_front:
            # The grpc.aio server listens on loopback only; the front relays to it.
            internal_port = _bind(server, "127.0.0.1:0", None)
            await server.start()
            front = Front(
                dispatcher,
                f"127.0.0.1:{internal_port}",
                config.max_message_bytes,
                data_plane_ssl_context(config),
            )
            upstreams.on_retain = front.retain
            port = await _start_front(front, config.listen)
        else:
            port = _bind(server, config.listen, server_credentials)
            await server.start()
    except BaseException:
        await control_channel.close(None)
        await server.stop(None)
        raise
    for service in ("", INFERENCE_SERVICE):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    tasks = [
        asyncio.create_task(watcher.run(), name="gpufleet-gateway-route-watch"),
        asyncio.create_task(reporter.run(), name="gpufleet-gateway-load-report"),
        asyncio.create_task(
            _serving_once_synced(table, health_servicer), name="gpufleet-gateway-health"
        ),
    ]
    address = f"{host}:{port}"
    _log.info(
        "gateway %s serving on %s (%s), control plane %s",
        config.gateway_id,
        address,
        "plaintext" if server_credentials is None else "TLS",
        config.server_address,
    )
    return Gateway(
        port=port,
        address=address,
        gateway_id=config.gateway_id,
        server=server,
        front=front,
        table=table,
        watcher=watcher,
        reporter=reporter,
        upstreams=upstreams,
        metrics=metrics,
        _control_channel=control_channel,
        _health=health_servicer,
        _tasks=tasks,
    )


def split_listen(listen: str) -> tuple[str, int]:
    """"HOST:PORT" or "[v6]:PORT" -> (host as written, port); StartupError if malformed."""
    host, sep, port_text = listen.rpartition(":")
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise StartupError(
            f"--listen {listen!r} is not HOST:PORT with a port 0-65535, e.g. 127.0.0.1:8001 "
            "or [::1]:0"
        )
    return host, int(port_text)


async def _start_front(front: Front, listen: str) -> int:
    host, port = split_listen(listen)
    try:
        return await front.start(host, port)
    except OSError as err:
        raise StartupError(
            f"cannot listen on {listen}: {err.strerror or err}; is the port in use? pick "
            "another --listen (port 0 picks a free one)"
        ) from err


def _bind(
    server: grpc.aio.Server, listen: str, credentials: grpc.ServerCredentials | None
) -> int:
    try:
        if credentials is None:
            port = server.add_insecure_port(listen)
        else:
            port = server.add_secure_port(listen, credentials)
    except RuntimeError as err:
        raise StartupError(
            f"cannot listen on {listen}: {err}; is the port in use? pick another --listen "
            "(port 0 picks a free one)"
        ) from err
    if port == 0:
        raise StartupError(f"cannot listen on {listen}; pick another --listen")
    return port


async def _serving_once_synced(table: RouteTable, health_servicer: AsyncHealthServicer) -> None:
    await table.wait_synced()
    for service in ("", INFERENCE_SERVICE):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
