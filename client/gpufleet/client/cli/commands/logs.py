"""`gpufleet logs INSTANCE`: print an instance's output from the log files on this node.

It reads the agent's rotating log files directly, so it must run on the node that runs (or
ran) the instance, as a user that can read the agent's state dir. `gpufleet instances` shows
which node that is.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import sys
import textwrap
from pathlib import Path
from typing import Any

from gpufleet.client.cli.errors import EXIT_OK, EXIT_USAGE, CliError
from gpufleet.client.cli.options import Subparsers

DEFAULT_TAIL = 100

_EXAMPLE = """\
Examples:
  gpufleet logs echo-7f3a9c --tail 50
  gpufleet logs echo-7f3a9c -f --agent-state-dir /var/lib/gpufleet/agent"""


def add_parser(subparsers: Subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "logs",
        help="print an instance's output (run it on the instance's node)",
        description=textwrap.fill(
            "Print the last lines of an instance's stdout and stderr, read from the agent's log "
            "files on this machine: run it on the node the instance runs on (`gpufleet "
            "instances` shows the node). With -f, keep printing new lines across log rotations "
            "until interrupted.",
            width=80,
        ),
        epilog=_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("instance", help="instance id, as `gpufleet instances` shows it")
    parser.add_argument(
        "-n", "--tail", type=int, default=DEFAULT_TAIL, metavar="N", help=f"lines to print first (default: {DEFAULT_TAIL})"
    )
    parser.add_argument("-f", "--follow", action="store_true", help="keep printing new lines until interrupted")
    parser.add_argument(
        "--agent-state-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="the agent's --state-dir (default: $GPUFLEET_AGENT_STATE_DIR, else "
        "$GPUFLEET_STATE_DIR/agent, else ~/.gpufleet/agent)",
    )
    return parser


def _import(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise CliError(
            f"cannot read instance logs: {error.name or module} is not installed; install the "
            "agent with: pip install 'gpufleet[agent]'"
        ) from None


def run(args: argparse.Namespace) -> int:
    if args.tail < 0:
        raise CliError(f"--tail must be 0 or more, got {args.tail}")
    config = _import("gpufleet.agent.config")
    logs = _import("gpufleet.agent.runtime.logs")
    paths = _import("gpufleet.agent.runtime.paths")
    state_dir: Path = args.agent_state_dir or config.default_state_dir(os.environ, Path.home())
    try:
        paths.check_instance_id(args.instance)
    except ValueError as error:
        raise CliError(str(error)) from None
    try:
        if args.follow:
            asyncio.run(_follow(logs, state_dir, args.instance, args.tail))
        else:
            sys.stdout.write(logs.read_log_tail(state_dir, args.instance, args.tail))
    except FileNotFoundError as error:
        print(
            f"error: {error}\nRun `gpufleet logs` on the node that runs the instance "
            "(`gpufleet instances` shows it), or pass --agent-state-dir.",
            file=sys.stderr,
        )
        return EXIT_USAGE
    return EXIT_OK


async def _follow(logs: Any, state_dir: Path, instance_id: str, tail: int) -> None:
    async for line in logs.follow_log(state_dir, instance_id, tail_lines=tail):
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
