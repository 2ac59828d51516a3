"""The two example models as plain request -> response functions (no I/O, no timing)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import grpc
from gpufleet.inference import grpc_service_pb2 as pb

from examples.model_server.config import ModelKind
from examples.model_server.errors import ModelError, invalid
from examples.model_server.tensors import (
    BYTES,
    InputTensor,
    bytes_values,
    element_count,
    encode_bytes_elements,
    int_values,
    request_inputs,
)

_T = TypeVar("_T")

MODEL_VERSION = "1"
PLATFORM_PREFIX = "gpufleet-example-"

ECHO_INPUT_PREFIX = "INPUT"
ECHO_OUTPUT_PREFIX = "OUTPUT"

PROMPT = "PROMPT"
MAX_TOKENS = "MAX_TOKENS"
TOKEN = "TOKEN"
MAX_TOKENS_LIMIT = 4096

# Triton's names: the flag on every streamed response of a decoupled model, and the request
# parameter by which a client asks for a separate, output-less final response.
FINAL_RESPONSE_PARAMETER = "triton_final_response"
EMPTY_FINAL_RESPONSE_PARAMETER = "triton_enable_empty_final_response"


def check_version(model_name: str, version: str) -> None:
    """Every model has exactly one version, "1"; empty means "the server's choice"."""
    if version not in ("", MODEL_VERSION):
        raise ModelError(
            grpc.StatusCode.NOT_FOUND,
            f"model {model_name!r} has no version {version!r}; "
            f"its only version is {MODEL_VERSION!r} (or leave the version empty)",
        )


def model_metadata(model_name: str, kind: ModelKind) -> pb.ModelMetadataResponse:
    """Inputs and outputs of `kind`; echo lists its canonical pair, it accepts any INPUT*."""
    tensor = pb.ModelMetadataResponse.TensorMetadata
    if kind is ModelKind.ECHO:
        inputs = [tensor(name="INPUT0", datatype="FP32", shape=[-1])]
        outputs = [tensor(name="OUTPUT0", datatype="FP32", shape=[-1])]
    else:
        inputs = [
            tensor(name=PROMPT, datatype=BYTES, shape=[1]),
            tensor(name=MAX_TOKENS, datatype="INT32", shape=[1]),
        ]
        outputs = [tensor(name=TOKEN, datatype=BYTES, shape=[-1])]
    return pb.ModelMetadataResponse(
        name=model_name,
        versions=[MODEL_VERSION],
        platform=PLATFORM_PREFIX + kind.value,
        inputs=inputs,
        outputs=outputs,
    )


def _response(request: pb.ModelInferRequest) -> pb.ModelInferResponse:
    return pb.ModelInferResponse(
        model_name=request.model_name, model_version=MODEL_VERSION, id=request.id
    )


def _requested(request: pb.ModelInferRequest, produced: Sequence[str]) -> set[str]:
    """Names of the outputs to return: the requested ones, or all when none is named."""
    names = {output.name for output in request.outputs}
    unknown = sorted(names.difference(produced))
    if unknown:
        raise invalid(
            f"model {request.model_name!r} has no output {', '.join(map(repr, unknown))} "
            f"for this request; it produces {', '.join(map(repr, produced))}"
        )
    return names or set(produced)


def echo(request: pb.ModelInferRequest) -> pb.ModelInferResponse:
    """Returns every input INPUT<suffix> as OUTPUT<suffix>, data untouched, raw stays raw."""
    inputs = request_inputs(request)
    for item in inputs:
        if not item.name.startswith(ECHO_INPUT_PREFIX):
            raise invalid(
                f"echo model {request.model_name!r} got input {item.name!r}; name inputs "
                f"{ECHO_INPUT_PREFIX}<suffix> (INPUT0, INPUT1, ...), each comes back as "
                f"{ECHO_OUTPUT_PREFIX}<suffix>"
            )
    output_names = [ECHO_OUTPUT_PREFIX + item.name[len(ECHO_INPUT_PREFIX) :] for item in inputs]
    wanted = _requested(request, output_names)
    response = _response(request)
    for item, output_name in zip(inputs, output_names, strict=True):
        if output_name not in wanted:
            continue
        output = response.outputs.add(
            name=output_name, datatype=item.datatype, shape=item.tensor.shape
        )
        if item.raw is not None:
            response.raw_output_contents.append(item.raw)
        else:
            output.contents.CopyFrom(item.tensor.contents)
    return response


@dataclass(frozen=True)
class TokenPlan:
    """What the `tokens` model will generate for one request."""

    tokens: list[bytes]
    """The tokens, in order."""
    raw: bool
    """Answer in raw_output_contents, because the request came raw (tritonclient does)."""
    empty_final: bool
    """The client asked for a separate output-less final response on the stream."""


def plan_tokens(request: pb.ModelInferRequest) -> TokenPlan:
    """Validates a `tokens` request: the prompt's words, repeated up to MAX_TOKENS."""
    inputs = {item.name: item for item in request_inputs(request)}
    unknown = sorted(set(inputs).difference((PROMPT, MAX_TOKENS)))
    if unknown:
        raise invalid(
            f"tokens model {request.model_name!r} got input {', '.join(map(repr, unknown))}; "
            f"it takes {PROMPT} (BYTES, one element) and optionally {MAX_TOKENS} "
            "(INT32, one element)"
        )
    _requested(request, [TOKEN])
    prompt = inputs.get(PROMPT)
    if prompt is None:
        raise invalid(f"tokens model {request.model_name!r} needs input {PROMPT} (BYTES, [1])")
    words = _single(prompt, bytes_values(prompt)).split()
    if not words:
        raise invalid(f"input {PROMPT} holds no words; send at least one word to generate from")
    count = len(words)
    limit = inputs.get(MAX_TOKENS)
    if limit is not None:
        count = _single(limit, int_values(limit))
        if not 1 <= count <= MAX_TOKENS_LIMIT:
            raise invalid(f"input {MAX_TOKENS} is {count}; it must be 1-{MAX_TOKENS_LIMIT}")
    parameter = request.parameters.get(EMPTY_FINAL_RESPONSE_PARAMETER)
    return TokenPlan(
        tokens=[words[index % len(words)] for index in range(count)],
        raw=prompt.raw is not None,
        empty_final=parameter is not None and parameter.bool_param,
    )


def _single(item: InputTensor, values: list[_T]) -> _T:
    if len(values) != 1 or element_count(item.name, item.tensor.shape) != 1:
        raise invalid(
            f"input {item.name!r} must hold exactly one element, got shape "
            f"{list(item.tensor.shape)}"
        )
    return values[0]


def tokens_response(
    request: pb.ModelInferRequest, plan: TokenPlan, tokens: Sequence[bytes]
) -> pb.ModelInferResponse:
    """A response carrying `tokens` as output TOKEN, BYTES of shape [len(tokens)]."""
    response = _response(request)
    output = response.outputs.add(name=TOKEN, datatype=BYTES, shape=[len(tokens)])
    if plan.raw:
        response.raw_output_contents.append(encode_bytes_elements(tokens))
    else:
        output.contents.bytes_contents.extend(tokens)
    return response


def empty_final_response(request: pb.ModelInferRequest) -> pb.ModelInferResponse:
    """The output-less response that only says "no more responses for this request"."""
    response = _response(request)
    mark_final(response, final=True)
    return response


def mark_final(response: pb.ModelInferResponse, final: bool) -> pb.ModelInferResponse:
    """Sets Triton's `triton_final_response` flag, as Triton does on every streamed response."""
    response.parameters[FINAL_RESPONSE_PARAMETER].bool_param = final
    return response
