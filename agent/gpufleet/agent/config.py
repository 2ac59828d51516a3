"""Agent configuration and the pure parsing of its flag values (no I/O)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

AGENT_STATE_DIR_ENV = "GPUFLEET_AGENT_STATE_DIR"
STATE_DIR_ENV = "GPUFLEET_STATE_DIR"
AGENT_SUBDIR = "agent"

DEFAULT_HEARTBEAT_INTERVAL_S = 5.0
"""Heartbeat period when the control plane does not name one at registration."""
DEFAULT_RECONNECT_CAP_S = 5.0
"""Longest wait between two attempts to reach the control plane."""

_LABEL_KEY = re.compile(r"[A-Za-z0-9._/-]{1,63}")


class ConfigError(ValueError):
    """A flag value is wrong; the message names the flag and how to fix it."""


@dataclass(frozen=True)
class TlsSettings:
    """How the agent authenticates the control plane (and itself, for mutual TLS)."""

    root_cert: bytes | None = None
    """PEM CA certificate(s) the server's certificate must chain to; None uses the system's."""
    client_cert: bytes | None = None
    """PEM client certificate for mutual TLS; needs client_key."""
    client_key: bytes | None = None
    """PEM key of client_cert."""


@dataclass(frozen=True)
class AgentConfig:
    """Everything an Agent needs; `gpufleet agent` builds it from its flags."""

    server: str
    """Control plane address "HOST:PORT"."""
    state_dir: Path
    """Holds node.json (identity), the agent lock, and instances/ (state files and logs)."""
    node_name: str
    """Name the node registers with (hostname by default); also names simulated GPUs."""
    join_token: str | None = None
    """Join token; needed only while the state dir holds no node identity yet."""
    labels: Mapping[str, str] = field(default_factory=dict)
    """Node labels, matched by deployments' node selectors."""
    simulate_gpus: str | None = None
    """--simulate-gpus text ("2x81559"): simulated cards instead of NVML."""
    fallback_simulate_gpus: str | None = None
    """Simulated cards to use when NVML finds no GPU (`gpufleet up` passes "2x81559")."""
    advertise_host: str = "127.0.0.1"
    """Host or IP that gateways use to reach this node's instances."""
    workdir: str | None = None
    """Working directory of instance commands; None means the agent's own."""
    tls: TlsSettings | None = None
    """TLS towards the control plane; None means plaintext."""
    stop_instances_on_exit: bool = False
    """On exit, stop every instance gracefully instead of leaving them running for the next
    agent to adopt."""
    heartbeat_interval: float | None = None
    """Heartbeat period in seconds; None takes the control plane's (from Register)."""
    reconnect_cap: float = DEFAULT_RECONNECT_CAP_S
    """Longest wait between two connection attempts, seconds."""


def parse_labels(text: str) -> dict[str, str]:
    """"zone=a,tier=gpu" -> {"zone": "a", "tier": "gpu"}; empty text gives no labels.

    Raises ConfigError for an item without '=', an empty or malformed key, or a key given
    twice.
    """
    labels: dict[str, str] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep:
            raise ConfigError(f"--labels: {item.strip()!r} is not KEY=VALUE (e.g. --labels zone=a,tier=gpu)")
        if not _LABEL_KEY.fullmatch(key):
            raise ConfigError(
                f"--labels: key {key!r} must be 1-63 characters of letters, digits and ._/- "
                "(e.g. --labels zone=a)"
            )
        if len(value) > 253:
            raise ConfigError(f"--labels: the value of {key!r} is longer than 253 characters")
        if key in labels:
            raise ConfigError(f"--labels: key {key!r} is given twice; give each key once")
        labels[key] = value
    return labels


def split_host_port(address: str, flag: str = "--server") -> tuple[str, int]:
    """"HOST:PORT" or "[v6]:PORT" -> (host without brackets, port 1-65535)."""
    host, sep, port_text = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ConfigError(
            f"{flag} {address!r} is not HOST:PORT with a port 1-65535, e.g. 127.0.0.1:50051"
        )
    return host, int(port_text)


def default_state_dir(env: Mapping[str, str], home: Path) -> Path:
    """Where the agent keeps its state unless --state-dir says otherwise.

    $GPUFLEET_AGENT_STATE_DIR, else $GPUFLEET_STATE_DIR/agent, else ~/.gpufleet/agent: the
    same place `gpufleet up` puts its agent's state, so `gpufleet logs` finds both.
    """
    explicit = env.get(AGENT_STATE_DIR_ENV)
    if explicit:
        return Path(explicit).expanduser()
    shared = env.get(STATE_DIR_ENV)
    if shared:
        return Path(shared).expanduser() / AGENT_SUBDIR
    return home / ".gpufleet" / AGENT_SUBDIR
