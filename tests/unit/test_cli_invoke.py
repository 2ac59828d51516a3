"""`gpufleet invoke` without a gateway: input parsing, tensor encoding and decoding, request
metadata, error rendering and the streaming printer."""

from __future__ import annotations

import io
import math
import struct

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from hypothesis import given
from hypothesis import strategies as st

from gpufleet.client.cli.commands import invoke
from gpufleet.client.cli.errors import CliError
from gpufleet.client.tensors import (
    Output,
    TensorError,
    build_request,
    build_tensor,
    decode_outputs,
    decode_raw,
    encode,
    is_final,
    parse_datatypes,
    parse_value,
    plain_data,
)
from gpufleet.inference import grpc_service_pb2 as pb

INT_RANGES = {
    "INT8": (-(2**7), 2**7 - 1),
    "INT16": (-(2**15), 2**15 - 1),
    "INT32": (-(2**31), 2**31 - 1),
    "INT64": (-(2**63), 2**63 - 1),
    "UINT8": (0, 2**8 - 1),
    "UINT16": (0, 2**16 - 1),
    "UINT32": (0, 2**32 - 1),
    "UINT64": (0, 2**64 - 1),
}


def _bytes_raw(*elements: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


# --- values and inferred datatypes -----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("5", 5),
        ("-1.5", -1.5),
        ("true", True),
        ('"42"', "42"),
        ("[[1, 2], [3, 4]]", [[1, 2], [3, 4]]),
        ("hello world", "hello world"),
        ("", ""),
        ('{"a": 1}', '{"a": 1}'),  # an object is no tensor value: sent as text
        ("null", "null"),
    ],
)
def test_value_is_json_when_it_is_a_tensor_value_else_text(text: str, value: object) -> None:
    assert parse_value(text) == value


@pytest.mark.parametrize(
    ("text", "datatype", "shape"),
    [
        ("hello world", "BYTES", (1,)),
        ("7", "INT64", (1,)),
        ("0.25", "FP32", (1,)),
        ("[1, 2.5]", "FP32", (2,)),
        ("false", "BOOL", (1,)),
        ("[[1, 2, 3], [4, 5, 6]]", "INT64", (2, 3)),
        ('[["a"], ["b"]]', "BYTES", (2, 1)),
        ("[[], []]", None, (2, 0)),
    ],
)
def test_datatype_and_shape_are_inferred(
    text: str, datatype: str | None, shape: tuple[int, ...]
) -> None:
    if datatype is None:
        with pytest.raises(TensorError, match="--datatype X=TYPE"):
            build_tensor("X", text)
        assert build_tensor("X", text, "FP32").shape == shape
    else:
        tensor = build_tensor("X", text)
        assert (tensor.datatype, tensor.shape) == (datatype, shape)


def test_scalar_text_sent_as_bytes_keeps_its_exact_spelling() -> None:
    tensor = build_tensor("ID", "007", "BYTES")
    assert tensor.raw == _bytes_raw(b"007")
    assert build_tensor("ID", '"007"', "BYTES").raw == _bytes_raw(b"007")


def test_raw_encodings_are_little_endian() -> None:
    assert build_tensor("X", "[1, -2]", "INT32").raw == struct.pack("<2i", 1, -2)
    assert build_tensor("X", "[true, false]").raw == b"\x01\x00"
    assert build_tensor("X", "0.5").raw == struct.pack("<f", 0.5)
    assert build_tensor("X", "[0.5, 2]", "FP16").raw == struct.pack("<2e", 0.5, 2.0)
    assert build_tensor("X", '["a", "bc"]').raw == _bytes_raw(b"a", b"bc")
    assert build_tensor("X", "[1, true]", "BYTES").raw == _bytes_raw(b"1", b"true")


@pytest.mark.parametrize(
    ("text", "datatype", "message"),
    [
        ("[[1], [2, 3]]", None, "is not rectangular"),
        ("[[1], 2]", None, "is not rectangular"),
        ('[1, "a"]', None, "mixes value kinds"),
        ("300", "INT8", "out of range for INT8"),
        ("-1", "UINT32", "out of range for UINT32"),
        ("1.5", "INT32", "must be whole numbers"),
        ("1", "BOOL", "must be true or false"),
        ("abc", "FP32", "must be numbers"),
        ("1e6", "FP16", "does not fit in FP16"),
        ("1e39", "FP32", "does not fit in FP32"),
    ],
)
def test_bad_values_say_what_is_wrong(text: str, datatype: str | None, message: str) -> None:
    with pytest.raises(TensorError, match=message):
        build_tensor("X", text, datatype)


def test_datatypes_for_all_and_per_input() -> None:
    assert parse_datatypes(["fp64", "A=int32"]) == ("FP64", {"A": "INT32"})
    with pytest.raises(TensorError, match="unknown datatype 'FLOAT'"):
        parse_datatypes(["FLOAT"])
    with pytest.raises(TensorError, match="NAME=VALUE"):
        parse_datatypes(["=INT32"])


