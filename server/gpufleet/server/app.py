"""Assemble and start the control plane: store, gRPC server, auth, health, reflection."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
# The public name is health.aio, which the installed type stubs do not declare.
from grpc_health.v1._async import HealthServicer as AsyncHealthServicer
from grpc_reflection.v1alpha import reflection

from gpufleet.server.api.deployment_service import DeploymentService
from gpufleet.server.api.error_mapping import ErrorMappingInterceptor
from gpufleet.server.auth import (
    DEPLOYMENT_SERVICE,
    ROUTING_SERVICE,
    BearerAuthInterceptor,
    admin_token_verifier,
)
from gpufleet.server.config import ServerConfig
from gpufleet.server.errors import StartupError
from gpufleet.server.state_dir import DATABASE_FILE, StateDirLock
from gpufleet.server.store import SqliteStore, Store
from gpufleet.server.tls import server_credentials
from gpufleet.server.tokens import AdminToken, load_or_create_admin_token
from gpufleet.v1 import deployment_service_pb2_grpc

_log = logging.getLogger(__name__)

DEFAULT_STOP_GRACE_SECONDS = 5.0

# grpc enables SO_REUSEPORT by default, which lets a second server bind a port already in
# use and silently split its connections; a busy port must be an error instead.
_SERVER_OPTIONS = [("grpc.so_reuseport", 0)]


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
    _health: AsyncHealthServicer
    _lock: StateDirLock
    _stopped: bool = field(default=False)

    async def stop(self, grace: float = DEFAULT_STOP_GRACE_SECONDS) -> None:
        """Stop serving: health goes NOT_SERVING, watches end, calls in flight get `grace`
        seconds to finish, then the store closes and the state dir is unlocked."""
        if self._stopped:
            return
        self._stopped = True
        try:
            await self._health.enter_graceful_shutdown()
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

    Raises StartupError (bad TLS files, busy port, state dir in use or unusable). On the
    first start of a state dir, the new admin token is printed once to stdout.
    """
    credentials = server_credentials(config)
    host, _ = split_listen(config.listen)
    lock = StateDirLock.acquire(config.state_dir)
    try:
        admin = load_or_create_admin_token(config.state_dir)
        store = await SqliteStore.open(config.state_dir / DATABASE_FILE)
        try:
            server, health_servicer, port = await _serve(config, credentials, store, admin)
        except BaseException:
            await store.close()
            raise
    except BaseException:
        lock.release()
        raise
    if admin.created:
        _announce_admin_token(admin)
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
        _health=health_servicer,
        _lock=lock,
    )


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
) -> tuple[grpc.aio.Server, AsyncHealthServicer, int]:
    verify_admin = admin_token_verifier(admin.token)
    server = grpc.aio.server(
        interceptors=[
            ErrorMappingInterceptor(),
            BearerAuthInterceptor(
                {DEPLOYMENT_SERVICE: verify_admin, ROUTING_SERVICE: verify_admin}
            ),
        ],
        options=_SERVER_OPTIONS,
    )
    deployment_service_pb2_grpc.add_DeploymentServiceServicer_to_server(
        DeploymentService(store), server
    )
    served = [DEPLOYMENT_SERVICE]
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
