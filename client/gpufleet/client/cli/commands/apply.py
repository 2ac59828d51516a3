"""`gpufleet apply -f FILE`: create or update deployments from spec files."""

from __future__ import annotations

import argparse
import sys

from gpufleet.client.cli.context import connect, server_address
from gpufleet.client.cli.errors import EXIT_OK, EXIT_UNREACHABLE, describe_rpc_error
from gpufleet.client.cli.options import (
    Subparsers,
    add_command,
    add_wait_options,
    check_wait_options,
    output_format,
)
from gpufleet.client.cli.progress import Target
from gpufleet.client.cli.progress_display import wait_until_ready
from gpufleet.client.errors import RPCError
from gpufleet.client.operations import ApplyAction, ApplyResult
from gpufleet.client.output import dumps, message_dict
from gpufleet.client.spec_file import load_spec_file
from gpufleet.v1 import deployment_pb2

_EXAMPLE = """\
  cat > echo.yaml <<'SPEC'
  name: echo
  labels: {team: vision}
  spec:
    command: python -m examples.model_server --port $PORT
    gpu: {memory_mib: 2048, core_percent: 25}
    scaling: {min_instances: 0, max_instances: 4, idle_retention: 300s}
    traffic: {max_request_concurrency: 2, queue_timeout: 30s}
  SPEC
  gpufleet apply -f echo.yaml
  gpufleet apply -f echo.yaml --wait --timeout 120   # show progress until ready
  gpufleet get echo -o yaml | gpufleet apply -f -"""


def add_parser(subparsers: Subparsers) -> argparse.ArgumentParser:
    parser = add_command(
        subparsers,
        "apply",
        help="create or update deployments from a YAML or JSON spec file",
        description="Create each deployment in the files, or update it if it exists. A file "
        "holds one document or several separated by ---; durations are written as 30s, 500ms, "
        "5m or a number of seconds. With --wait, follow the rollout until every deployment is "
        "ready (exit 0) or --timeout passes (exit 1, with the status message).",
        example=_EXAMPLE,
    )
    parser.add_argument(
        "-f",
        "--filename",
        action="append",
        required=True,
        metavar="FILE",
        help="spec file, or - for stdin; may be repeated",
    )
    add_wait_options(parser, "every applied deployment is ready")
    return parser


def run(args: argparse.Namespace) -> int:
    # Every file is parsed before anything is sent, so a typo in the last document does not
    # leave the first ones applied.
    deployments = [d for path in args.filename for d in load_spec_file(path)]
    check_wait_options(args)
    target = server_address(args)
    fmt = output_format(args)
    results: list[dict[str, object]] = []
    applied: list[Target] = []
    exit_code = EXIT_OK
    with connect(args) as client:
        for deployment in deployments:
            try:
                result = client.apply(deployment)
            except RPCError as error:
                code, message = describe_rpc_error(error, target)
                if code == EXIT_UNREACHABLE:
                    raise
                print(f"deployment/{deployment.name} not applied:", file=sys.stderr)
                print(message, file=sys.stderr)
                exit_code = max(exit_code, code)
                continue
            applied.append(Target(deployment.name, result.deployment.generation))
            if fmt == "table":
                _print_result(deployment, result)
            else:
                results.append(_result_dict(deployment, result))
        if fmt != "table":
            sys.stdout.write(dumps(results, fmt))
            sys.stdout.flush()
        if args.wait and applied:
            # JSON or YAML on stdout stays parseable: the progress goes to stderr then.
            stream = sys.stdout if fmt == "table" else sys.stderr
            exit_code = max(exit_code, wait_until_ready(client, applied, args.timeout, stream))
    return exit_code


def _print_result(deployment: deployment_pb2.Deployment, result: ApplyResult) -> None:
    print(f"deployment/{deployment.name} {result.action.value}")
    if result.action == ApplyAction.CREATED and result.invoke_token:
        print(
            f"  invoke token: {result.invoke_token}\n"
            "  (shown only this once: store it now; "
            f"`gpufleet rotate-token {deployment.name}` issues a new one)"
        )


def _result_dict(deployment: deployment_pb2.Deployment, result: ApplyResult) -> dict[str, object]:
    data: dict[str, object] = {"name": deployment.name, "action": result.action.value}
    if result.invoke_token:
        data["invoke_token"] = result.invoke_token
    data["deployment"] = message_dict(result.deployment)
    return data
