"""`gpufleet watch`: stream deployment and instance changes."""

from __future__ import annotations

import argparse
import json
import sys

from gpufleet.client.cli.context import connect
from gpufleet.client.cli.errors import EXIT_SERVER_ERROR, CliError
from gpufleet.client.cli.options import Subparsers, add_command, output_format
from gpufleet.client.output import dumps, event_line, message_dict


def add_parser(subparsers: Subparsers) -> argparse.ArgumentParser:
    parser = add_command(
        subparsers,
        "watch",
        help="stream changes to deployments and instances",
        description="Print changes as they happen until interrupted. Without --since it first "
        "prints every deployment (SNAPSHOT), then SNAPSHOT_END. With -o json it prints one "
        "JSON object per line.",
        example="  gpufleet watch\n  gpufleet watch --since 42 -o json | jq .type",
    )
    parser.add_argument(
        "--since",
        type=int,
        default=0,
        metavar="REV",
        help="replay every change after revision REV, then follow (default: snapshot first)",
    )
    return parser


def run(args: argparse.Namespace) -> int:
    if args.since < 0:
        raise CliError(f"--since must be 0 or a revision, got {args.since}")
    fmt = output_format(args)
    last_revision = args.since
    with connect(args) as client:
        for event in client.watch_events(args.since):
            last_revision = max(last_revision, event.revision)
            if fmt == "table":
                line = event_line(event) + "\n"
            elif fmt == "json":
                line = json.dumps(message_dict(event)) + "\n"
            else:
                line = "---\n" + dumps(message_dict(event), fmt)
            sys.stdout.write(line)
            sys.stdout.flush()
    print(
        "error: the control plane ended the watch (is it restarting?); resume with "
        f"`gpufleet watch --since {last_revision}`",
        file=sys.stderr,
    )
    return EXIT_SERVER_ERROR
