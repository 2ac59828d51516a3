"""Reading one string field from serialized protobuf bytes, without parsing the message.

The gateway forwards Open Inference Protocol requests as raw bytes and needs only the model
name (field 1 of ModelInferRequest and ModelMetadataRequest, field 3 for a request id).
Walking the top-level fields skips every length-delimited payload (tensor contents) by its
length, so the cost grows with the number of top-level fields, not with the tensor bytes.

Protobuf semantics kept: fields may come in any order, and for a repeated occurrence of a
singular field the last one wins.
"""

from __future__ import annotations

_VARINT = 0
_FIXED64 = 1
_LENGTH_DELIMITED = 2
_FIXED32 = 5
_MAX_VARINT_BYTES = 10


class WireFormatError(ValueError):
    """The bytes are not a valid serialized protobuf message."""


def read_string_field(data: bytes, field_number: int) -> str | None:
    """The value of string field `field_number` in the message `data`, or None if absent.

    Raises WireFormatError for truncated or malformed bytes, a wrong wire type for the field,
    or a value that is not UTF-8.
    """
    raw = read_bytes_field(data, field_number)
    if raw is None:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise WireFormatError(f"field {field_number} is not valid UTF-8: {err}") from err


def read_bytes_field(data: bytes, field_number: int) -> bytes | None:
    """The raw value of length-delimited field `field_number`, or None if absent."""
    if field_number < 1:
        raise ValueError(f"protobuf field numbers start at 1, got {field_number}")
    found: bytes | None = None
    position = 0
    end = len(data)
    while position < end:
        # Keys of fields 1-15 and lengths under 128 are one byte: read those inline, since
        # this runs for every call the gateway forwards.
        key = data[position]
        if key < 0x80:
            position += 1
        else:
            key, position = _read_varint(data, position)
        number = key >> 3
        wire_type = key & 0x7
        if number == 0:
            raise WireFormatError(f"field number 0 at byte {position}")
        if wire_type == _LENGTH_DELIMITED:
            if position < end and data[position] < 0x80:
                length = data[position]
                position += 1
            else:
                length, position = _read_varint(data, position)
            start = position
            position = _skip(data, position, length)
            if number == field_number:
                found = data[start:position]
            continue
        if wire_type == _VARINT:
            _, position = _read_varint(data, position)
        elif wire_type == _FIXED64:
            position = _skip(data, position, 8)
        elif wire_type == _FIXED32:
            position = _skip(data, position, 4)
        else:
            # Groups (types 3 and 4) are proto2-only and absent from these messages.
            raise WireFormatError(f"unsupported wire type {wire_type} at byte {position}")
        if number == field_number:
            raise WireFormatError(
                f"field {field_number} has wire type {wire_type}, expected length-delimited"
            )
    return found


def _read_varint(data: bytes, position: int) -> tuple[int, int]:
    value = 0
    shift = 0
    for index in range(position, min(position + _MAX_VARINT_BYTES, len(data))):
        byte = data[index]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, index + 1
        shift += 7
    raise WireFormatError(f"truncated or overlong varint at byte {position}")


def _skip(data: bytes, position: int, length: int) -> int:
    end = position + length
    if end > len(data):
        raise WireFormatError(
            f"a field of {length} bytes at byte {position} runs past the end ({len(data)} bytes)"
        )
    return end
