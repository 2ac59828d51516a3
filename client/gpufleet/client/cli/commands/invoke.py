"""`gpufleet invoke DEPLOYMENT`: one Open Inference Protocol call through a gateway.

The call goes to the data plane, not the control plane: --gateway (default
$GPUFLEET_GATEWAY, else 127.0.0.1:8001) with the deployment's invoke token. Inputs are built
by gpufleet.client.tensors; stdout gets only the model's answer, stderr the instance that
served it (`deploy-route-target`) and any error, so the output pipes cleanly.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TextIO

import grpc

from gpufleet.client.cli.errors import (
    EXIT_OK,
    EXIT_SERVER_ERROR,
    EXIT_UNREACHABLE,
    CliError,
)
from gpufleet.client.cli.options import OUTPUT_FORMATS, Subparsers
from gpufleet.client.errors import RPCError
from gpufleet.client.output import dumps
from gpufleet.client.tensors import (
    BYTES,
    DATATYPES,
    Output,
    TensorError,
    build_request,
    build_tensor,
    decode_outputs,
    is_final,
    parse_datatypes,
    plain_data,
    split_assignment,
)
from gpufleet.inference import grpc_service_pb2 as pb
from gpufleet.inference import grpc_service_pb2_grpc as pb_grpc

DEFAULT_GATEWAY = "127.0.0.1:8001"
GATEWAY_ENV = "GPUFLEET_GATEWAY"
INVOKE_TOKEN_ENV = "GPUFLEET_INVOKE_TOKEN"
ROUTE_RULE_KEY = "deploy-route-rule"
ROUTE_TARGET_KEY = "deploy-route-target"
PUSHBACK_KEY = "grpc-retry-pushback-ms"

EXIT_RETRY_LATER = 4
"""The gateway turned the call away for load (QUEUE_FULL, RATE_LIMITED, QUEUE_TIMEOUT):
the same call may succeed later, after the pushback when one is given."""
RETRY_LATER_REASONS = frozenset({"QUEUE_FULL", "RATE_LIMITED", "QUEUE_TIMEOUT"})

CallMetadata = tuple[tuple[str, str | bytes], ...]

# Inference tensors can be large; the gateway accepts up to 256 MiB.
_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
_HELP_WIDTH = 80

_EXAMPLES = f"""\
Examples:
  # echo model: every INPUT<n> comes back as OUTPUT<n>
  gpufleet invoke echo --input INPUT0='[[1, 2], [3, 4]]' --invoke-token "$TOKEN"
  # tokens model: print the tokens as they are generated
  export {INVOKE_TOKEN_ENV}=...   {GATEWAY_ENV}=127.0.0.1:8001
  gpufleet invoke tokens --stream --input PROMPT='hello streaming world' --input MAX_TOKENS=6
  # force a datatype, pick the instance, read the answer as JSON
  gpufleet invoke echo --input INPUT0=7 --datatype INPUT0=INT32 --route-rule round-robin -o json

values: JSON when VALUE parses as JSON (numbers, true/false, "text", nested lists), else the
text itself. Inferred datatypes: integers INT64, other numbers FP32, true/false BOOL, text
BYTES; --datatype TYPE (every input) or NAME=TYPE (one input) overrides. Datatypes:
{", ".join(DATATYPES)}.

