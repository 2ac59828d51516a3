"""`gpufleet rotate-token NAME`: replace a deployment's invoke token."""

from __future__ import annotations

import argparse
import sys

from gpufleet.client.cli.context import connect
from gpufleet.client.cli.errors import EXIT_OK
from gpufleet.client.cli.options import Subparsers, add_command, output_format
from gpufleet.client.output import dumps


def add_parser(subparsers: Subparsers) -> argparse.ArgumentParser:
    parser = add_command(
        subparsers,
        "rotate-token",
        help="issue a new invoke token for a deployment",
        description="Replace a deployment's invoke token. The old token stops working at once; "
        "the new one is printed only this time.",
        example="  TOKEN=$(gpufleet rotate-token echo)",
    )
    parser.add_argument("name", help="deployment name")
    return parser


def run(args: argparse.Namespace) -> int:
    with connect(args) as client:
        token = client.rotate_invoke_token(args.name)
    fmt = output_format(args)
    if fmt == "table":
        # The token alone on stdout keeps `$(gpufleet rotate-token NAME)` usable.
        print(token)
        print(
            f"new invoke token for deployment/{args.name}; shown only this once",
            file=sys.stderr,
        )
    else:
        sys.stdout.write(dumps({"name": args.name, "invoke_token": token}, fmt))
    return EXIT_OK
