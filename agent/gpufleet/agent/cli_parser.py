"""The argument parser of the agent's commands.

A near-copy of gpufleet.server.cli_parser, kept on purpose: the server side imports the
agent (`gpufleet up` embeds one), never the reverse, and the fixed top-level layout has no
shared source root that both could import instead."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import NoReturn

EXIT_USAGE = 2
"""Exit status for bad flags, as argparse uses."""


class OneLineErrorParser(argparse.ArgumentParser):
    """Reports a bad flag in one line, without the usage dump: the message already names
    the flag, and `--help` is one step away."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")

    def parse_or_exit_code(self, argv: Sequence[str] | None) -> argparse.Namespace | int:
        """The parsed flags, or the exit status argparse chose (--help: 0, bad flags: 2)
        instead of raising SystemExit, so that `main` functions can return it."""
        try:
            return self.parse_args(argv)
        except SystemExit as exit_:
            return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE


def configure_logging(level: int = logging.INFO) -> None:
    """Log lines with time, level and logger to stderr (stdout carries the
    `... listening on HOST:PORT` lines that scripts and tests read)."""
    logging.basicConfig(
        stream=sys.stderr,
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