exit codes: 0 ok, 1 the gateway or the model refused or failed the call, 2 bad usage or
input, 3 cannot connect to the gateway, {EXIT_RETRY_LATER} turned away for load (QUEUE_FULL,
RATE_LIMITED, QUEUE_TIMEOUT): retry later"""


def add_parser(subparsers: Subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "invoke",
        help="call a deployment through a gateway (Open Inference Protocol)",
        description=textwrap.fill(
            "Send one inference call to DEPLOYMENT through a gpufleet gateway and print "
            "the outputs. With --stream the call is a ModelStreamInfer stream and each "
            "response is printed as it arrives (the tokens of a generating model). The "
            "instance that served the call is printed on stderr.",
            width=_HELP_WIDTH,
        ),
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("deployment", help="deployment (or service) name: the model name")
    parser.add_argument(
        "-i",
        "--input",
        dest="inputs",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an input tensor; repeat for several",
    )
    parser.add_argument(
        "--datatype",
        dest="datatypes",
        action="append",
        default=[],
        metavar="[NAME=]TYPE",
        help="datatype of input NAME, or of every input without its own",
    )
    parser.add_argument(
        "--stream",
        action="store_true",
        help="use ModelStreamInfer and print each response as it arrives",
    )
    parser.add_argument(
        "--gateway",
        metavar="HOST:PORT",
        default=None,
        help=f"gateway address (default: ${GATEWAY_ENV}, else {DEFAULT_GATEWAY})",
    )
    parser.add_argument(
        "--invoke-token",
        default=None,
        metavar="TOKEN",
        help=f"the deployment's invoke token (default: ${INVOKE_TOKEN_ENV})",
    )
    parser.add_argument(
        "--route-rule",
        default=None,
        metavar="RULE",
        help="round-robin, random, least-request, scale-out, hash:<metadata-key> or an "
        "instance id (sent as metadata deploy-route-rule)",
    )
    parser.add_argument(
        "--metadata",
        dest="extra_metadata",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra request metadata, e.g. the key a hash: route rule names; repeatable",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="deadline of the call, waiting in the gateway's queue included (default: none; "
        "the deployment's queue_timeout still applies)",
    )
    group = parser.add_argument_group("output and TLS towards the gateway")
    group.add_argument(
        "-o",
        "--output",
        choices=OUTPUT_FORMATS,
        default=argparse.SUPPRESS,
        help="table: one line per output (tokens inline with --stream); json/yaml: the "
        "response(s) as data, one per line/document with --stream",
    )
    group.add_argument("--tls", action="store_true", default=argparse.SUPPRESS,
                       help="connect with TLS using the system's root certificates")
    group.add_argument("--tls-ca", metavar="FILE", default=argparse.SUPPRESS,
                       help="PEM CA certificate of the gateway (implies TLS)")
    group.add_argument("--tls-cert", metavar="FILE", default=argparse.SUPPRESS,
                       help="PEM client certificate for mutual TLS")
    group.add_argument("--tls-key", metavar="FILE", default=argparse.SUPPRESS,
                       help="PEM key of --tls-cert")
    return parser


def run(args: argparse.Namespace) -> int:
    request = request_from_args(args.deployment, args.inputs, args.datatypes)
    gateway = gateway_address(args.gateway, os.environ)
    metadata = call_metadata(
        invoke_token(args.invoke_token, os.environ), args.route_rule, args.extra_metadata
    )
    if args.timeout is not None and not args.timeout > 0:
        raise CliError(f"--timeout must be more than 0 seconds, got {args.timeout:g}")
    fmt = getattr(args, "output", "table")
    with _channel(gateway, args) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        try:
            if args.stream:
                return _stream(stub, request, metadata, args.timeout, fmt)
            return _unary(stub, request, metadata, args.timeout, fmt)
        except grpc.RpcError as error:
            code, message = describe_call_error(error, gateway, args.deployment)
            print(message, file=sys.stderr)
            return code


def request_from_args(
    deployment: str, inputs: Sequence[str], datatypes: Sequence[str]
) -> pb.ModelInferRequest:
    """The request the command line describes; CliError for bad inputs."""
    if not deployment.strip():
        raise CliError("the deployment name is empty")
    if not inputs:
        raise CliError(
            "give at least one --input NAME=VALUE (see `gpufleet invoke --help` for examples)"
        )
    try:
        default, named = parse_datatypes(datatypes)
        tensors = []
        for text in inputs:
            name, value = split_assignment(text, "--input")
            tensors.append(build_tensor(name, value, named.pop(name, default)))
        if named:
            raise TensorError(
                f"--datatype names {', '.join(map(repr, sorted(named)))}, which no --input "
                "gives; check the spelling"
            )
        return build_request(deployment.strip(), tensors)
    except TensorError as error:
        raise CliError(str(error)) from None


def gateway_address(flag: str | None, env: Mapping[str, str]) -> str:
    """--gateway, else $GPUFLEET_GATEWAY, else 127.0.0.1:8001."""
    return flag or env.get(GATEWAY_ENV) or DEFAULT_GATEWAY


def invoke_token(flag: str | None, env: Mapping[str, str]) -> str:
    """--invoke-token, else $GPUFLEET_INVOKE_TOKEN; empty when neither is given."""
    return (flag or env.get(INVOKE_TOKEN_ENV) or "").strip()


def call_metadata(
    token: str, route_rule: str | None, extra: Sequence[str]
) -> CallMetadata:
    """Request metadata: the bearer token, the route rule, then the --metadata pairs."""
    pairs: list[tuple[str, str | bytes]] = []
    if token:
        pairs.append(("authorization", f"Bearer {token}"))
    if route_rule:
        pairs.append((ROUTE_RULE_KEY, route_rule))
    for item in extra:
        try:
            key, value = split_assignment(item, "--metadata")
        except TensorError as error:
            raise CliError(str(error)) from None
        if key.lower() != key or key.endswith("-bin"):
            raise CliError(
                f"--metadata key {key!r} must be lowercase text metadata (no -bin suffix)"
            )
        pairs.append((key, value))
    return tuple(pairs)


def describe_call_error(error: grpc.RpcError, gateway: str, deployment: str) -> tuple[int, str]:
    """(exit code, message lines) for a failed call through the gateway."""
    details = RPCError.from_grpc(error)
    target = _header(error, ROUTE_TARGET_KEY)
    if details.code == grpc.StatusCode.UNAVAILABLE and details.status is None and not target:
        return EXIT_UNREACHABLE, (
            f"error: cannot connect to the gateway at {gateway}: {details.message}\n"
            "Start one with `gpufleet gateway`, or point --gateway or "
            f"${GATEWAY_ENV} at a running one."
        )
    lines = [f"error: {details.code.name}: {details.message}"]
    if details.reason:
        lines.append(f"  reason: {details.reason}")
    lines.extend(f"  {v.field}: {v.description}" for v in details.field_violations)
    pushback = _pushback_ms(details)
    if pushback is not None:
        lines.append(f"  retry after: {pushback} ms")
    if target:
        lines.append(f"  {ROUTE_TARGET_KEY}: {target}")
    if details.code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        lines.append(
            f"Pass the invoke token of {deployment!r} with --invoke-token or "
            f"${INVOKE_TOKEN_ENV} (`gpufleet rotate-token {deployment}` issues a new one)."
        )
    code = EXIT_RETRY_LATER if details.reason in RETRY_LATER_REASONS else EXIT_SERVER_ERROR
    return code, "\n".join(lines)


def output_data(outputs: Sequence[Output]) -> list[dict[str, object]]:
    """Outputs as plain data for JSON and YAML."""
    return [
        {
            "name": output.name,
            "datatype": output.datatype,
            "shape": list(output.shape),
            "data": plain_data(output.data),
        }
        for output in outputs
    ]


def response_data(response: pb.ModelInferResponse) -> dict[str, object]:
    """A response as plain data: model, version, id and decoded outputs."""
    return {
        "model_name": response.model_name,
        "model_version": response.model_version,
        "id": response.id,
        "outputs": output_data(_decoded(response)),
    }


def output_line(output: Output) -> str:
    """One output for the table format: name, datatype, shape, then the data as JSON."""
    shape = ",".join(str(dim) for dim in output.shape)
    data = json.dumps(plain_data(output.data), ensure_ascii=False)
    return f"{output.name} {output.datatype} [{shape}]: {data}"


class TokenPrinter:
    """Writes streamed responses in the table format: BYTES elements inline as text, one
    space apart, flushed at once; any other output on a line of its own."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._inline = False

    def write(self, outputs: Sequence[Output]) -> None:
        """Print one response's outputs."""
        for output in outputs:
            if output.datatype == BYTES:
                for element in _leaves(output.data):
                    text = element if isinstance(element, str) else repr(element)
                    self._stream.write((" " if self._inline else "") + text)
                    self._inline = True
            else:
                self.end_line()
                self._stream.write(output_line(output) + "\n")
        self._stream.flush()

    def end_line(self) -> None:
        """Finish the inline text with a newline, if any was written."""
        if self._inline:
            self._stream.write("\n")
            self._inline = False


