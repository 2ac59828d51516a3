"""`gpufleet delete NAME`: delete a deployment after its instances drain."""

from __future__ import annotations

import argparse

import grpc

from gpufleet.client.cli.context import connect
from gpufleet.client.cli.errors import EXIT_OK, EXIT_SERVER_ERROR
from gpufleet.client.cli.options import Subparsers, add_command
from gpufleet.client.errors import RPCError


def add_parser(subparsers: Subparsers) -> argparse.ArgumentParser:
    parser = add_command(
        subparsers,
        "delete",
        help="delete a deployment",
        description="Delete a deployment. Its instances drain first; with --wait the command "
        "returns once the deployment is gone.",
        example="  gpufleet delete echo --wait --timeout 120",
    )
    parser.add_argument("name", help="deployment name")
    parser.add_argument(
        "--wait", action="store_true", help="wait until the instances drained and it is gone"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="longest wait with --wait (default: 300)",
    )
    return parser


def run(args: argparse.Namespace) -> int:
    with connect(args) as client:
        response = client.delete_deployment(args.name)
        if response.removed:
            print(f"deployment/{args.name} deleted")
            return EXIT_OK
        if not args.wait:
            print(f"deployment/{args.name} deleting (instances drain first)")
            return EXIT_OK
        print(f"deployment/{args.name} deleting, waiting for its instances to drain...")
        try:
            client.wait_deleted(
                args.name, since_revision=response.deployment.revision, timeout=args.timeout
            )
        except RPCError as error:
            if error.code != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise
            print(
                f"error: deployment/{args.name} is still draining after {args.timeout:g}s; "
                f"check it with `gpufleet get {args.name}`"
            )
            return EXIT_SERVER_ERROR
    print(f"deployment/{args.name} deleted")
    return EXIT_OK
