"""Assemble and start the control plane: store, gRPC server, auth, health, reflection,
the node side (NodeService, reconciler) and the routing API for gateways."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
# The public name is health.aio, which the installed type stubs do not declare.
from grpc_health.v1._async import HealthServicer as AsyncHealthServicer
from grpc_reflection.v1alpha import reflection

from gpufleet.server.api.error_mapping import ErrorMappingInterceptor
from gpufleet.server.api.node_service import NodeService, NodeServiceDeps
from gpufleet.server.api.node_view import ControlPlaneDeploymentService
from gpufleet.server.api.routing_service import RoutingService
from gpufleet.server.auth import (
    DEPLOYMENT_SERVICE,
    NODE_CONNECT_METHOD,
    NODE_SERVICE,
    ROUTING_SERVICE,
    BearerAuthInterceptor,
    NodeCredentials,
    admin_guard,
    node_guard,
)
from gpufleet.server.config import ServerConfig
from gpufleet.server.errors import StartupError
from gpufleet.server.join_tokens import JoinToken, load_or_create_join_token
from gpufleet.server.load_reports import LoadBoard
from gpufleet.server.metrics import ReconcileMetrics
from gpufleet.server.node_hub import NodeHub
from gpufleet.server.nodes import NodeTracker
from gpufleet.server.reconciler.loop import Reconciler, ReconcilerSettings
from gpufleet.server.state_dir import DATABASE_FILE, StateDirLock
from gpufleet.server.store import SqliteStore, Store
from gpufleet.server.tls import server_credentials
from gpufleet.server.tokens import AdminToken, load_or_create_admin_token
from gpufleet.v1 import (
    deployment_service_pb2_grpc,
    node_pb2,
    node_service_pb2_grpc,
    routing_service_pb2_grpc,
)

_log = logging.getLogger(__name__)

DEFAULT_STOP_GRACE_SECONDS = 5.0

# grpc enables SO_REUSEPORT by default, which lets a second server bind a port already in
# use and silently split its connections; a busy port must be an error instead.
_SERVER_OPTIONS = [("grpc.so_reuseport", 0)]
# A gateway whose reports stop counts for this many report intervals.
_LOAD_REPORTS_KEPT_INTERVALS = 3


@dataclass
class ControlPlane:
    """A running control plane."""

    port: int
    """The bound port (the real one when the config asked for port 0)."""
    address: str
    """"HOST:PORT" as listened on."""
    admin_token: str
    """The admin bearer token."""
    store: Store
    """The open store."""
    server: grpc.aio.Server
    """The gRPC server."""
    join_token: str
    """The join token agents pass to NodeService.Register (`gpufleet agent --join-token`)."""
    reconciler: Reconciler | None
    """The running reconciler; None when the config turned it off."""
    node_tracker: NodeTracker
    """Latest heartbeat per node."""
    reconcile_metrics: ReconcileMetrics
    """Reconcile pass counts and durations (for start_control_plane_metrics)."""
    _health: AsyncHealthServicer
    _lock: StateDirLock
    _hub: NodeHub
    _stopped: bool = field(default=False)

    async def stop(self, grace: float = DEFAULT_STOP_GRACE_SECONDS) -> None:
        """Stop serving: health goes NOT_SERVING, watches end, calls in flight get `grace`
        seconds to finish, then the store closes and the state dir is unlocked."""
        if self._stopped:
            return
        self._stopped = True
        try:
            if self.reconciler is not None:
                await self.reconciler.stop()
            await self._health.enter_graceful_shutdown()
            # Agents' streams end cleanly; their instances keep running meanwhile.
            self._hub.close_all()
            self.store.close_subscriptions()
            await self.server.stop(grace)
        finally:
            try:
                await self.store.close()
            finally:
                self._lock.release()
        _log.info("control plane stopped")


async def start_control_plane(config: ServerConfig) -> ControlPlane:
    """Open the state dir and store, then start serving on `config.listen`.

    Raises StartupError (bad TLS files, busy port, state dir in use or unusable, bad
    timing settings). On the first start of a state dir, the new admin token and join token
    are printed once to stdout.
    """
    _check_timing(config)
    credentials = server_credentials(config)
    host, _ = split_listen(config.listen)
    lock = StateDirLock.acquire(config.state_dir)
    try:
        admin = load_or_create_admin_token(config.state_dir)
        store = await SqliteStore.open(config.state_dir / DATABASE_FILE)
        try:
            join = await load_or_create_join_token(config.state_dir, store)
            node_side = await _node_side(config, store)
            server, health_servicer, port = await _serve(
                config, credentials, store, admin, node_side
            )
        except BaseException:
            await store.close()
            raise
    except BaseException:
        lock.release()
        raise
    if node_side.reconciler is not None:
        node_side.reconciler.start()
    if admin.created:
        _announce_admin_token(admin)
    if join.created:
        _announce_join_token(join)
    address = f"{host}:{port}"
    _log.info(
        "control plane serving on %s (%s), state dir %s",
        address,
        "plaintext" if credentials is None else "TLS",
        config.state_dir,
    )
    return ControlPlane(
        port=port,
        address=address,
        admin_token=admin.token,
        store=store,
        server=server,
        join_token=join.token,
        reconciler=node_side.reconciler,
        node_tracker=node_side.tracker,
        reconcile_metrics=node_side.reconcile_metrics,
        _health=health_servicer,
        _lock=lock,
        _hub=node_side.hub,
    )


@dataclass(frozen=True)
class _NodeSide:
    credentials: NodeCredentials
    tracker: NodeTracker
    hub: NodeHub
    loads: LoadBoard
    reconciler: Reconciler | None
    reconcile_metrics: ReconcileMetrics

    def wake(self) -> None:
        if self.reconciler is not None:
            self.reconciler.wake()

    def node_states(self) -> Mapping[str, node_pb2.NodeState.ValueType]:
        return {} if self.reconciler is None else self.reconciler.node_states


def _check_timing(config: ServerConfig) -> None:
    if not config.node_ttl > 0:
        raise StartupError(f"--node-ttl must be more than 0 seconds; got {config.node_ttl}")
    if config.heartbeat_interval < 1:
        raise StartupError(
            f"--heartbeat-interval must be at least 1 second; got {config.heartbeat_interval}"
        )
    if not config.reconcile_tick > 0 or config.load_report_interval < 1:
        raise StartupError(
            "reconcile_tick must be more than 0 and load_report_interval at least 1 second"
        )


async def _node_side(config: ServerConfig, store: Store) -> _NodeSide:
    credentials = NodeCredentials(
        {r.node.id: r.secret_sha256 for r in await store.list_node_records()}
    )
    tracker = NodeTracker()
    hub = NodeHub()
    loads = LoadBoard(
        expire_after=_LOAD_REPORTS_KEPT_INTERVALS * config.load_report_interval,
        started_wall=time.time(),
    )
    reconcile_metrics = ReconcileMetrics()
    reconciler = None
    if config.reconcile:
        reconciler = Reconciler(
            store,
            tracker,
            loads,
            hub,
            ReconcilerSettings(
                node_ttl=config.node_ttl,
                heartbeat_interval=config.heartbeat_interval,
                tick=config.reconcile_tick,
            ),
            on_pass=reconcile_metrics.observe_pass,
        )
    return _NodeSide(credentials, tracker, hub, loads, reconciler, reconcile_metrics)


def split_listen(listen: str) -> tuple[str, int]:
    """"HOST:PORT" or "[v6]:PORT" -> (host as written, port); StartupError if malformed."""
    host, sep, port_text = listen.rpartition(":")
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise StartupError(
            f"--listen {listen!r} is not HOST:PORT with a port 0-65535, e.g. 127.0.0.1:50051 "
            "or [::1]:0"
        )
    return host, int(port_text)


async def _serve(
    config: ServerConfig,
    credentials: grpc.ServerCredentials | None,
    store: Store,
    admin: AdminToken,
    node_side: _NodeSide,
) -> tuple[grpc.aio.Server, AsyncHealthServicer, int]:
    server = grpc.aio.server(
        interceptors=[
            ErrorMappingInterceptor(),
            BearerAuthInterceptor(
                {
                    DEPLOYMENT_SERVICE: admin_guard(admin.token, DEPLOYMENT_SERVICE),
                    ROUTING_SERVICE: admin_guard(admin.token, ROUTING_SERVICE),
                    NODE_CONNECT_METHOD: node_guard(node_side.credentials),
                }
            ),
        ],
        options=_SERVER_OPTIONS,
    )
    deployment_service_pb2_grpc.add_DeploymentServiceServicer_to_server(
        ControlPlaneDeploymentService(store, node_side.tracker, node_side.node_states), server
    )
    node_service_pb2_grpc.add_NodeServiceServicer_to_server(
        NodeService(
            NodeServiceDeps(
                store=store,
                credentials=node_side.credentials,
                hub=node_side.hub,
                tracker=node_side.tracker,
                wake_reconciler=node_side.wake,
                heartbeat_interval_seconds=config.heartbeat_interval,
            )
        ),
        server,
    )
    routing_service_pb2_grpc.add_RoutingServiceServicer_to_server(
        RoutingService(
            store,
            node_side.loads,
            node_side.wake,
            report_interval_seconds=config.load_report_interval,
        ),
        server,
    )
    served = [DEPLOYMENT_SERVICE, NODE_SERVICE, ROUTING_SERVICE]
    health_servicer = AsyncHealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [*served, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    try:
        if credentials is None:
            port = server.add_insecure_port(config.listen)
        else:
            port = server.add_secure_port(config.listen, credentials)
    except RuntimeError as err:
        raise StartupError(
            f"cannot listen on {config.listen}: {err}; is the port in use? pick another "
            "--listen (port 0 picks a free one)"
        ) from err
    if port == 0:
        raise StartupError(f"cannot listen on {config.listen}; pick another --listen")
    await server.start()
    for service in ("", *served):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    return server, health_servicer, port


def _announce_admin_token(admin: AdminToken) -> None:
    print(
        f"Created the admin token (shown only this once, kept in {admin.path}):\n"
        f"    {admin.token}\n"
        "Clients send it as gRPC metadata 'authorization: Bearer <token>'; the gpufleet CLI "
        "reads it from that file or from $GPUFLEET_TOKEN.",
        file=sys.stdout,
        flush=True,
    )


def _announce_join_token(join: JoinToken) -> None:
    print(
        f"Created the join token (shown only this once, kept in {join.path}):\n"
        f"    {join.token}\n"
        "Agents join with: gpufleet agent --server HOST:PORT --join-token <token>",
        file=sys.stdout,
        flush=True,
    )
