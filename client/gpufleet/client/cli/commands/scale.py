"""`gpufleet scale NAME`: change a deployment's instance bounds."""

from __future__ import annotations

import argparse
import sys

from gpufleet.client.cli.context import connect
from gpufleet.client.cli.errors import EXIT_OK, CliError
from gpufleet.client.cli.options import (
    Subparsers,
    add_command,
    add_wait_options,
    check_wait_options,
    output_format,
)
from gpufleet.client.cli.progress import Target
from gpufleet.client.cli.progress_display import wait_until_ready
from gpufleet.client.output import dumps, message_dict


def add_parser(subparsers: Subparsers) -> argparse.ArgumentParser:
    parser = add_command(
        subparsers,
        "scale",
        help="change min/max instances of a deployment",
        description="Change only the instance bounds of a deployment; a bound not given keeps "
        "its value. --min 0 lets it scale to zero when idle. With --wait, follow it until it "
        "is ready (exit 0) or --timeout passes (exit 1, with the status message).",
        example="  gpufleet scale echo --min 1 --max 8\n"
        "  gpufleet scale echo --min 2 --wait --timeout 120   # show progress until ready\n"
        "  gpufleet scale echo --min 0                        # scale to zero when idle",
    )
    parser.add_argument("name", help="deployment name")
    parser.add_argument("--min", type=int, dest="min_instances", metavar="N", help="min instances")
    parser.add_argument("--max", type=int, dest="max_instances", metavar="N", help="max instances")
    add_wait_options(parser, "the deployment is ready")
    return parser


def run(args: argparse.Namespace) -> int:
    if args.min_instances is None and args.max_instances is None:
        raise CliError("scale needs --min N, --max N or both")
    for flag, value in (("--min", args.min_instances), ("--max", args.max_instances)):
        if value is not None and value < 0:
            raise CliError(f"{flag} must be 0 or more, got {value}")
    check_wait_options(args)
    fmt = output_format(args)
    with connect(args) as client:
        deployment = client.scale_deployment(
            args.name, min_instances=args.min_instances, max_instances=args.max_instances
        )
        if fmt == "table":
            scaling = deployment.spec.scaling
            print(
                f"deployment/{deployment.name} scaled: min {scaling.min_instances}, "
                f"max {scaling.max_instances}",
                flush=True,
            )
        else:
            sys.stdout.write(dumps(message_dict(deployment), fmt))
            sys.stdout.flush()
        if not args.wait:
            return EXIT_OK
        # JSON or YAML on stdout stays parseable: the progress goes to stderr then.
        stream = sys.stdout if fmt == "table" else sys.stderr
        target = Target(deployment.name, deployment.generation)
        return wait_until_ready(client, [target], args.timeout, stream)
