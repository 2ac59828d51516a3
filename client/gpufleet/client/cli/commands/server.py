"""`gpufleet server`: run the control plane (needs the `server` extra)."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable

from gpufleet.client.cli.errors import EXIT_USAGE
from gpufleet.client.cli.options import Subparsers


def add_parser(subparsers: Subparsers) -> argparse.ArgumentParser:
    """Every argument after `server` goes to the control plane's own parser, --help too."""
    parser = subparsers.add_parser(
        "server",
        add_help=False,
        help="run the control plane, or create join tokens for nodes (see `gpufleet server "
        "--help`)",
        description="Run the control plane, or manage join tokens.",
    )
    parser.set_defaults(forward_unknown_args=True)
    return parser


def run(args: argparse.Namespace) -> int:
    forwarded: list[str] = list(args.unknown_args)
    try:
        # Imported here so that the client works without the server extra installed.
        module = importlib.import_module("gpufleet.server.main")
    except ImportError as error:
        missing = error.name or "a module"
        print(
            f"error: cannot start the control plane: {missing} is not installed. "
            "Install it with: pip install 'gpufleet[server]'",
            file=sys.stderr,
        )
        return EXIT_USAGE
    server_main: Callable[[list[str] | None], int] = module.main
    return server_main(forwarded)
