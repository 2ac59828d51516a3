"""`gpufleet up`: a control plane, a gateway and one local agent in one process, for a laptop
or one box.

They run as asyncio parts of one process; the agent and the gateway still talk to the
control plane through the real NodeService and RoutingService over loopback, exactly as
remote ones would. When NVML finds no GPU, the agent simulates two 80 GB cards so that GPU
deployments can be tried anywhere.

SIGTERM or Ctrl-C stops all three: the gateway first (calls in flight get its grace period
while the instances still run), then the agent, then the control plane. Unlike a standalone
`gpufleet agent`, `up` also stops its instances on the way out (a one-box setup is expected
to go away as a whole); with --keep-instances they keep running and the next `gpufleet up`
on the same state dir adopts them.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import Mapping
from pathlib import Path

from gpufleet.agent.agent import Agent, AgentStartupError, RegistrationRefusedError
from gpufleet.agent.config import AGENT_SUBDIR, AgentConfig, ConfigError, parse_labels
from gpufleet.agent.gpu.detect import detect_probe
from gpufleet.agent.gpu.readings import GpuHealth, GpuProbe
from gpufleet.agent.gpu.simulated import parse_simulate_gpus
from gpufleet.agent.host import default_node_name
from gpufleet.agent.metrics import AgentMetrics
from gpufleet.gateway.app import Gateway
from gpufleet.server.metrics import start_control_plane_metrics
from gpufleet.server.metrics_http import MetricsServer, parse_metrics_listen
from gpufleet.server.app import ControlPlane, split_listen, start_control_plane
from gpufleet.server.config import DEFAULT_LISTEN, ServerConfig
from gpufleet.server.errors import StartupError
from gpufleet.server.cli_parser import OneLineErrorParser, configure_logging
from gpufleet.server.main import (
    GATEWAY_LISTENING_LINE,
    LISTENING_LINE,
    STATE_DIR_ENV,
    add_gateway_flags,
    gateway_listen,
    loopback_target,
    start_embedded_gateway,
)

__all__ = ["FALLBACK_SIMULATED_GPUS", "PROG", "build_parser", "loopback_target", "main"]

PROG = "gpufleet up"
FALLBACK_SIMULATED_GPUS = "2x81559"
"""Simulated cards when NVML finds none: two 80 GB GPUs."""

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2

_log = logging.getLogger(__name__)

_EPILOG = f"""\
Examples:
  gpufleet up                                  # state in ~/.gpufleet, listens on {DEFAULT_LISTEN}
  gpufleet up --state-dir /tmp/gf --listen 127.0.0.1:0 --simulate-gpus 1x24576
  gpufleet up --gateway-listen 0.0.0.0:8001              # serve inference calls to other hosts

