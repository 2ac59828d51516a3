"""`gpufleet scale NAME`: change a deployment's instance bounds."""

from __future__ import annotations

import argparse
import sys

from gpufleet.client.cli.context import connect
from gpufleet.client.cli.errors import EXIT_OK, CliError
from gpufleet.client.cli.options import Subparsers, add_command, output_format
from gpufleet.client.output import dumps, message_dict


def add_parser(subparsers: Subparsers) -> argparse.ArgumentParser:
    parser = add_command(
        subparsers,
        "scale",
        help="change min/max instances of a deployment",
        description="Change only the instance bounds of a deployment; a bound not given keeps "
        "its value. --min 0 lets it scale to zero when idle.",
        example="  gpufleet scale echo --min 1 --max 8",
    )
    parser.add_argument("name", help="deployment name")
    parser.add_argument("--min", type=int, dest="min_instances", metavar="N", help="min instances")
    parser.add_argument("--max", type=int, dest="max_instances", metavar="N", help="max instances")
    return parser


def run(args: argparse.Namespace) -> int:
    if args.min_instances is None and args.max_instances is None:
        raise CliError("scale needs --min N, --max N or both")
    for flag, value in (("--min", args.min_instances), ("--max", args.max_instances)):
        if value is not None and value < 0:
            raise CliError(f"{flag} must be 0 or more, got {value}")
    with connect(args) as client:
        deployment = client.scale_deployment(
            args.name, min_instances=args.min_instances, max_instances=args.max_instances
        )
    fmt = output_format(args)
    if fmt == "table":
        scaling = deployment.spec.scaling
        print(
            f"deployment/{deployment.name} scaled: min {scaling.min_instances}, "
            f"max {scaling.max_instances}"
        )
    else:
        sys.stdout.write(dumps(message_dict(deployment), fmt))
    return EXIT_OK
