"""`gpufleet server`: run the control plane until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path
from typing import NoReturn

from gpufleet.server.app import start_control_plane
from gpufleet.server.config import (
    DEFAULT_HEARTBEAT_INTERVAL_S,
    DEFAULT_LISTEN,
    DEFAULT_NODE_TTL_S,
    ServerConfig,
)
from gpufleet.server.errors import StartupError

STATE_DIR_ENV = "GPUFLEET_STATE_DIR"
PROG = "gpufleet server"
LISTENING_LINE = "gpufleet control plane listening on {address}"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, no usage dump: the message already names the flag.
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The flags of `gpufleet server`."""
    parser = _Parser(prog=PROG, description="Run the gpufleet control plane.")
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
    return parser


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
    """Run the server; 0 after a graceful stop, 2 for bad flags or startup errors."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 2
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return asyncio.run(_run(config_from_args(args)))
    except StartupError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr, flush=True)
        return 2


async def _run(config: ServerConfig) -> int:
    plane = await start_control_plane(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)
    for signum in signals:
        loop.add_signal_handler(signum, stop.set)
    try:
        print(LISTENING_LINE.format(address=plane.address), flush=True)
        await stop.wait()
        logging.getLogger(__name__).info("stopping on signal")
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)
        await plane.stop()
    return 0
