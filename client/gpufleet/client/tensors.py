"""Open Inference Protocol tensors from and to plain values. Pure, no I/O.

Inputs are written as text, the way `gpufleet invoke --input NAME=VALUE` takes them: VALUE
is read as JSON when it is valid JSON (a number, true/false, a "string" or nested lists of
those), and as a plain string otherwise, so `PROMPT=hello world` and `INPUT0=[[1,2],[3,4]]`
both work. The datatype is the one given, else inferred from the values: booleans BOOL,
integers INT64, other numbers FP32, strings BYTES. A scalar has shape [1]; nested lists give
their shape, and must be rectangular.

Request data always travels in `raw_input_contents` (little-endian; BYTES as 4-byte length
prefixed elements), as tritonclient sends it, because FP16 and BF16 have no typed form and
the protocol forbids mixing raw and typed inputs in one request. Outputs are read from
either form.
"""

from __future__ import annotations

import base64
import json
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeAlias

from gpufleet.inference import grpc_service_pb2 as pb

Scalar: TypeAlias = bool | int | float | str | bytes
Value: TypeAlias = Scalar | list["Value"]
"""A scalar or nested lists of scalars, as JSON would hold them (plus bytes for BYTES
elements that are not UTF-8 text)."""

BYTES = "BYTES"
BF16 = "BF16"
FINAL_RESPONSE_PARAMETER = "triton_final_response"
"""Triton's flag on a streamed response: no more responses follow for its request."""

# struct format character of each fixed-size datatype (BF16 is packed by hand).
_FORMATS: dict[str, str] = {
    "BOOL": "?",
    "UINT8": "B",
    "UINT16": "H",
    "UINT32": "I",
    "UINT64": "Q",
    "INT8": "b",
    "INT16": "h",
    "INT32": "i",
    "INT64": "q",
    "FP16": "e",
    "FP32": "f",
    "FP64": "d",
}
_INT_RANGES: dict[str, tuple[int, int]] = {
    "UINT8": (0, 2**8 - 1),
    "UINT16": (0, 2**16 - 1),
    "UINT32": (0, 2**32 - 1),
    "UINT64": (0, 2**64 - 1),
    "INT8": (-(2**7), 2**7 - 1),
    "INT16": (-(2**15), 2**15 - 1),
    "INT32": (-(2**31), 2**31 - 1),
    "INT64": (-(2**63), 2**63 - 1),
}
_FLOAT_TYPES = frozenset({"FP16", BF16, "FP32", "FP64"})
DATATYPES: tuple[str, ...] = (*_FORMATS, BF16, BYTES)
"""Every datatype of the protocol, in the order --help lists them."""

# The InferTensorContents field of each datatype's typed form; FP16 and BF16 have none.
_TYPED_FIELDS: dict[str, str] = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    BYTES: "bytes_contents",
}
_LENGTH_PREFIX = struct.Struct("<I")
_BF16_NAN = 0x7FC0


class TensorError(ValueError):
    """A tensor that cannot be built or read; the message says what and how to fix it."""


@dataclass(frozen=True)
class Tensor:
    """One input, ready for a ModelInferRequest."""

    name: str
    """Input name."""
    datatype: str
    """Protocol datatype, e.g. "FP32"."""
    shape: tuple[int, ...]
    """Dimensions."""
    raw: bytes
    """The data in the protocol's raw form."""


@dataclass(frozen=True)
class Output:
    """One output of a response, decoded."""

    name: str
    """Output name."""
    datatype: str
    """Protocol datatype."""
    shape: tuple[int, ...]
    """Dimensions, as the response states them."""
    data: Value
    """Nested lists following `shape` (a flat list when the element count does not match
    the shape). BYTES elements are str when they are UTF-8, else bytes."""


def split_assignment(text: str, flag: str) -> tuple[str, str]:
    """"NAME=VALUE" -> (NAME, VALUE); the value may itself contain '='."""
    name, equals, value = text.partition("=")
    name = name.strip()
    if not equals or not name:
        raise TensorError(f"{flag} expects NAME=VALUE, got {text!r}")
    return name, value


def parse_datatypes(items: Sequence[str]) -> tuple[str | None, dict[str, str]]:
    """--datatype values: "TYPE" for every input, "NAME=TYPE" for one.

    Returns (the datatype for all inputs or None, datatype per input name).
    """
    default: str | None = None
    named: dict[str, str] = {}
    for item in items:
        if "=" in item:
            name, datatype = split_assignment(item, "--datatype")
            named[name] = _datatype(datatype)
        else:
            default = _datatype(item)
    return default, named


def parse_value(text: str) -> Value:
    """The value of `--input NAME=VALUE`: JSON when it parses as a tensor value, else the
    text itself as one string."""
    try:
        loaded: object = json.loads(text)
    except ValueError:
        return text
    if _is_value(loaded):
        return _as_value(loaded)
    return text


