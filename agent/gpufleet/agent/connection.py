"""The agent's side of gpufleet.v1.NodeService: channel, Register, and one Connect stream."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc

from gpufleet.agent.config import TlsSettings
from gpufleet.agent.identity import NodeIdentity
from gpufleet.v1 import node_service_pb2, node_service_pb2_grpc

if TYPE_CHECKING:
    _ConnectCall = grpc.aio.StreamStreamCall[node_service_pb2.ConnectRequest, node_service_pb2.ConnectResponse]
else:
    _ConnectCall = Any

NODE_ID_METADATA = "gpufleet-node-id"
REGISTER_TIMEOUT_S = 10.0

# grpc's own reconnect backoff grows to 120 s by default; the agent paces its attempts
# itself (jittered, capped at a few seconds) and wants every attempt to really dial.
# Keepalive pings stay above the server's default minimum interval (5 min), which would
# otherwise answer frequent pings with GOAWAY; they only catch a silently vanished peer.
CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 5000),
    ("grpc.keepalive_time_ms", 360_000),
    ("grpc.keepalive_timeout_ms", 20_000),
)

# Codes that mean "these credentials are not accepted", as opposed to "could not talk".
AUTH_CODES = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})


def open_channel(target: str, tls: TlsSettings | None) -> grpc.aio.Channel:
    """A channel to the control plane; plaintext when tls is None."""
    if tls is None:
        return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=tls.root_cert,
        private_key=tls.client_key,
        certificate_chain=tls.client_cert,
    )
    return grpc.aio.secure_channel(target, credentials, options=CHANNEL_OPTIONS)


def node_metadata(identity: NodeIdentity) -> tuple[tuple[str, str], ...]:
    """Call metadata that authenticates the node on Connect."""
    return (
        ("authorization", f"Bearer {identity.node_secret}"),
        (NODE_ID_METADATA, identity.node_id),
    )


@dataclass(frozen=True)
class Registration:
    """What Register gave back."""

    identity: NodeIdentity
    heartbeat_interval: float | None
    """Heartbeat period the server expects, seconds; None when it names none."""


async def register(
    channel: grpc.aio.Channel,
    *,
    server: str,
    join_token: str,
    node_name: str,
    labels: Mapping[str, str],
    previous: NodeIdentity | None,
    timeout: float = REGISTER_TIMEOUT_S,
) -> Registration:
    """Register the node; with `previous`, as the same node (same id). Raises AioRpcError."""
    stub = node_service_pb2_grpc.NodeServiceStub(channel)
    response = await stub.Register(
        node_service_pb2.RegisterRequest(
            join_token=join_token,
            node_name=node_name,
            labels=dict(labels),
            node_id=previous.node_id if previous is not None else "",
            node_secret=previous.node_secret if previous is not None else "",
        ),
        timeout=timeout,
    )
    if not response.node_id or not response.node_secret:
        raise ProtocolError("the control plane answered Register without a node id or secret")
    interval = float(response.heartbeat_interval_seconds) if response.heartbeat_interval_seconds > 0 else None
    return Registration(
        identity=NodeIdentity(
            node_id=response.node_id,
            node_secret=response.node_secret,
            node_name=node_name,
            server=server,
        ),
        heartbeat_interval=interval,
    )


class ProtocolError(Exception):
    """The control plane answered something the agent cannot use."""


class ConnectStream:
    """One NodeService.Connect stream: heartbeats out, desired instance sets in."""

    def __init__(self, channel: grpc.aio.Channel, identity: NodeIdentity) -> None:
        stub = node_service_pb2_grpc.NodeServiceStub(channel)
        self._call: _ConnectCall = stub.Connect(None, metadata=node_metadata(identity))

    async def send(self, heartbeat: node_service_pb2.Heartbeat) -> None:
        """Send one heartbeat. Raises AioRpcError when the stream has failed."""
        await self._call.write(node_service_pb2.ConnectRequest(heartbeat=heartbeat))

    async def receive(self) -> node_service_pb2.DesiredInstances | None:
        """The next desired set; None when the server ended the stream cleanly.

        Raises AioRpcError when the stream failed.
        """
        while True:
            response = await self._call.read()
            # read() gives a message or grpc.aio.EOF (and raises for a failed stream).
            if not isinstance(response, node_service_pb2.ConnectResponse):
                return None
            if response.HasField("desired"):
                return response.desired
            # A message without a desired set carries nothing for this agent version.

    def cancel(self) -> None:
        """End the stream from this side (idempotent)."""
        self._call.cancel()
