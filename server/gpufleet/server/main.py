"""`gpufleet server`: run the control plane until SIGTERM or SIGINT.

By default a gateway (the data plane) runs in the same process on its own port, as a
standalone `gpufleet gateway` would: it reaches the control plane over loopback with the
admin token, through the same RoutingService any other gateway uses, and stops before the
control plane does. `--no-gateway` leaves it out (gateways then run elsewhere).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from gpufleet.gateway.app import Gateway, start_gateway
from gpufleet.gateway.main import LISTENING_LINE as GATEWAY_LISTENING_LINE
from gpufleet.gateway.settings import GatewayConfig, default_gateway_id
from gpufleet.server.app import ControlPlane, split_listen, start_control_plane
from gpufleet.server.metrics import start_control_plane_metrics
from gpufleet.server.metrics_http import MetricsServer, parse_metrics_listen
from gpufleet.server.config import (
    DEFAULT_GATEWAY_LISTEN,
    DEFAULT_HEARTBEAT_INTERVAL_S,
    DEFAULT_LISTEN,
    DEFAULT_NODE_TTL_S,
    ServerConfig,
)
from gpufleet.server import join_token_cli
from gpufleet.server.errors import StartupError
from gpufleet.server.cli_parser import OneLineErrorParser, configure_logging

STATE_DIR_ENV = "GPUFLEET_STATE_DIR"
PROG = "gpufleet server"
LISTENING_LINE = "gpufleet control plane listening on {address}"
JOIN_TOKEN_COMMAND = "join-token"
_EPILOG = """\
Examples:
  gpufleet server                                   # state in ~/.gpufleet, 127.0.0.1:50051
  gpufleet server --state-dir /var/lib/gpufleet/server --listen 0.0.0.0:50051 \\
      --gateway-listen 0.0.0.0:8001
  gpufleet server join-token create --ttl 24h       # a join token for a new GPU node
  gpufleet server join-token list

`gpufleet server join-token --help` tells more about join tokens."""
__all__ = [
    "GATEWAY_LISTENING_LINE",
    "LISTENING_LINE",
    "STATE_DIR_ENV",
    "add_gateway_flags",
    "build_parser",
    "check_embeddable",
    "config_from_args",
    "embedded_gateway_config",
    "gateway_listen",
    "loopback_target",
    "main",
    "start_embedded_gateway",
]


def build_parser() -> OneLineErrorParser:
    """The flags of `gpufleet server`."""
    parser = OneLineErrorParser(
        prog=PROG,
        description="Run the gpufleet control plane.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help=f"directory for the database and admin token (default: ${STATE_DIR_ENV}, "
        "else ~/.gpufleet)",
    )
    parser.add_argument(
        "--listen",
        default=DEFAULT_LISTEN,
        help=f"gRPC listen address HOST:PORT; port 0 picks a free one (default: {DEFAULT_LISTEN})",
    )
    parser.add_argument("--tls-cert", type=Path, help="PEM server certificate; turns on TLS")
    parser.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    parser.add_argument(
        "--tls-client-ca",
        type=Path,
        help="PEM CA bundle; clients must present a certificate it signed (mutual TLS)",
    )
    parser.add_argument(
        "--node-ttl",
        type=_positive_seconds,
        default=DEFAULT_NODE_TTL_S,
        metavar="SECONDS",
        help="a node silent this long is lost and its instances are replaced; also the grace "
        f"period nodes get after a restart (default: {DEFAULT_NODE_TTL_S:g})",
    )
    parser.add_argument(
        "--heartbeat-interval",
        type=_whole_seconds,
        default=DEFAULT_HEARTBEAT_INTERVAL_S,
        metavar="SECONDS",
        help="seconds between agent heartbeats, told to agents when they register "
        f"(default: {DEFAULT_HEARTBEAT_INTERVAL_S})",
    )
    add_gateway_flags(parser)
    parser.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        default=None,
        help="serve Prometheus metrics of the control plane and its embedded gateway over "
        "plain HTTP at http://HOST:PORT/metrics; a bare PORT binds 127.0.0.1 (default: no "
        "metrics endpoint)",
    )
    return parser


def add_gateway_flags(parser: argparse.ArgumentParser) -> None:
    """--gateway-listen and --no-gateway, shared with `gpufleet up`."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--gateway-listen",
        metavar="HOST:PORT",
        default=None,
        help="data plane address of the embedded gateway; port 0 picks a free one (default: "
        f"{DEFAULT_GATEWAY_LISTEN}, or port 0 on that host when --listen has port 0)",
    )
    group.add_argument(
        "--no-gateway",
        action="store_true",
        help="do not embed a gateway; run `gpufleet gateway` separately instead",
    )