def build_tensor(name: str, text: str, datatype: str | None = None) -> Tensor:
    """The input `name` from its text (see the module docstring)."""
    value = parse_value(text)
    shape = _shape(name, value)
    leaves = _flatten(value)
    chosen = datatype or _infer_datatype(name, leaves)
    if chosen == BYTES and not isinstance(value, list):
        # A scalar given for BYTES keeps its exact text ("007" stays "007", not 7).
        leaves = [text if not isinstance(value, str) else value]
    return Tensor(name, chosen, shape, encode(name, chosen, leaves))


def build_request(
    model_name: str, tensors: Sequence[Tensor], request_id: str = ""
) -> pb.ModelInferRequest:
    """A ModelInferRequest carrying `tensors` as raw inputs."""
    names = [tensor.name for tensor in tensors]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise TensorError(
            f"input {', '.join(map(repr, duplicates))} is given more than once; give each "
            "input once"
        )
    request = pb.ModelInferRequest(model_name=model_name, id=request_id)
    for tensor in tensors:
        request.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        request.raw_input_contents.append(tensor.raw)
    return request


def encode(name: str, datatype: str, leaves: Sequence[Scalar]) -> bytes:
    """Elements in the raw form of `datatype`."""
    if datatype == BYTES:
        elements = [_bytes_element(name, leaf) for leaf in leaves]
        return b"".join(_LENGTH_PREFIX.pack(len(e)) + e for e in elements)
    checked = [_checked_leaf(name, datatype, leaf) for leaf in leaves]
    if datatype == BF16:
        return b"".join(struct.pack("<H", _to_bf16(float(v))) for v in checked)
    try:
        return struct.pack(f"<{len(checked)}{_FORMATS[datatype]}", *checked)
    except (OverflowError, struct.error) as error:
        raise TensorError(
            f"input {name!r}: a value does not fit in {datatype} ({error}); pick a wider "
            "--datatype"
        ) from None


def decode_outputs(response: pb.ModelInferResponse) -> list[Output]:
    """Every output of `response`, from raw_output_contents or typed contents."""
    raw = list(response.raw_output_contents)
    if raw and len(raw) != len(response.outputs):
        raise TensorError(
            f"the response has {len(raw)} raw_output_contents for {len(response.outputs)} "
            "outputs; the model server broke the protocol"
        )
    outputs: list[Output] = []
    for index, tensor in enumerate(response.outputs):
        shape = tuple(tensor.shape)
        if raw:
            flat = decode_raw(tensor.name, tensor.datatype, raw[index])
        else:
            flat = _typed_values(tensor)
        outputs.append(Output(tensor.name, tensor.datatype, shape, _reshape(flat, shape)))
    return outputs


def decode_raw(name: str, datatype: str, data: bytes) -> list[Scalar]:
    """The elements of a raw tensor."""
    if datatype == BYTES:
        return [_text_or_bytes(e) for e in _split_bytes_elements(name, data)]
    if datatype == BF16:
        if len(data) % 2:
            raise TensorError(f"output {name!r}: BF16 data of {len(data)} bytes is not whole")
        return [
            struct.unpack("<f", struct.pack("<I", half << 16))[0]
            for (half,) in struct.iter_unpack("<H", data)
        ]
    code = _FORMATS.get(datatype)
    if code is None:
        raise TensorError(f"output {name!r} has unknown datatype {datatype!r}")
    layout = struct.Struct(f"<{code}")
    if len(data) % layout.size:
        raise TensorError(
            f"output {name!r}: {len(data)} bytes of {datatype} is not a whole number of "
            f"{layout.size}-byte elements"
        )
    return [value for (value,) in layout.iter_unpack(data)]


def is_final(response: pb.ModelInferResponse) -> bool:
    """True when a streamed response says no more responses follow for its request."""
    parameter = response.parameters.get(FINAL_RESPONSE_PARAMETER)
    return parameter is not None and parameter.bool_param


def plain_data(value: Value) -> object:
    """`value` with non-UTF-8 BYTES elements as {"base64": ...}, ready for JSON or YAML."""
    if isinstance(value, list):
        return [plain_data(item) for item in value]
    if isinstance(value, bytes):
        return {"base64": base64.b64encode(value).decode("ascii")}
    return value


def _datatype(text: str) -> str:
    datatype = text.strip().upper()
    if datatype not in DATATYPES:
        raise TensorError(f"unknown datatype {text!r}; use one of {', '.join(DATATYPES)}")
    return datatype


def _is_value(loaded: object) -> bool:
    if isinstance(loaded, list):
        return all(_is_value(item) for item in loaded)
    return isinstance(loaded, (bool, int, float, str))


def _as_value(loaded: object) -> Value:
    if isinstance(loaded, list):
        return [_as_value(item) for item in loaded]
    if isinstance(loaded, (bool, int, float, str)):
        return loaded
    raise TypeError(f"not a tensor value: {loaded!r}")