def _unary(
    stub: pb_grpc.GRPCInferenceServiceStub,
    request: pb.ModelInferRequest,
    metadata: CallMetadata,
    timeout: float | None,
    fmt: str,
) -> int:
    response, call = stub.ModelInfer.with_call(request, metadata=metadata, timeout=timeout)
    _print_route_target(call)
    if fmt == "table":
        for output in _decoded(response):
            print(output_line(output))
    else:
        sys.stdout.write(dumps(response_data(response), "json" if fmt == "json" else "yaml"))
    return EXIT_OK


def _stream(
    stub: pb_grpc.GRPCInferenceServiceStub,
    request: pb.ModelInferRequest,
    metadata: CallMetadata,
    timeout: float | None,
    fmt: str,
) -> int:
    # One request, then the half-close: the server ends the stream once it has answered.
    responses = stub.ModelStreamInfer(iter([request]), metadata=metadata, timeout=timeout)
    printer = TokenPrinter(sys.stdout)
    code = EXIT_OK
    try:
        _print_route_target(responses)
        for message in responses:
            if message.error_message:
                printer.end_line()
                print(f"error: the model failed the request: {message.error_message}",
                      file=sys.stderr)
                code = EXIT_SERVER_ERROR
            elif fmt == "table":
                printer.write(_decoded(message.infer_response))
            elif fmt == "json":
                print(json.dumps(response_data(message.infer_response), ensure_ascii=False),
                      flush=True)
            else:
                sys.stdout.write("---\n" + dumps(response_data(message.infer_response), "yaml"))
                sys.stdout.flush()
            if is_final(message.infer_response):
                break
    finally:
        printer.end_line()
        # Ends the call if the server has not already; grpc-stubs leave cancel() untyped.
        responses.cancel()  # type: ignore[no-untyped-call]
    return code


