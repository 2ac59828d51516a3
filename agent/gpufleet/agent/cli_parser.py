"""The argument parser of the agent's commands. The agent ships without the server code, so
it keeps its own copy of the server side's one-line-error parser."""

from __future__ import annotations

import argparse
from typing import NoReturn

EXIT_USAGE = 2
"""Exit status for bad flags, as argparse uses."""


class OneLineErrorParser(argparse.ArgumentParser):
    """Reports a bad flag in one line, without the usage dump: the message already names
    the flag, and `--help` is one step away."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")