# --- round trips -----------------------------------------------------------------------------


@given(st.data())
def test_integers_round_trip_through_every_int_datatype(data: st.DataObject) -> None:
    datatype = data.draw(st.sampled_from(sorted(INT_RANGES)))
    low, high = INT_RANGES[datatype]
    values = data.draw(st.lists(st.integers(low, high), max_size=8))
    assert decode_raw("X", datatype, encode("X", datatype, values)) == values


@given(st.lists(st.floats(allow_nan=False), max_size=8))
def test_fp64_round_trips_exactly(values: list[float]) -> None:
    assert decode_raw("X", "FP64", encode("X", "FP64", values)) == values


@given(st.lists(st.text(), max_size=5))
def test_bytes_elements_round_trip(values: list[str]) -> None:
    assert decode_raw("X", "BYTES", encode("X", "BYTES", values)) == values


def test_bf16_rounds_to_nearest_even_and_decodes() -> None:
    raw = encode("X", "BF16", [1.5, -2.0, 1.0 + 2**-8, float("nan")])
    decoded = decode_raw("X", "BF16", raw)
    assert decoded[:3] == [1.5, -2.0, 1.0]  # 1 + 2^-8 is a tie: rounds to the even 1.0
    assert isinstance(decoded[3], float) and math.isnan(decoded[3])


# --- requests and responses ------------------------------------------------------------------


def test_request_carries_every_input_raw() -> None:
    request = build_request("tokens", [build_tensor("PROMPT", "hi"), build_tensor("N", "3")])
    assert request.model_name == "tokens"
    assert [(i.name, i.datatype, list(i.shape)) for i in request.inputs] == [
        ("PROMPT", "BYTES", [1]),
        ("N", "INT64", [1]),
    ]
    assert list(request.raw_input_contents) == [_bytes_raw(b"hi"), struct.pack("<q", 3)]


def test_an_input_given_twice_is_refused() -> None:
    with pytest.raises(TensorError, match="'A' is given more than once"):
        build_request("m", [build_tensor("A", "1"), build_tensor("A", "2")])


def test_outputs_are_read_from_raw_contents_and_reshaped() -> None:
    response = pb.ModelInferResponse(model_name="m")
    response.outputs.add(name="A", datatype="INT32", shape=[2, 2])
    response.outputs.add(name="B", datatype="BYTES", shape=[2])
    response.raw_output_contents.extend([struct.pack("<4i", 1, 2, 3, 4), _bytes_raw(b"x", b"\xff")])
    assert decode_outputs(response) == [
        Output("A", "INT32", (2, 2), [[1, 2], [3, 4]]),
        Output("B", "BYTES", (2,), ["x", b"\xff"]),
    ]
    assert plain_data(["x", b"\xff"]) == ["x", {"base64": "/w=="}]


def test_outputs_are_read_from_typed_contents() -> None:
    response = pb.ModelInferResponse(model_name="m")
    out = response.outputs.add(name="T", datatype="BYTES", shape=[1])
    out.contents.bytes_contents.append(b"tok")
    fp = response.outputs.add(name="F", datatype="FP32", shape=[1, 2])
    fp.contents.fp32_contents.extend([0.5, 1.5])
    assert decode_outputs(response) == [
        Output("T", "BYTES", (1,), ["tok"]),
        Output("F", "FP32", (1, 2), [[0.5, 1.5]]),
    ]


def test_a_shape_that_does_not_match_the_data_keeps_it_flat() -> None:
    response = pb.ModelInferResponse()
    out = response.outputs.add(name="A", datatype="INT64", shape=[3, 3])
    out.contents.int64_contents.extend([1, 2])
    assert decode_outputs(response)[0].data == [1, 2]


def test_mismatched_raw_outputs_are_an_error() -> None:
    response = pb.ModelInferResponse()
    response.outputs.add(name="A", datatype="INT32", shape=[1])
    response.outputs.add(name="B", datatype="INT32", shape=[1])
    response.raw_output_contents.append(struct.pack("<i", 1))
    with pytest.raises(TensorError, match="1 raw_output_contents for 2 outputs"):
        decode_outputs(response)


def test_final_flag() -> None:
    response = pb.ModelInferResponse()
    assert not is_final(response)
    response.parameters["triton_final_response"].bool_param = True
    assert is_final(response)


# --- the command's own helpers ---------------------------------------------------------------


def test_request_from_args_applies_datatypes_and_refuses_unused_ones() -> None:
    request = invoke.request_from_args("echo", ["A=1", "B=2"], ["FP64", "B=INT8"])
    assert [i.datatype for i in request.inputs] == ["FP64", "INT8"]
    with pytest.raises(CliError, match="--datatype names 'C', which no --input gives"):
        invoke.request_from_args("echo", ["A=1"], ["C=INT8"])
    with pytest.raises(CliError, match="at least one --input"):
        invoke.request_from_args("echo", [], [])
    with pytest.raises(CliError, match="--input expects NAME=VALUE"):
        invoke.request_from_args("echo", ["novalue"], [])


