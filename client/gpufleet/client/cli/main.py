"""Entry point of the `gpufleet` command: parses arguments, runs one subcommand and turns
expected failures into a message and an exit code (never a traceback)."""

from __future__ import annotations

import argparse
import os
import sys

from gpufleet.client.cli.commands import COMMANDS
from gpufleet.client.cli.context import server_address
from gpufleet.client.cli.errors import (
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    CliError,
    describe_rpc_error,
)
from gpufleet.client.cli.options import add_client_options
from gpufleet.client.errors import RPCError
from gpufleet.client.spec_file import SpecFileError

_EXAMPLES = """\
Examples:
  gpufleet server --state-dir ~/.gpufleet          # start a control plane
  gpufleet apply -f echo.yaml                      # create or update deployments
  gpufleet list -o json
  gpufleet scale echo --min 1 --max 4
  gpufleet delete echo --wait

exit codes: 0 ok, 1 the server refused the request, 2 bad usage or input, 3 cannot connect"""


def build_parser() -> argparse.ArgumentParser:
    """The full parser: global options plus every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="gpufleet",
        description="Serverless GPU inference: run the control plane and manage deployments.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_client_options(parser, suppress_defaults=False)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(subparsers).set_defaults(run_command=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI with ``argv`` (default: sys.argv[1:]) and return the exit code."""
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown and not getattr(args, "forward_unknown_args", False):
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    except SystemExit as exit_:
        # argparse exits for --help (0) and usage errors (2); return instead so that main()
        # can be called from tests and other code.
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    args.unknown_args = unknown
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        code: int = args.run_command(args)
        return code
    except (CliError, SpecFileError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except RPCError as error:
        code, message = describe_rpc_error(error, server_address(args))
        print(message, file=sys.stderr)
        return code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (e.g. `gpufleet watch | head`): nothing left to tell it.
        _silence_stdout()
        return 0


def _silence_stdout() -> None:
    # Python flushes stdout at exit and would report the broken pipe a second time.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


if __name__ == "__main__":
    raise SystemExit(main())
