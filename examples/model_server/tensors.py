"""Open Inference Protocol tensor encoding: validation and (de)serialisation, no I/O.

A tensor's data travels either in `raw_input_contents` (little-endian bytes, one entry per
input, the form tritonclient uses) or in the typed `contents` field matching its datatype.
BYTES tensors in raw form are a sequence of elements, each a 4-byte little-endian length
followed by that many bytes.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from gpufleet.inference import grpc_service_pb2 as pb

from examples.model_server.errors import invalid

# Bytes per element of each fixed-size datatype; BYTES is the only variable-size one.
FIXED_SIZES: dict[str, int] = {
    "BOOL": 1,
    "UINT8": 1,
    "UINT16": 2,
    "UINT32": 4,
    "UINT64": 8,
    "INT8": 1,
    "INT16": 2,
    "INT32": 4,
    "INT64": 8,
    "FP16": 2,
    "BF16": 2,
    "FP32": 4,
    "FP64": 8,
}
BYTES = "BYTES"
DATATYPES = (*FIXED_SIZES, BYTES)

# The InferTensorContents field that carries each datatype in typed form; FP16 and BF16 have
# none and can only be sent raw.
TYPED_FIELDS: dict[str, str] = {
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
_INT_FORMATS = {"INT32": struct.Struct("<i"), "INT64": struct.Struct("<q")}


@dataclass(frozen=True)
class InputTensor:
    """One request input with its raw data, or None when it came in typed `contents`."""

    tensor: pb.ModelInferRequest.InferInputTensor
    raw: bytes | None

    @property
    def name(self) -> str:
        """The input's name."""
        return self.tensor.name

    @property
    def datatype(self) -> str:
        """The input's datatype, e.g. "FP32"."""
        return self.tensor.datatype


def element_count(name: str, shape: Sequence[int]) -> int:
    """Number of elements of a tensor of `shape`; a scalar (empty shape) has one."""
    if any(dim < 0 for dim in shape):
        raise invalid(f"tensor {name!r} has shape {list(shape)}; every dimension must be >= 0")
    return math.prod(shape)


def decode_bytes_elements(name: str, raw: bytes) -> list[bytes]:
    """Splits a raw BYTES tensor into its elements."""
    elements: list[bytes] = []
    offset = 0
    while offset < len(raw):
        if offset + _LENGTH_PREFIX.size > len(raw):
            raise invalid(
                f"raw BYTES tensor {name!r} ends inside a length prefix at byte {offset}; "
                "each element must be a 4-byte little-endian length followed by its bytes"
            )
        (length,) = _LENGTH_PREFIX.unpack_from(raw, offset)
        offset += _LENGTH_PREFIX.size
        if offset + length > len(raw):
            raise invalid(
                f"raw BYTES tensor {name!r} declares a {length}-byte element at byte "
                f"{offset} but only {len(raw) - offset} bytes follow"
            )
        elements.append(raw[offset : offset + length])
        offset += length
    return elements


def encode_bytes_elements(elements: Sequence[bytes]) -> bytes:
    """Serialises BYTES elements in the raw (length-prefixed) form."""
    return b"".join(_LENGTH_PREFIX.pack(len(element)) + element for element in elements)


def request_inputs(request: pb.ModelInferRequest) -> list[InputTensor]:
    """The request's inputs, checked: known datatype, unique names, data matching the shape."""
    raw_count = len(request.raw_input_contents)
    if raw_count and raw_count != len(request.inputs):
        raise invalid(
            f"raw_input_contents has {raw_count} entries for {len(request.inputs)} inputs; "
            "send one raw entry per input, in input order, or none at all"
        )
    seen: set[str] = set()
    inputs: list[InputTensor] = []
    for index, tensor in enumerate(request.inputs):
        if tensor.name in seen:
            raise invalid(f"input {tensor.name!r} appears twice; input names must be unique")
        seen.add(tensor.name)
        raw = request.raw_input_contents[index] if raw_count else None
        checked = InputTensor(tensor=tensor, raw=raw)
        _check_data(checked)
        inputs.append(checked)
    return inputs


def _check_data(item: InputTensor) -> None:
    name, datatype = item.name, item.datatype
    if datatype not in DATATYPES:
        raise invalid(
            f"input {name!r} has unknown datatype {datatype!r}; use one of {', '.join(DATATYPES)}"
        )
    count = element_count(name, item.tensor.shape)
    if item.raw is not None:
        if datatype == BYTES:
            found = len(decode_bytes_elements(name, item.raw))
            if found != count:
                raise invalid(
                    f"input {name!r} has shape {list(item.tensor.shape)} ({count} elements) "
                    f"but its raw BYTES data holds {found} elements"
                )
        elif len(item.raw) != count * FIXED_SIZES[datatype]:
            raise invalid(
                f"input {name!r} has shape {list(item.tensor.shape)} of {datatype} "
                f"({count * FIXED_SIZES[datatype]} bytes) but its raw data is {len(item.raw)} bytes"
            )
        return
    field = TYPED_FIELDS.get(datatype)
    if field is None:
        if count:
            raise invalid(f"input {name!r} is {datatype}, which has no typed form; send it raw")
        return
    found = len(getattr(item.tensor.contents, field))
    if found != count:
        raise invalid(
            f"input {name!r} has shape {list(item.tensor.shape)} ({count} elements) but "
            f"contents.{field} holds {found} values"
        )


def bytes_values(item: InputTensor) -> list[bytes]:
    """The elements of a BYTES input (already checked by request_inputs)."""
    if item.datatype != BYTES:
        raise invalid(f"input {item.name!r} must be BYTES, got {item.datatype}")
    if item.raw is not None:
        return decode_bytes_elements(item.name, item.raw)
    return list(item.tensor.contents.bytes_contents)


def int_values(item: InputTensor) -> list[int]:
    """The elements of an INT32 or INT64 input (already checked by request_inputs)."""
    layout = _INT_FORMATS.get(item.datatype)
    if layout is None:
        raise invalid(f"input {item.name!r} must be INT32 or INT64, got {item.datatype}")
    if item.raw is not None:
        return [value for (value,) in layout.iter_unpack(item.raw)]
    contents = item.tensor.contents
    return list(contents.int_contents if item.datatype == "INT32" else contents.int64_contents)
