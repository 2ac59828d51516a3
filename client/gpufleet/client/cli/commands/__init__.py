"""Registry of subcommands. Each module has ``add_parser(subparsers) -> ArgumentParser`` and
``run(args) -> int``; add a new command by writing such a module and listing it here."""

from __future__ import annotations

import argparse
from typing import Protocol

from gpufleet.client.cli.commands import (
    agent,
    apply,
    delete,
    gateway,
    get,
    instances,
    invoke,
    list_deployments,
    logs,
    nodes,
    rotate_token,
    scale,
    server,
    up,
    watch,
)
from gpufleet.client.cli.options import Subparsers


class Command(Protocol):
    """What main() needs from a subcommand module."""

    def add_parser(self, subparsers: Subparsers) -> argparse.ArgumentParser:
        """Add the subcommand's parser and return it."""
        ...

    def run(self, args: argparse.Namespace) -> int:
        """Run the subcommand and return the process exit code."""
        ...


COMMANDS: tuple[Command, ...] = (
    server,
    gateway,
    apply,
    get,
    list_deployments,
    delete,
    scale,
    watch,
    rotate_token,
    up,
    agent,
    nodes,
    instances,
    logs,
    invoke,
)