then, in another shell:
  gpufleet apply -f examples/echo.yaml && gpufleet instances && gpufleet nodes"""


def build_parser() -> OneLineErrorParser:
    """The flags of `gpufleet up`."""
    parser = OneLineErrorParser(
        prog=PROG,
        description="Run a gpufleet control plane and one local agent in one process.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help=f"control plane state; the agent's goes in its {AGENT_SUBDIR}/ subdirectory "
        f"(default: ${STATE_DIR_ENV}, else ~/.gpufleet)",
    )
    parser.add_argument(
        "--listen",
        default=DEFAULT_LISTEN,
        help=f"control plane address HOST:PORT; port 0 picks a free one (default: {DEFAULT_LISTEN})",
    )
    parser.add_argument(
        "--simulate-gpus",
        metavar="COUNTxMIB",
        help=f"simulate these GPUs instead of reading NVML (default: NVML, else {FALLBACK_SIMULATED_GPUS})",
    )
    parser.add_argument("--name", default=None, help="name of the local node (default: the host name)")
    parser.add_argument("--labels", default="", metavar="K=V,...", help="labels of the local node")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="working directory of instance commands (default: the current directory)",
    )
    parser.add_argument(
        "--keep-instances",
        action="store_true",
        help="leave instances running on exit; the next `gpufleet up` adopts them",
    )
    add_gateway_flags(parser)
    parser.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        default=None,
        help="serve Prometheus metrics of the control plane, the gateway and the agent over "
        "plain HTTP at http://HOST:PORT/metrics; a bare PORT binds 127.0.0.1 (default: off)",
    )
    return parser


def _state_dir(flag: Path | None, env: Mapping[str, str]) -> Path:
    if flag is not None:
        return flag.expanduser().absolute()
    configured = env.get(STATE_DIR_ENV, "")
    return (Path(configured) if configured else Path.home() / ".gpufleet").expanduser().absolute()


def main(argv: list[str] | None = None) -> int:
    """Run until SIGTERM/SIGINT: 0 after a clean stop, 2 for bad flags or startup errors."""
    args = build_parser().parse_or_exit_code(argv)
    if isinstance(args, int):
        return args
    try:
        labels = parse_labels(args.labels)
        if args.simulate_gpus is not None:
            parse_simulate_gpus(args.simulate_gpus)
        split_listen(args.listen)
        gateway = gateway_listen(args.gateway_listen, args.no_gateway, args.listen)
        if args.metrics_listen is not None:
            parse_metrics_listen(args.metrics_listen)
    except (ConfigError, ValueError, StartupError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    workdir: Path = (args.workdir or Path.cwd()).absolute()
    if not workdir.is_dir():
        print(f"{PROG}: error: --workdir {workdir} is not a directory", file=sys.stderr, flush=True)
        return EXIT_USAGE
    configure_logging()
    state_dir = _state_dir(args.state_dir, os.environ)
    node_name: str = args.name or default_node_name()
    try:
        probe = detect_probe(args.simulate_gpus, node_name, FALLBACK_SIMULATED_GPUS)
    except ValueError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    agent_config = AgentConfig(
        server="",  # set once the control plane's port is known
        state_dir=state_dir / AGENT_SUBDIR,
        node_name=node_name,
        labels=labels,
        advertise_host="127.0.0.1",
        workdir=str(workdir),
        stop_instances_on_exit=not args.keep_instances,
    )
    try:
        return asyncio.run(
            _run(
                ServerConfig(state_dir=state_dir, listen=args.listen),
                agent_config,
                probe,
                gateway,
                args.metrics_listen,
            )
        )
    except (StartupError, AgentStartupError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except RegistrationRefusedError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr, flush=True)
        return EXIT_REFUSED


async def _run(
    server_config: ServerConfig,
    agent_config: AgentConfig,
    probe: GpuProbe,
    gateway_address: str | None,
    metrics_listen: str | None = None,
) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)
    for signum in signals:
        loop.add_signal_handler(signum, stop.set)
    try:
        plane = await start_control_plane(server_config)
        gateway: Gateway | None = None
        metrics: MetricsServer | None = None
        try:
            if gateway_address is not None:
                gateway = await start_embedded_gateway(plane, server_config, gateway_address)
            config = dataclasses.replace(
                agent_config, server=loopback_target(plane.address), join_token=plane.join_token
            )
            agent = Agent(config, probe=probe)
            if metrics_listen is not None:
                metrics = start_control_plane_metrics(
                    plane, metrics_listen, gateway=gateway, extra=[AgentMetrics(agent)]
                )
                print(f"gpufleet metrics on {metrics.url}", flush=True)
            _announce(plane, gateway, server_config, config, probe)
            agent_stop = asyncio.Event()
            relay = asyncio.create_task(_stop_gateway_first(stop, gateway, agent_stop))
            try:
                await agent.run(agent_stop)
            finally:
                relay.cancel()
                await asyncio.gather(relay, return_exceptions=True)
        finally:
            try:
                if metrics is not None:
                    await metrics.stop()
                if gateway is not None:
                    await gateway.stop()
            finally:
                await plane.stop()
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)
    _log.info("gpufleet up stopped")
    return EXIT_OK


async def _stop_gateway_first(stop: asyncio.Event, gateway: Gateway | None, agent_stop: asyncio.Event) -> None:
    """On the signal, let the gateway finish its calls while the instances still run, then
    stop the agent (and with it, by default, the instances)."""
    await stop.wait()
    try:
        if gateway is not None:
            await gateway.stop()
    finally:
        agent_stop.set()


def _announce(
    plane: ControlPlane, gateway: Gateway | None, server_config: ServerConfig, agent: AgentConfig, probe: GpuProbe
) -> None:
    state_dir = server_config.state_dir
    gpus = probe.read().gpus
    simulated = any(gpu.health == GpuHealth.SIMULATED for gpu in gpus)
    kind = "simulated " if simulated else ""
    env_hint = "" if _is_default_state_dir(state_dir) else f"  (export {STATE_DIR_ENV}={state_dir})"
    exit_note = "stops its instances" if agent.stop_instances_on_exit else "leaves instances running"
    if gateway is None:
        data_plane = "  no gateway (--no-gateway): run `gpufleet gateway` to serve inference calls\n"
    else:
        data_plane = (
            f"{GATEWAY_LISTENING_LINE.format(address=gateway.address)}\n"
            f"  inference calls (Open Inference Protocol, model name = deployment name) go to "
            f"{loopback_target(gateway.address)} with metadata 'authorization: Bearer <invoke "
            "token>' (printed by `gpufleet apply`)\n"
        )
    print(
        f"{LISTENING_LINE.format(address=plane.address)}\n"
        f"{data_plane}"
        f"  admin token: {state_dir / 'admin-token'}; the CLI reads it from there{env_hint}\n"
        f"  join token for more agents: {state_dir / 'join-token'}\n"
        f"  local agent: node {agent.node_name!r} with {len(gpus)} {kind}GPU(s), state in "
        f"{agent.state_dir}, instances run in {agent.workdir}\n"
        f"  try: gpufleet --server {plane.address} apply -f examples/echo.yaml && gpufleet "
        f"--server {plane.address} instances\n"
        f"  stop: Ctrl-C or kill -TERM {os.getpid()} (stops the gateway, the control plane and "
        "the agent; "
        f"{exit_note})",
        flush=True,
    )


def _is_default_state_dir(state_dir: Path) -> bool:
    configured = os.environ.get(STATE_DIR_ENV, "")
    default = Path(configured) if configured else Path.home() / ".gpufleet"
    return state_dir == default.expanduser().absolute()