def _shape(name: str, value: Value) -> tuple[int, ...]:
    if not isinstance(value, list):
        return (1,)
    return _list_shape(name, value)


def _list_shape(name: str, value: Value) -> tuple[int, ...]:
    if not isinstance(value, list):
        return ()
    shapes = {_list_shape(name, item) for item in value}
    if len(shapes) > 1:
        raise TensorError(
            f"input {name!r} is not rectangular: nested lists of one level must have the same "
            f"length and depth, e.g. [[1,2],[3,4]]"
        )
    inner = shapes.pop() if shapes else ()
    return (len(value), *inner)


def _flatten(value: Value) -> list[Scalar]:
    if isinstance(value, list):
        return [leaf for item in value for leaf in _flatten(item)]
    return [value]


def _infer_datatype(name: str, leaves: Sequence[Scalar]) -> str:
    if not leaves:
        raise TensorError(
            f"input {name!r} is empty, so its datatype cannot be inferred; give it with "
            f"--datatype {name}=TYPE"
        )
    if all(isinstance(leaf, bool) for leaf in leaves):
        return "BOOL"
    if all(isinstance(leaf, int) and not isinstance(leaf, bool) for leaf in leaves):
        return "INT64"
    if all(isinstance(leaf, (int, float)) and not isinstance(leaf, bool) for leaf in leaves):
        return "FP32"
    if all(isinstance(leaf, str) for leaf in leaves):
        return BYTES
    raise TensorError(
        f"input {name!r} mixes value kinds (numbers, booleans, strings); use one kind, or "
        f"--datatype {name}=BYTES to send every element as text"
    )


def _checked_leaf(name: str, datatype: str, leaf: Scalar) -> bool | int | float:
    if datatype == "BOOL":
        if isinstance(leaf, bool):
            return leaf
        raise TensorError(f"input {name!r} is BOOL; its values must be true or false, got {leaf!r}")
    if datatype in _FLOAT_TYPES:
        if isinstance(leaf, (int, float)) and not isinstance(leaf, bool):
            return float(leaf)
        raise TensorError(f"input {name!r} is {datatype}; its values must be numbers, got {leaf!r}")
    low, high = _INT_RANGES[datatype]
    if isinstance(leaf, int) and not isinstance(leaf, bool):
        if low <= leaf <= high:
            return leaf
        raise TensorError(
            f"input {name!r}: {leaf} is out of range for {datatype} ({low} to {high}); pick a "
            "wider --datatype"
        )
    raise TensorError(
        f"input {name!r} is {datatype}; its values must be whole numbers, got {leaf!r}"
    )


def _bytes_element(name: str, leaf: Scalar) -> bytes:
    if isinstance(leaf, bytes):
        return leaf
    if isinstance(leaf, str):
        return leaf.encode("utf-8")
    return json.dumps(leaf).encode("utf-8")


def _to_bf16(value: float) -> int:
    """The bfloat16 bits nearest to `value` (round half to even), as PyTorch converts."""
    if math.isnan(value):
        return _BF16_NAN
    (bits,) = struct.unpack("<I", struct.pack("<f", value))
    rounded: int = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded & 0xFFFF


def _split_bytes_elements(name: str, data: bytes) -> list[bytes]:
    elements: list[bytes] = []
    offset = 0
    while offset < len(data):
        if offset + _LENGTH_PREFIX.size > len(data):
            raise TensorError(f"output {name!r}: raw BYTES data ends inside a length prefix")
        (length,) = _LENGTH_PREFIX.unpack_from(data, offset)
        offset += _LENGTH_PREFIX.size
        if offset + length > len(data):
            raise TensorError(
                f"output {name!r}: raw BYTES element of {length} bytes runs past the data"
            )
        elements.append(data[offset : offset + length])
        offset += length
    return elements


def _text_or_bytes(element: bytes) -> str | bytes:
    try:
        return element.decode("utf-8")
    except UnicodeDecodeError:
        return element


def _typed_values(tensor: pb.ModelInferResponse.InferOutputTensor) -> list[Scalar]:
    field = _TYPED_FIELDS.get(tensor.datatype)
    if field is None:
        return []
    values: Sequence[Scalar] = getattr(tensor.contents, field)
    if tensor.datatype == BYTES:
        return [_text_or_bytes(bytes(v)) for v in values if isinstance(v, bytes)]
    return list(values)


def _reshape(flat: list[Scalar], shape: tuple[int, ...]) -> Value:
    if any(dim < 0 for dim in shape) or math.prod(shape) != len(flat) or len(shape) < 2:
        return list(flat)
    if shape[0] == 0:
        return []
    size = len(flat) // shape[0]
    return [_reshape(flat[i * size : (i + 1) * size], shape[1:]) for i in range(shape[0])]
