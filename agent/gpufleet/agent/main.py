"""`gpufleet agent`: run the node agent until SIGTERM or SIGINT.

On SIGTERM/SIGINT the agent stops heartbeating and exits WITHOUT stopping its instances:
they keep serving, and the next agent started on the same state dir adopts them (same pids,
no restart). That makes agent upgrades and restarts invisible to callers. To stop the
instances as well, start the agent with --stop-instances-on-exit (or drain the node first).
If the agent stays away longer than the control plane's node TTL, the control plane places
replacements elsewhere and tells this node to stop the old instances when it returns.

Exit status: 0 after a signal, 2 for bad flags or an unusable state dir, 1 when the control
plane refuses to register the node (bad join token or labels).

`gpufleet agent install-systemd ...` writes a systemd unit instead (see install.py).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Mapping
from pathlib import Path

from gpufleet.agent import install
from gpufleet.agent.agent import Agent, AgentStartupError, RegistrationRefusedError
from gpufleet.agent.config import (
    AgentConfig,
    ConfigError,
    TlsSettings,
    default_state_dir,
    parse_labels,
    split_host_port,
)
from gpufleet.agent.gpu.simulated import parse_simulate_gpus
from gpufleet.agent.host import default_node_name, route_source_address
from gpufleet.agent.metrics import MetricsServer, parse_metrics_listen, start_agent_metrics
from gpufleet.agent.cli_parser import OneLineErrorParser, configure_logging

PROG = "gpufleet agent"
SERVER_ENV = "GPUFLEET_SERVER"
JOIN_TOKEN_ENV = "GPUFLEET_JOIN_TOKEN"
DEFAULT_SERVER = "127.0.0.1:50051"
INSTALL_COMMAND = "install-systemd"
METRICS_LINE = "gpufleet agent metrics on {url}"

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2

_EPILOG = """\
Examples:
  gpufleet agent --server 10.0.0.5:50051 --join-token "$(cat join-token)" --labels zone=a
  gpufleet agent --server 127.0.0.1:50051 --join-token T --simulate-gpus 2x81559
  sudo gpufleet agent install-systemd --server 10.0.0.5:50051 --join-token T   # a service

Run `gpufleet agent install-systemd --help` to install the agent as a systemd service.

