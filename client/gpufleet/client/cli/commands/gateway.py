"""`gpufleet gateway`: run a data plane gateway (needs the `server` extra)."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable

from gpufleet.client.cli.errors import EXIT_USAGE
from gpufleet.client.cli.options import Subparsers


def add_parser(subparsers: Subparsers) -> argparse.ArgumentParser:
    """Every argument after `gateway` goes to the gateway's own parser, --help too."""
    parser = subparsers.add_parser(
        "gateway",
        add_help=False,
        help="run a data plane gateway (see `gpufleet gateway --help`)",
        description="Run a data plane gateway.",
    )
    parser.set_defaults(forward_unknown_args=True)
    return parser


def forwarded_args(args: argparse.Namespace) -> list[str]:
    """The gateway's arguments: global connection options given before `gateway` first
    (--server, --token, and the client TLS options, which reach the control plane), then
    everything after it, which wins where both name the same flag."""
    after: list[str] = list(args.unknown_args)
    given_after = {arg.partition("=")[0] for arg in after if arg.startswith("--")}
    forwarded: list[str] = []
    token = getattr(args, "token", None)
    # --token and --token-file exclude each other in the gateway's parser.
    if token and not given_after & {"--token", "--token-file"}:
        forwarded += ["--token", str(token)]
    for option, flag in (
        ("server", "--server"),
        ("tls_ca", "--server-tls-ca"),
        ("tls_cert", "--server-tls-cert"),
        ("tls_key", "--server-tls-key"),
    ):
        value = getattr(args, option, None)
        if value:
            forwarded += [flag, str(value)]
    if getattr(args, "tls", False):
        forwarded.append("--server-tls")
    return forwarded + after


def run(args: argparse.Namespace) -> int:
    try:
        # Imported here so that the client works without the server extra installed.
        module = importlib.import_module("gpufleet.gateway.main")
    except ImportError as error:
        missing = error.name or "a module"
        print(
            f"error: cannot start the gateway: {missing} is not installed. "
            "Install it with: pip install 'gpufleet[server]'",
            file=sys.stderr,
        )
        return EXIT_USAGE
    gateway_main: Callable[[list[str] | None], int] = module.main
    return gateway_main(forwarded_args(args))
