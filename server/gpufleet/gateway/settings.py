"""Configuration of one gateway process (`gpufleet gateway` or embedded in the server)."""

from __future__ import annotations

import math
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_LISTEN = "127.0.0.1:8001"
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024


def default_gateway_id() -> str:
    """host-pid: unique among gateways running side by side, stable for the process."""
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True)
class GatewayConfig:
    """Everything `start_gateway` needs."""

    server_address: str
    """Control plane "HOST:PORT": the gateway watches its routes and reports load there."""

    admin_token: str
    """Admin bearer token for RoutingService on the control plane."""

    listen: str = DEFAULT_LISTEN
    """Data plane listen address "HOST:PORT" ("[::1]:PORT" for IPv6); port 0 picks one."""

    gateway_id: str = field(default_factory=default_gateway_id)
    """Name of this gateway in the control plane's load accounting and logs."""

    tls_cert: Path | None = None
    """PEM certificate chain for the data plane port. With tls_key it turns TLS on."""

    tls_key: Path | None = None
    """PEM private key of tls_cert."""

    tls_client_ca: Path | None = None
    """PEM CA bundle: clients of the data plane must present a certificate it signed."""

    server_tls: bool = False
    """Connect to the control plane with TLS (system roots unless server_tls_ca is set)."""

    server_tls_ca: Path | None = None
    """PEM CA bundle of the control plane's certificate; implies server_tls."""

    server_tls_cert: Path | None = None
    """PEM client certificate for mutual TLS with the control plane."""

    server_tls_key: Path | None = None
    """PEM key of server_tls_cert."""

    reconnect_initial_backoff_s: float = 0.2
    """First wait before re-opening a broken route watch; doubles up to the maximum."""

    reconnect_max_backoff_s: float = 10.0
    """Longest wait between two attempts to reach the control plane."""

    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    """Largest message accepted from a client or an instance (inference tensors are big)."""

    http2_front: bool = True
    """Serve the data plane port with the gateway's own HTTP/2 layer (gateway/h2/), which
    forwards inference calls' frames itself; False: the grpc.aio server listens there."""

    def __post_init__(self) -> None:
        if not self.server_address.strip():
            raise ValueError("server_address is empty; give the control plane as HOST:PORT")
        if not self.admin_token.strip():
            raise ValueError(
                "admin_token is empty; pass the control plane's admin token (its state dir "
                "holds it in the file admin-token)"
            )
        if not self.gateway_id.strip():
            raise ValueError("gateway_id is empty; leave it out to use host-pid")
        for name in ("reconnect_initial_backoff_s", "reconnect_max_backoff_s"):
            value: float = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number of seconds > 0, got {value!r}")
        if self.reconnect_max_backoff_s < self.reconnect_initial_backoff_s:
            raise ValueError(
                "reconnect_max_backoff_s must be >= reconnect_initial_backoff_s, got "
                f"{self.reconnect_max_backoff_s!r} < {self.reconnect_initial_backoff_s!r}"
            )
        if self.max_message_bytes < 1:
            raise ValueError(f"max_message_bytes must be >= 1, got {self.max_message_bytes}")
