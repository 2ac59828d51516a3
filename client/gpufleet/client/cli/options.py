"""Options shared by every subcommand that talks to the control plane."""

from __future__ import annotations

import argparse
import textwrap
from typing import TYPE_CHECKING, Literal, TypeAlias, cast

from gpufleet.client.cli.errors import CliError
from gpufleet.client.resolve import DEFAULT_SERVER, SERVER_ENV, STATE_DIR_ENV, TOKEN_ENV

if TYPE_CHECKING:
    Subparsers: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]
else:
    Subparsers: TypeAlias = argparse._SubParsersAction

# Descriptions are wrapped here because the raw formatter (needed to keep the examples'
# line breaks) would print them as one long line.
_HELP_WIDTH = 80

OutputFormat = Literal["table", "json", "yaml"]
OUTPUT_FORMATS: tuple[OutputFormat, ...] = ("table", "json", "yaml")


def add_client_options(parser: argparse.ArgumentParser, *, suppress_defaults: bool) -> None:
    """Add --server, --token, TLS and -o options.

    The top-level parser holds the real defaults; subcommands get the same options with
    suppressed defaults so that a value given before the subcommand is not reset by it.
    """

    def default(value: object) -> object:
        return argparse.SUPPRESS if suppress_defaults else value

    group = parser.add_argument_group("connection and output")
    group.add_argument(
        "--server",
        metavar="HOST:PORT",
        default=default(None),
        help=f"control plane address (default: ${SERVER_ENV} or {DEFAULT_SERVER})",
    )
    group.add_argument(
        "--token",
        default=default(None),
        help=f"admin token (default: ${TOKEN_ENV}, else the admin-token file in "
        f"${STATE_DIR_ENV} or ~/.gpufleet)",
    )
    group.add_argument(
        "--tls",
        action="store_true",
        default=default(False),
        help="connect with TLS using the system's root certificates",
    )
    group.add_argument(
        "--tls-ca",
        metavar="FILE",
        default=default(None),
        help="PEM CA certificate of the server (implies TLS)",
    )
    group.add_argument(
        "--tls-cert",
        metavar="FILE",
        default=default(None),
        help="PEM client certificate for mutual TLS",
    )
    group.add_argument(
        "--tls-key", metavar="FILE", default=default(None), help="PEM key of --tls-cert"
    )
    group.add_argument(
        "-o",
        "--output",
        choices=OUTPUT_FORMATS,
        default=default("table"),
        help="output format (default: table)",
    )


def client_options_parent() -> argparse.ArgumentParser:
    """A parent parser carrying the client options, for subcommand parsers."""
    parent = argparse.ArgumentParser(add_help=False)
    add_client_options(parent, suppress_defaults=True)
    return parent


def output_format(args: argparse.Namespace) -> OutputFormat:
    """The -o value."""
    return cast(OutputFormat, args.output)


EXAMPLES_HEADING = "Examples:"
"""Heads the examples block that ends every command's --help."""

DEFAULT_WAIT_TIMEOUT_S = 300.0


def add_command(
    subparsers: Subparsers, name: str, *, help: str, description: str, example: str
) -> argparse.ArgumentParser:
    """A subcommand parser with the client options and examples in its epilog."""
    return subparsers.add_parser(
        name,
        help=help,
        description=textwrap.fill(description, width=_HELP_WIDTH),
        epilog=f"{EXAMPLES_HEADING}\n{example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[client_options_parent()],
    )


def add_wait_options(parser: argparse.ArgumentParser, until: str) -> None:
    """--wait and --timeout for a command that changes deployments."""
    parser.add_argument(
        "--wait",
        action="store_true",
        help=f"show progress until {until}; exit 1 with the status message if --timeout "
        "passes first",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_WAIT_TIMEOUT_S,
        metavar="SECONDS",
        help=f"longest wait with --wait (default: {DEFAULT_WAIT_TIMEOUT_S:g})",
    )


def check_wait_options(args: argparse.Namespace) -> None:
    """CliError for a --timeout that cannot be waited for."""
    if not 0 < args.timeout < float("inf"):
        raise CliError(f"--timeout must be a number of seconds above 0, got {args.timeout:g}")
