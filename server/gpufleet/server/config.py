"""Control plane configuration."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gpufleet.gateway.settings import DEFAULT_LISTEN as GATEWAY_DEFAULT_LISTEN

DEFAULT_LISTEN = "127.0.0.1:50051"
DEFAULT_NODE_TTL_S = 15.0
DEFAULT_HEARTBEAT_INTERVAL_S = 2
DEFAULT_RECONCILE_TICK_S = 0.5
DEFAULT_LOAD_REPORT_INTERVAL_S = 1
DEFAULT_GATEWAY_LISTEN = GATEWAY_DEFAULT_LISTEN
"""Where `gpufleet server` and `gpufleet up` serve their embedded gateway by default (the
same default as a standalone `gpufleet gateway`)."""


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

    node_ttl: float = DEFAULT_NODE_TTL_S
    """Seconds without a heartbeat after which a node is LOST and its instances replaced.
    Also the grace period every known node gets after the control plane starts."""

    heartbeat_interval: int = DEFAULT_HEARTBEAT_INTERVAL_S
    """Seconds between agent heartbeats, told to agents at registration (>= 1). Three
    missed heartbeats make a node SUSPECT (no new instances)."""

    reconcile: bool = True
    """Run the reconciler (placement, scaling, node loss, rollouts). Tests of the API alone
    turn it off and write instances to the store themselves."""

    reconcile_tick: float = DEFAULT_RECONCILE_TICK_S
    """Longest time between two reconciler passes (store changes wake it sooner)."""

    load_report_interval: int = DEFAULT_LOAD_REPORT_INTERVAL_S
    """Seconds between gateway load reports, told to gateways in ReportLoadResponse; a
    gateway silent for three intervals no longer counts."""
