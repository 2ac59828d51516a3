"""Facts about the machine the agent runs on: capacity, version, name, reachable address."""

from __future__ import annotations

import importlib.metadata
import os
import socket
from pathlib import Path

from gpufleet.agent.heartbeat import HostCapacity, parse_meminfo_total_mib


def read_host_capacity(meminfo: Path = Path("/proc/meminfo")) -> HostCapacity:
    """CPUs this process may run on (x1000 millicores) and total host memory."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    try:
        memory = parse_meminfo_total_mib(meminfo.read_text(encoding="ascii", errors="replace"))
    except OSError:
        memory = 0
    return HostCapacity(cpu_millis=cpus * 1000, memory_mib=memory)


def agent_version() -> str:
    """The installed gpufleet version, or "unknown" when run from an uninstalled tree."""
    try:
        return importlib.metadata.version("gpufleet")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def default_node_name() -> str:
    """The host name, as nodes are named by default."""
    return socket.gethostname() or "localhost"


def route_source_address(server_host: str, server_port: int) -> str | None:
    """The local IP this machine uses to reach the control plane; None if it cannot tell.

    A gateway usually sits where the control plane is (or on the same network), so the
    address the kernel picks towards the control plane is a good default advertise host;
    with a loopback control plane it is 127.0.0.1. A UDP connect sends no packet.
    """
    try:
        infos = socket.getaddrinfo(server_host, server_port, type=socket.SOCK_DGRAM)
    except (OSError, UnicodeError):
        return None
    for family, kind, proto, _, address in infos:
        try:
            with socket.socket(family, kind, proto) as sock:
                sock.connect(address)
                local: str = sock.getsockname()[0]
                return local
        except OSError:
            continue
    return None
