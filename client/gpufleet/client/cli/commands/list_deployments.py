"""`gpufleet list`: list deployments, optionally filtered by labels."""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime

from gpufleet.client.cli.context import connect
from gpufleet.client.cli.errors import EXIT_OK, CliError
from gpufleet.client.cli.options import Subparsers, add_command, output_format
from gpufleet.client.output import deployments_table, dumps, message_dict, render_table


def add_parser(subparsers: Subparsers) -> argparse.ArgumentParser:
    parser = add_command(
        subparsers,
        "list",
        help="list deployments",
        description="List deployments ordered by name, optionally only those carrying labels: "
        "phase (Standby, Starting, Running, Draining, Failed), ready/desired instances, and "
        "calls queued and in flight.",
        example="  gpufleet list\n  gpufleet list -l team=vision -l tier=prod -o json",
    )
    parser.add_argument(
        "-l",
        "--selector",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="only deployments with this label; repeat or separate with commas for several",
    )
    return parser


def parse_selector(values: list[str]) -> dict[str, str]:
    """Labels from -l values such as ``team=vision`` or ``team=vision,tier=prod``."""
    labels: dict[str, str] = {}
    for value in values:
        for item in value.split(","):
            key, sep, label = item.partition("=")
            if not sep or not key.strip():
                raise CliError(f"-l expects KEY=VALUE (e.g. -l team=vision), got {item!r}")
            labels[key.strip()] = label.strip()
    return labels


def run(args: argparse.Namespace) -> int:
    labels = parse_selector(args.selector)
    with connect(args) as client:
        deployments = client.list_deployments(labels)
    fmt = output_format(args)
    if fmt == "table":
        render_table(deployments_table(deployments, datetime.now(UTC)), sys.stdout)
    else:
        sys.stdout.write(dumps([message_dict(d) for d in deployments], fmt))
    return EXIT_OK