SIGTERM/SIGINT stop the agent but leave its instances running; the next agent on the same
--state-dir adopts them. Use --stop-instances-on-exit to stop them too."""


def build_parser(env: Mapping[str, str] = os.environ) -> OneLineErrorParser:
    """The flags of `gpufleet agent`."""
    parser = OneLineErrorParser(
        prog=PROG,
        description="Run the gpufleet node agent: register with the control plane, report GPUs "
        "and instances, and run the instances assigned to this node.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--server",
        metavar="HOST:PORT",
        default=env.get(SERVER_ENV) or DEFAULT_SERVER,
        help=f"control plane address (default: ${SERVER_ENV} or {DEFAULT_SERVER})",
    )
    parser.add_argument(
        "--join-token",
        default=env.get(JOIN_TOKEN_ENV) or None,
        help=f"join token from the control plane (default: ${JOIN_TOKEN_ENV}); needed only until "
        "the node has registered once",
    )
    parser.add_argument(
        "--simulate-gpus",
        metavar="COUNTxMIB",
        help="simulate GPUs instead of reading NVML, e.g. 2x81559 (two 80 GB cards)",
    )
    parser.add_argument("--labels", default="", metavar="K=V,...", help="node labels, e.g. zone=a,tier=gpu")
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="node identity, instance state and logs (default: $GPUFLEET_AGENT_STATE_DIR, else "
        "$GPUFLEET_STATE_DIR/agent, else ~/.gpufleet/agent)",
    )
    parser.add_argument("--name", default=None, help="node name (default: the host name)")
    parser.add_argument(
        "--advertise-host",
        default=None,
        help="host or IP gateways reach this node's instances at (default: the local address "
        "used to reach the control plane)",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="working directory of instance commands (default: the current directory)",
    )
    tls = parser.add_argument_group("TLS towards the control plane")
    tls.add_argument("--tls", action="store_true", help="use TLS with the system's root certificates")
    tls.add_argument("--tls-ca", type=Path, metavar="FILE", help="PEM CA of the control plane (implies TLS)")
    tls.add_argument("--tls-cert", type=Path, metavar="FILE", help="PEM client certificate (mutual TLS)")
    tls.add_argument("--tls-key", type=Path, metavar="FILE", help="PEM key of --tls-cert")
    parser.add_argument(
        "--stop-instances-on-exit",
        action="store_true",
        help="stop every instance gracefully when the agent exits (default: leave them running "
        "for the next agent to adopt)",
    )
    parser.add_argument(
        "--heartbeat-interval",
        type=float,
        default=None,
        metavar="SECONDS",
        help="heartbeat period (default: what the control plane asks for)",
    )
    parser.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        default=None,
        help="serve Prometheus metrics over plain HTTP at http://HOST:PORT/metrics; a bare PORT "
        "binds 127.0.0.1 (default: no metrics endpoint)",
    )
    parser.add_argument(
        "--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="default: INFO"
    )
    return parser


def _read_file(path: Path | None, flag: str) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read {flag} {path}: {err.strerror or err}") from None


def config_from_args(args: argparse.Namespace, env: Mapping[str, str] = os.environ) -> AgentConfig:
    """Resolve flags and environment into an AgentConfig; raises ConfigError."""
    host, port = split_host_port(args.server)
    labels = parse_labels(args.labels)
    if args.simulate_gpus is not None:
        try:
            parse_simulate_gpus(args.simulate_gpus)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ConfigError("mutual TLS needs both --tls-cert and --tls-key; only one was given")
    tls: TlsSettings | None = None
    if args.tls or args.tls_ca is not None or args.tls_cert is not None:
        tls = TlsSettings(
            root_cert=_read_file(args.tls_ca, "--tls-ca"),
            client_cert=_read_file(args.tls_cert, "--tls-cert"),
            client_key=_read_file(args.tls_key, "--tls-key"),
        )
    if args.heartbeat_interval is not None and not 0.05 <= args.heartbeat_interval <= 3600:
        raise ConfigError(f"--heartbeat-interval must be 0.05-3600 seconds, got {args.heartbeat_interval:g}")
    workdir: Path | None = args.workdir
    if workdir is not None and not workdir.is_dir():
        raise ConfigError(f"--workdir {workdir} is not a directory")
    name = args.name if args.name is not None else default_node_name()
    if not 1 <= len(name) <= 253:
        raise ConfigError(f"--name must be 1-253 characters, got {len(name)}")
    state_dir: Path = args.state_dir if args.state_dir is not None else default_state_dir(env, Path.home())
    advertise = args.advertise_host or route_source_address(host, port) or name
    return AgentConfig(
        server=args.server,
        state_dir=state_dir.expanduser().absolute(),
        node_name=name,
        join_token=args.join_token,
        labels=labels,
        simulate_gpus=args.simulate_gpus,
        advertise_host=advertise,
        workdir=str((workdir or Path.cwd()).absolute()),
        tls=tls,
        stop_instances_on_exit=args.stop_instances_on_exit,
        heartbeat_interval=args.heartbeat_interval,
    )


def main(argv: list[str] | None = None) -> int:
    """Run the agent (or `install-systemd ...`); see the module docstring for exit statuses."""
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == [INSTALL_COMMAND]:
        return install.main(argv[1:], build_parser(env={}))
    args = build_parser().parse_or_exit_code(argv)
    if isinstance(args, int):
        return args
    try:
        config = config_from_args(args)
        if args.metrics_listen is not None:
            parse_metrics_listen(args.metrics_listen)  # a typo fails before anything starts
    except ConfigError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    configure_logging(getattr(logging, args.log_level))
    try:
        asyncio.run(run_until_signal(Agent(config), metrics_listen=args.metrics_listen))
    except AgentStartupError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except RegistrationRefusedError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr, flush=True)
        return EXIT_REFUSED
    return EXIT_OK


async def run_until_signal(agent: Agent, metrics_listen: str | None = None) -> None:
    """Run `agent` until SIGTERM or SIGINT, serving its metrics at `metrics_listen` if given
    (AgentStartupError when that address cannot be bound)."""
    metrics: MetricsServer | None = None
    if metrics_listen is not None:
        metrics = start_agent_metrics(agent, metrics_listen)
        print(METRICS_LINE.format(url=metrics.url), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)
    for signum in signals:
        loop.add_signal_handler(signum, stop.set)
    try:
        await agent.run(stop)
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)
        if metrics is not None:
            await metrics.stop()
    logging.getLogger(__name__).info("agent stopped")