def test_metadata_has_token_rule_and_extra_pairs() -> None:
    assert invoke.call_metadata("t", "hash:session", ["session=abc"]) == (
        ("authorization", "Bearer t"),
        ("deploy-route-rule", "hash:session"),
        ("session", "abc"),
    )
    assert invoke.call_metadata("", None, []) == ()
    with pytest.raises(CliError, match="must be lowercase"):
        invoke.call_metadata("", None, ["Session=abc"])


def test_gateway_and_token_come_from_flag_then_environment() -> None:
    env = {"GPUFLEET_GATEWAY": "10.0.0.1:8001", "GPUFLEET_INVOKE_TOKEN": " env-token "}
    assert invoke.gateway_address(None, env) == "10.0.0.1:8001"
    assert invoke.gateway_address("h:1", env) == "h:1"
    assert invoke.gateway_address(None, {}) == "127.0.0.1:8001"
    assert invoke.invoke_token(None, env) == "env-token"
    assert invoke.invoke_token("flag", env) == "flag"


class _FailedCall(grpc.RpcError):
    """What a failed sync call raises, with the accessors the CLI reads."""

    def __init__(self, code: grpc.StatusCode, message: str, trailers=(), headers=()) -> None:
        self._code, self._message = code, message
        self._trailers, self._headers = tuple(trailers), tuple(headers)

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._message

    def trailing_metadata(self):
        return self._trailers

    def initial_metadata(self):
        return self._headers


def _with_reason(code: grpc.StatusCode, message: str, reason: str, *extra):
    status = status_pb2.Status(code=code.value[0], message=message)
    status.details.add().Pack(error_details_pb2.ErrorInfo(reason=reason, domain="gpufleet.dev"))
    trailers = [("grpc-status-details-bin", status.SerializeToString()), *extra]
    return _FailedCall(code, message, trailers)


def test_load_errors_exit_4_with_reason_and_pushback() -> None:
    error = _with_reason(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full", "QUEUE_FULL",
                         ("grpc-retry-pushback-ms", "250"))
    code, message = invoke.describe_call_error(error, "gw:1", "echo")
    assert code == invoke.EXIT_RETRY_LATER
    assert message.splitlines() == [
        "error: RESOURCE_EXHAUSTED: queue full",
        "  reason: QUEUE_FULL",
        "  retry after: 250 ms",
    ]


def test_quota_errors_exit_1() -> None:
    error = _with_reason(grpc.StatusCode.RESOURCE_EXHAUSTED, "no", "REPLICA_QUOTA_EXCEEDED")
    assert invoke.describe_call_error(error, "gw:1", "echo")[0] == 1


def test_an_instance_failure_is_not_an_unreachable_gateway() -> None:
    error = _FailedCall(grpc.StatusCode.UNAVAILABLE, "instance gone",
                        headers=[("deploy-route-target", "echo-1")])
    code, message = invoke.describe_call_error(error, "gw:1", "echo")
    assert code == 1
    assert "deploy-route-target: echo-1" in message
    unreachable = _FailedCall(grpc.StatusCode.UNAVAILABLE, "connection refused")
    code, message = invoke.describe_call_error(unreachable, "gw:1", "echo")
    assert code == 3
    assert "cannot connect to the gateway at gw:1" in message


def test_auth_errors_tell_where_the_token_comes_from() -> None:
    error = _with_reason(grpc.StatusCode.UNAUTHENTICATED, "no token", "MISSING_TOKEN")
    code, message = invoke.describe_call_error(error, "gw:1", "tokens")
    assert code == 1
    assert "$GPUFLEET_INVOKE_TOKEN" in message
    assert "gpufleet rotate-token tokens" in message


def test_token_printer_writes_text_inline_and_other_outputs_on_their_own_line() -> None:
    out = io.StringIO()
    printer = invoke.TokenPrinter(out)
    printer.write([Output("TOKEN", "BYTES", (1,), ["hello"])])
    printer.write([Output("TOKEN", "BYTES", (1,), ["world"])])
    printer.write([Output("SCORE", "FP32", (1,), [0.5])])
    printer.write([Output("TOKEN", "BYTES", (2,), ["a", b"\xff"])])
    printer.end_line()
    assert out.getvalue() == "hello world\nSCORE FP32 [1]: [0.5]\na b'\\xff'\n"


def test_output_line_is_name_type_shape_and_json_data() -> None:
    line = invoke.output_line(Output("OUTPUT0", "INT64", (2, 1), [[1], [2]]))
    assert line == "OUTPUT0 INT64 [2,1]: [[1], [2]]"
