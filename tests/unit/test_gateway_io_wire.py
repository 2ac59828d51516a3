from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpufleet.gateway.wire import WireFormatError, read_bytes_field, read_string_field
from gpufleet.inference import grpc_service_pb2 as pb

texts = st.text(max_size=40)


@given(
    model=texts,
    version=texts,
    request_id=texts,
    raw=st.lists(st.binary(max_size=300), max_size=4),
    ints=st.lists(st.integers(min_value=-(2**31), max_value=2**31 - 1), max_size=5),
    priority=st.integers(min_value=0, max_value=2**64 - 1),
)
def test_reads_the_fields_protobuf_wrote(
    model: str, version: str, request_id: str, raw: list[bytes], ints: list[int], priority: int
) -> None:
    request = pb.ModelInferRequest(model_name=model, model_version=version, id=request_id)
    request.raw_input_contents.extend(raw)
    tensor = request.inputs.add(name="INPUT0", datatype="INT32", shape=[len(ints)])
    tensor.contents.int_contents.extend(ints)
    request.parameters["priority"].uint64_param = priority
    request.parameters["ratio"].double_param = 0.5
    data = request.SerializeToString()
    # proto3 leaves empty strings out: absent reads as None.
    assert read_string_field(data, 1) == (model or None)
    assert read_string_field(data, 3) == (request_id or None)
    assert read_string_field(data, 2) == (version or None)


def test_every_wire_type_is_skipped() -> None:
    # ModelMetadataResponse.TensorMetadata: shape is packed varints; InferParameter uses
    # varint, fixed64 (double) fields.
    parameter = pb.InferParameter(int64_param=-5).SerializeToString()
    data = (
        b"\x08\x96\x01"  # field 1 varint
        + b"\x11" + b"\x00" * 8  # field 2 fixed64
        + b"\x1d" + b"\x00" * 4  # field 3 fixed32
        + b"\x22" + bytes([len(parameter)]) + parameter  # field 4 bytes
        + b"\x2a\x02hi"  # field 5 string
    )
    assert read_string_field(data, 5) == "hi"
    assert read_bytes_field(data, 4) == parameter
    assert read_string_field(data, 6) is None


def test_last_occurrence_wins() -> None:
    assert read_string_field(b"\x0a\x01a\x0a\x01b", 1) == "b"


def test_empty_message() -> None:
    assert read_string_field(b"", 1) is None


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"\x0a\x05ec", "runs past the end"),
        (b"\x0a", "varint"),
        (b"\x08" + b"\xff" * 11, "varint"),
        (b"\x08\x01", "wire type 0"),
        (b"\x0b", "wire type 3"),
        (b"\x02\x00", "field number 0"),
        (b"\x0a\x02\xff\xfe", "UTF-8"),
    ],
)
def test_malformed_bytes_raise(data: bytes, problem: str) -> None:
    with pytest.raises(WireFormatError, match=problem):
        read_string_field(data, 1)


def test_field_number_must_be_positive() -> None:
    with pytest.raises(ValueError, match="start at 1"):
        read_string_field(b"", 0)


def test_model_metadata_request_name() -> None:
    data = pb.ModelMetadataRequest(name="tokens", version="1").SerializeToString()
    assert read_string_field(data, 1) == "tokens"
