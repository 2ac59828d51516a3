"""`gpufleet gateway`: run a data plane gateway until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Mapping
from pathlib import Path

from gpufleet.gateway.app import start_gateway
from gpufleet.gateway.metrics import start_gateway_metrics
from gpufleet.gateway.settings import DEFAULT_LISTEN, GatewayConfig, default_gateway_id
from gpufleet.server.errors import StartupError
from gpufleet.server.metrics_http import MetricsServer, parse_metrics_listen
from gpufleet.server.cli_parser import OneLineErrorParser, configure_logging

PROG = "gpufleet gateway"
LISTENING_LINE = "gpufleet gateway listening on {address}"
METRICS_LINE = "gpufleet gateway metrics on {url}"
DEFAULT_SERVER = "127.0.0.1:50051"
SERVER_ENV = "GPUFLEET_SERVER"
TOKEN_ENV = "GPUFLEET_TOKEN"
STATE_DIR_ENV = "GPUFLEET_STATE_DIR"
TOKEN_FILE = "admin-token"
_EPILOG = f"""\
Examples:
  gpufleet gateway --server 10.0.0.5:50051 --token-file /var/lib/gpufleet/server/admin-token
  gpufleet gateway --server 10.0.0.5:50051 --listen 0.0.0.0:8001 --tls-cert gw.pem --tls-key gw.key
  {SERVER_ENV}=10.0.0.5:50051 {TOKEN_ENV}="$TOKEN" gpufleet gateway"""


def build_parser() -> OneLineErrorParser:
    """The flags of `gpufleet gateway`."""
    parser = OneLineErrorParser(
        prog=PROG,
        description="Run a gpufleet gateway: the data plane that serves inference calls "
        "and proxies gRPC calls to deployments.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--server",
        metavar="HOST:PORT",
        default=None,
        help=f"control plane address (default: ${SERVER_ENV}, else {DEFAULT_SERVER})",
    )
    token = parser.add_mutually_exclusive_group()
    token.add_argument("--token", default=None, help=f"admin token (default: ${TOKEN_ENV})")
    token.add_argument(
        "--token-file",
        type=Path,
        default=None,
        help=f"file holding the admin token (default: ${STATE_DIR_ENV}/{TOKEN_FILE}, else "
        f"~/.gpufleet/{TOKEN_FILE})",
    )
    parser.add_argument(
        "--listen",
        default=DEFAULT_LISTEN,
        help=f"data plane listen address HOST:PORT; port 0 picks a free one "
        f"(default: {DEFAULT_LISTEN})",
    )
    parser.add_argument(
        "--gateway-id", default=None, help="name in load reports (default: HOSTNAME-PID)"
    )
    parser.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        default=None,
        help="serve Prometheus metrics over plain HTTP at http://HOST:PORT/metrics; a bare "
        "PORT binds 127.0.0.1 (default: no metrics endpoint)",
    )
    parser.add_argument(
        "--data-plane",
        choices=("h2", "grpc"),
        default="h2",
        help="who serves the data plane port: h2 = the gateway's own HTTP/2 layer, which "
        "forwards inference calls' frames (fastest); grpc = the grpc.aio server, as before "
        "the h2 layer existed (default: h2)",
    )
    parser.add_argument("--tls-cert", type=Path, help="PEM certificate for the data plane port")
    parser.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    parser.add_argument(
        "--tls-client-ca",
        type=Path,
        help="PEM CA bundle; data plane clients must present a certificate it signed",
    )
    parser.add_argument(
        "--server-tls", action="store_true", help="reach the control plane over TLS"
    )
    parser.add_argument(
        "--server-tls-ca", type=Path, help="PEM CA of the control plane (implies TLS)"
    )
    parser.add_argument(
        "--server-tls-cert", type=Path, help="PEM client certificate for the control plane"
    )
    parser.add_argument("--server-tls-key", type=Path, help="PEM key of --server-tls-cert")
    return parser


def resolve_token(
    token: str | None, token_file: Path | None, env: Mapping[str, str], home: Path
) -> str:
    """--token, else --token-file, else $GPUFLEET_TOKEN, else the state dir's token file.

    Raises StartupError saying where it looked.
    """
    if token:
        return token.strip()
    if token_file is None:
        from_env = env.get(TOKEN_ENV, "").strip()
        if from_env:
            return from_env
        state_dir = Path(env[STATE_DIR_ENV]) if env.get(STATE_DIR_ENV) else home / ".gpufleet"
        token_file = state_dir.expanduser() / TOKEN_FILE
    try:
        text = token_file.read_text(encoding="utf-8").strip()
    except OSError as err:
        raise StartupError(
            f"no admin token: cannot read {token_file} ({err.strerror or err}); pass --token, "
            f"--token-file, or set ${TOKEN_ENV}"
        ) from None
    if not text:
        raise StartupError(f"the admin token file {token_file} is empty")
    return text


def config_from_args(
    args: argparse.Namespace, env: Mapping[str, str], home: Path
) -> GatewayConfig:
    """Resolve flags and environment into a GatewayConfig."""
    try:
        return GatewayConfig(
            server_address=args.server or env.get(SERVER_ENV) or DEFAULT_SERVER,
            admin_token=resolve_token(args.token, args.token_file, env, home),
            listen=args.listen,
            gateway_id=args.gateway_id or default_gateway_id(),
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            tls_client_ca=args.tls_client_ca,
            server_tls=args.server_tls,
            server_tls_ca=args.server_tls_ca,
            server_tls_cert=args.server_tls_cert,
            server_tls_key=args.server_tls_key,
            http2_front=args.data_plane == "h2",
        )
    except ValueError as err:
        raise StartupError(str(err)) from None


def main(argv: list[str] | None = None) -> int:
    """Run the gateway; 0 after a graceful stop, 2 for bad flags or startup errors."""
    args = build_parser().parse_or_exit_code(argv)
    if isinstance(args, int):
        return args
    configure_logging()
    try:
        config = config_from_args(args, os.environ, Path.home())
        if args.metrics_listen is not None:
            parse_metrics_listen(args.metrics_listen)  # a typo fails before anything starts
        return asyncio.run(_run(config, args.metrics_listen))
    except StartupError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr, flush=True)
        return 2


async def _run(config: GatewayConfig, metrics_listen: str | None) -> int:
    gateway = await start_gateway(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)
    for signum in signals:
        loop.add_signal_handler(signum, stop.set)
    metrics: MetricsServer | None = None
    try:
        if metrics_listen is not None:
            metrics = start_gateway_metrics(gateway, metrics_listen)
        print(LISTENING_LINE.format(address=gateway.address), flush=True)
        if metrics is not None:
            print(METRICS_LINE.format(url=metrics.url), flush=True)
        await stop.wait()
        logging.getLogger(__name__).info("stopping on signal")
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)
        try:
            if metrics is not None:
                await metrics.stop()
        finally:
            await gateway.stop()
    return 0
