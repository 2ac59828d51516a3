"""`gpufleet agent`: run the node agent, or `gpufleet agent install-systemd` to install it as
a systemd service (both need the `agent` extra on GPU nodes)."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable

from gpufleet.client.cli.errors import EXIT_USAGE
from gpufleet.client.cli.options import Subparsers


def add_parser(subparsers: Subparsers) -> argparse.ArgumentParser:
    """Every argument after `agent` goes to the agent's own parser, --help too."""
    parser = subparsers.add_parser(
        "agent",
        add_help=False,
        help="run the node agent, or install it as a systemd service (see `gpufleet agent "
        "--help` and `gpufleet agent install-systemd --help`)",
        description="Run the node agent, or install it as a systemd service.",
    )
    parser.set_defaults(forward_unknown_args=True)
    return parser


def run(args: argparse.Namespace) -> int:
    forwarded: list[str] = list(args.unknown_args)
    try:
        # Imported here so that the client works without the agent installed.
        module = importlib.import_module("gpufleet.agent.main")
    except ImportError as error:
        print(
            f"error: cannot start the agent: {error.name or 'a module'} is not installed. "
            "Install it with: pip install 'gpufleet[agent]'",
            file=sys.stderr,
        )
        return EXIT_USAGE
    agent_main: Callable[[list[str] | None], int] = module.main
    return agent_main(forwarded)
