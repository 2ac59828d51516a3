"""`gpufleet get NAME`: show one deployment."""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime

from gpufleet.client.cli.context import connect
from gpufleet.client.cli.errors import EXIT_OK
from gpufleet.client.cli.options import Subparsers, add_command, output_format
from gpufleet.client.output import (
    deployments_table,
    dumps,
    message_dict,
    render_table,
    status_message_line,
)


def add_parser(subparsers: Subparsers) -> argparse.ArgumentParser:
    parser = add_command(
        subparsers,
        "get",
        help="show one deployment",
        description="Show one deployment: a summary row (phase Standby, Starting, Running, "
        "Draining or Failed; ready/desired instances; calls queued and in flight) with the "
        "status message on its own line, or everything with -o json|yaml.",
        example="  gpufleet get echo\n  gpufleet get echo -o yaml > echo.yaml",
    )
    parser.add_argument("name", help="deployment name")
    return parser


def run(args: argparse.Namespace) -> int:
    with connect(args) as client:
        deployment = client.get_deployment(args.name)
    fmt = output_format(args)
    if fmt == "table":
        render_table(deployments_table([deployment], datetime.now(UTC)), sys.stdout)
        sys.stdout.write(status_message_line(deployment))
    else:
        sys.stdout.write(dumps(message_dict(deployment), fmt))
    return EXIT_OK