def _decoded(response: pb.ModelInferResponse) -> list[Output]:
    try:
        return decode_outputs(response)
    except TensorError as error:
        raise CliError(f"cannot read the response: {error}") from None


def _leaves(value: object) -> Iterator[object]:
    if isinstance(value, list):
        for item in value:
            yield from _leaves(item)
    else:
        yield value


def _print_route_target(call: grpc.Call) -> None:
    target = _metadata_value(call.initial_metadata(), ROUTE_TARGET_KEY)
    if target:
        print(f"{ROUTE_TARGET_KEY}: {target}", file=sys.stderr, flush=True)


def _header(error: grpc.RpcError, key: str) -> str:
    initial = getattr(error, "initial_metadata", None)
    if initial is None:
        return ""
    return _metadata_value(initial(), key)


def _metadata_value(metadata: object, key: str) -> str:
    if not isinstance(metadata, Sequence):
        return ""
    for item in metadata:
        found, value = item
        if found == key and isinstance(value, str):
            return value
    return ""


def _pushback_ms(details: RPCError) -> int | None:
    for key, value in details.trailing_metadata:
        if key == PUSHBACK_KEY and isinstance(value, str) and value.strip().isdigit():
            return int(value)
    return None


def _channel(gateway: str, args: argparse.Namespace) -> grpc.Channel:
    options = [
        ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
    ]
    tls_ca = getattr(args, "tls_ca", None)
    tls_cert = getattr(args, "tls_cert", None)
    tls_key = getattr(args, "tls_key", None)
    if (tls_cert is None) != (tls_key is None):
        raise CliError("mutual TLS needs both --tls-cert and --tls-key; only one was given")
    if not (getattr(args, "tls", False) or tls_ca or tls_cert):
        return grpc.insecure_channel(gateway, options=options)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read_pem(tls_ca, "--tls-ca"),
        private_key=_read_pem(tls_key, "--tls-key"),
        certificate_chain=_read_pem(tls_cert, "--tls-cert"),
    )
    return grpc.secure_channel(gateway, credentials, options=options)


def _read_pem(path: str | None, flag: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise CliError(f"cannot read {flag} {path}: {error.strerror or error}") from None
