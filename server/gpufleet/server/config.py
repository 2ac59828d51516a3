"""Control plane configuration."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_LISTEN = "127.0.0.1:50051"


@dataclass(frozen=True)
class ServerConfig:
    """Everything `start_control_plane` needs; built by `gpufleet server` from its flags."""

    state_dir: Path
    """Directory holding the SQLite database, the admin token and the state-dir lock.
    Created (mode 0700) if missing. One control plane per state dir at a time."""

    listen: str = DEFAULT_LISTEN
    """gRPC listen address "HOST:PORT" ("[::1]:PORT" for IPv6); port 0 picks a free port."""

    tls_cert: Path | None = None
    """PEM server certificate chain. With tls_key it turns TLS on; None serves plaintext."""

    tls_key: Path | None = None
    """PEM private key of tls_cert. Required exactly when tls_cert is given."""

    tls_client_ca: Path | None = None
    """PEM CA bundle for mutual TLS: when set, every client must present a certificate
    signed by it. Needs tls_cert and tls_key."""
