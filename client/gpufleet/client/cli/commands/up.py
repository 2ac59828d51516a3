"""`gpufleet up`: control plane plus one local agent in one process (needs the `server` extra)."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable

from gpufleet.client.cli.errors import EXIT_USAGE
from gpufleet.client.cli.options import Subparsers


def add_parser(subparsers: Subparsers) -> argparse.ArgumentParser:
    """Every argument after `up` goes to its own parser, --help too."""
    parser = subparsers.add_parser(
        "up",
        add_help=False,
        help="run a control plane and a local agent together (see `gpufleet up --help`)",
        description="Run a control plane and a local agent together.",
    )
    parser.set_defaults(forward_unknown_args=True)
    return parser


def run(args: argparse.Namespace) -> int:
    forwarded: list[str] = list(args.unknown_args)
    try:
        # Imported here so that the client works without the server extra installed.
        module = importlib.import_module("gpufleet.server.up")
    except ImportError as error:
        print(
            f"error: cannot start gpufleet up: {error.name or 'a module'} is not installed. "
            "Install it with: pip install 'gpufleet[server,agent]'",
            file=sys.stderr,
        )
        return EXIT_USAGE
    up_main: Callable[[list[str] | None], int] = module.main
    return up_main(forwarded)