def gateway_listen(flag: str | None, disabled: bool, server_listen: str) -> str | None:
    """Where the embedded gateway listens; None when it is turned off.

    Without --gateway-listen, a control plane on port 0 gets its gateway on port 0 too: a
    fixed gateway port next to a picked control plane port would make a second server (a
    test, a second state dir) fail on the gateway's port.
    """
    if disabled:
        return None
    if flag is not None:
        split_listen(flag)
        return flag
    _, port = split_listen(server_listen)
    if port == 0:
        host, _ = split_listen(DEFAULT_GATEWAY_LISTEN)
        return f"{host}:0"
    return DEFAULT_GATEWAY_LISTEN


def loopback_target(address: str) -> str:
    """Where a local client dials a server listening on `address` ("0.0.0.0:7" -> "127.0.0.1:7")."""
    host, port = split_listen(address)
    if host in ("0.0.0.0", ""):
        return f"127.0.0.1:{port}"
    if host in ("[::]", "::"):
        return f"[::1]:{port}"
    return address


def check_embeddable(config: ServerConfig) -> None:
    """StartupError when a gateway cannot be embedded next to this control plane."""
    if config.tls_client_ca is not None:
        raise StartupError(
            "--tls-client-ca: the embedded gateway has no client certificate to present to "
            "the control plane; add --no-gateway and run `gpufleet gateway --server-tls-cert "
            "... --server-tls-key ...` beside the server"
        )


def embedded_gateway_config(plane: ControlPlane, config: ServerConfig, listen: str) -> GatewayConfig:
    """The embedded gateway's settings: the control plane over loopback with the admin token.

    With TLS on the control plane, the data plane port serves the same certificate and the
    gateway trusts that certificate file to reach the control plane (so it must name the
    address dialled: 127.0.0.1 for a wildcard --listen). Mutual TLS is refused: the
    embedded gateway has no client certificate of its own.
    """
    check_embeddable(config)
    tls = config.tls_cert is not None
    try:
        return GatewayConfig(
            server_address=loopback_target(plane.address),
            admin_token=plane.admin_token,
            listen=listen,
            gateway_id=f"{default_gateway_id()}-embedded",
            tls_cert=config.tls_cert,
            tls_key=config.tls_key,
            server_tls=tls,
            server_tls_ca=config.tls_cert,
        )
    except ValueError as err:
        raise StartupError(f"embedded gateway: {err}") from None


async def start_embedded_gateway(
    plane: ControlPlane, config: ServerConfig, listen: str
) -> Gateway:
    """Start the embedded gateway (StartupError for a busy or malformed address)."""
    return await start_gateway(embedded_gateway_config(plane, config, listen))


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds; got {text}")
    return value


def _whole_seconds(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(
            f"must be a whole number of seconds, 1 or more; got {text!r}"
        )
    return int(text)


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """Resolve flags and environment into a ServerConfig."""
    state_dir: Path | None = args.state_dir
    if state_dir is None:
        env = os.environ.get(STATE_DIR_ENV, "")
        state_dir = Path(env) if env else Path.home() / ".gpufleet"
    return ServerConfig(
        state_dir=state_dir.expanduser().absolute(),
        listen=args.listen,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        node_ttl=args.node_ttl,
        heartbeat_interval=args.heartbeat_interval,
    )


def main(argv: list[str] | None = None) -> int:
    """Run the server; 0 after a graceful stop, 2 for bad flags or startup errors.
    `gpufleet server join-token ...` manages join tokens instead (join_token_cli.py)."""
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == [JOIN_TOKEN_COMMAND]:
        return join_token_cli.main(argv[1:])
    args = build_parser().parse_or_exit_code(argv)
    if isinstance(args, int):
        return args
    configure_logging()
    try:
        config = config_from_args(args)
        gateway = gateway_listen(args.gateway_listen, args.no_gateway, config.listen)
        if gateway is not None:
            check_embeddable(config)  # before anything starts
        if args.metrics_listen is not None:
            parse_metrics_listen(args.metrics_listen)
        return asyncio.run(_run(config, gateway, args.metrics_listen))
    except StartupError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr, flush=True)
        return 2


async def _run(
    config: ServerConfig, gateway_address: str | None, metrics_listen: str | None
) -> int:
    plane = await start_control_plane(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)
    for signum in signals:
        loop.add_signal_handler(signum, stop.set)
    gateway: Gateway | None = None
    metrics: MetricsServer | None = None
    try:
        if gateway_address is not None:
            gateway = await start_embedded_gateway(plane, config, gateway_address)
        if metrics_listen is not None:
            metrics = start_control_plane_metrics(plane, metrics_listen, gateway=gateway)
        print(LISTENING_LINE.format(address=plane.address), flush=True)
        if gateway is not None:
            print(GATEWAY_LISTENING_LINE.format(address=gateway.address), flush=True)
        if metrics is not None:
            print(f"gpufleet control plane metrics on {metrics.url}", flush=True)
        await stop.wait()
        logging.getLogger(__name__).info("stopping on signal")
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)
        try:
            if metrics is not None:
                await metrics.stop()
            if gateway is not None:
                await gateway.stop()
        finally:
            await plane.stop()
    return 0
