"""gRPC over HTTP/2 header blocks for the gateway's own HTTP/2 layer: what crosses the
gateway (the same rules as gateway/metadata.py, on wire bytes), deadlines, and statuses.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable

import grpc

from gpufleet.gateway.h2.hpack_codec import Header
from gpufleet.gateway.metadata import (
    GATEWAY_REQUEST_KEYS,
    HOP_KEYS,
    KEPT_RESERVED_TRAILERS,
    Metadatum,
)
from gpufleet.gateway.route_rules import ROUTE_TARGET_METADATA_KEY

ROUTE_TARGET = ROUTE_TARGET_METADATA_KEY.encode()
GRPC_STATUS = b"grpc-status"
GRPC_MESSAGE = b"grpc-message"
GRPC_TIMEOUT = b"grpc-timeout"
GRPC_ENCODING = b"grpc-encoding"
STATUS_200: Header = (b":status", b"200")
CONTENT_TYPE_GRPC: Header = (b"content-type", b"application/grpc")

# The rules of gateway/metadata.py, as wire bytes.
_HOP_KEYS = frozenset(key.encode() for key in HOP_KEYS)
_GATEWAY_REQUEST_KEYS = frozenset(key.encode() for key in GATEWAY_REQUEST_KEYS)
_KEPT_RESERVED_TRAILERS = frozenset(key.encode() for key in KEPT_RESERVED_TRAILERS)
_TIMEOUT_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}
_HTTP_TO_GRPC = {
    400: grpc.StatusCode.INTERNAL,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.UNIMPLEMENTED,
    429: grpc.StatusCode.UNAVAILABLE,
    502: grpc.StatusCode.UNAVAILABLE,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.UNAVAILABLE,
}
_CODES = {str(code.value[0]).encode(): code for code in grpc.StatusCode}


def _hop_specific(name: bytes) -> bool:
    return name[:1] == b":" or name[:5] == b"grpc-" or name in _HOP_KEYS


def request_headers_to_forward(headers: Iterable[Header]) -> list[Header]:
    """The client's metadata as the instance should see it."""
    return [
        (name, value)
        for name, value in headers
        if not _hop_specific(name) and name not in _GATEWAY_REQUEST_KEYS
    ]


def response_headers_to_return(headers: Iterable[Header]) -> list[Header]:
    """The instance's initial metadata as the client should see it (without the route
    target, which the caller adds)."""
    return [
        (name, value)
        for name, value in headers
        if not _hop_specific(name) and name != ROUTE_TARGET
    ]


def trailers_to_return(headers: Iterable[Header]) -> list[Header]:
    """The instance's trailers as the client should see them: its status and message, and
    the metadata gateway/metadata.py lets through."""
    kept: list[Header] = []
    status: list[Header] = []
    for name, value in headers:
        if name == GRPC_STATUS or name == GRPC_MESSAGE:
            status.append((name, value))
        elif name in _KEPT_RESERVED_TRAILERS or not _hop_specific(name):
            kept.append((name, value))
    return status + kept


def metadata_of(headers: Iterable[Header]) -> tuple[Metadatum, ...]:
    """The call's metadata as grpc would hand it to a handler: text values as str, `-bin`
    values base64-decoded; pseudo-headers and malformed binary values left out."""
    entries: list[Metadatum] = []
    for name, value in headers:
        if name[:1] == b":":
            continue
        key = name.decode("latin-1")
        if key.endswith("-bin"):
            try:
                padded = value + b"=" * (-len(value) % 4)
                entries.append((key, base64.b64decode(padded, validate=True)))
            except (binascii.Error, ValueError):
                continue
        else:
            entries.append((key, value.decode("latin-1")))
    return tuple(entries)


def parse_timeout(value: bytes) -> float | None:
    """Seconds of a grpc-timeout value ("100m"), or None if malformed."""
    if not 2 <= len(value) <= 9 or not value[:-1].isdigit():
        return None
    unit = _TIMEOUT_UNITS.get(value[-1:])
    return None if unit is None else int(value[:-1]) * unit


def format_timeout(seconds: float) -> bytes:
    """A grpc-timeout value for `seconds` (at least 1 microsecond, at most 8 digits)."""
    micros = max(1, int(seconds * 1_000_000))
    if micros < 100_000_000:
        return b"%du" % micros
    millis = micros // 1000
    if millis < 100_000_000:
        return b"%dm" % millis
    for unit, size in ((b"S", 1), (b"M", 60), (b"H", 3600)):
        count = micros // (1_000_000 * size)
        if count < 100_000_000:
            return b"%d%s" % (count, unit)
    return b"99999999H"


def encode_message(message: str) -> bytes:
    """grpc-message value: percent-encoded UTF-8 outside printable ASCII."""
    out = bytearray()
    for byte in message.encode("utf-8"):
        if 0x20 <= byte <= 0x7E and byte != 0x25:
            out.append(byte)
        else:
            out += b"%%%02X" % byte
    return bytes(out)


def encode_metadata(entries: Iterable[tuple[str, str | bytes]]) -> list[Header]:
    """gRPC metadata as header fields (`-bin` values base64, unpadded)."""
    headers: list[Header] = []
    for key, value in entries:
        if isinstance(value, bytes):
            headers.append((key.encode(), base64.b64encode(value).rstrip(b"=")))
        else:
            headers.append((key.encode(), value.encode("latin-1", "replace")))
    return headers


def status_trailers(
    code: grpc.StatusCode, message: str, metadata: Iterable[tuple[str, str | bytes]] = ()
) -> list[Header]:
    """grpc-status, grpc-message and trailing metadata."""
    return [
        (GRPC_STATUS, str(code.value[0]).encode()),
        (GRPC_MESSAGE, encode_message(message)),
        *encode_metadata(metadata),
    ]


def status_code_of(headers: Iterable[Header]) -> grpc.StatusCode:
    """The status code in trailers (UNKNOWN if absent or malformed)."""
    for name, value in headers:
        if name == GRPC_STATUS:
            return _CODES.get(value, grpc.StatusCode.UNKNOWN)
    return grpc.StatusCode.UNKNOWN


def http_status_code(headers: Iterable[Header]) -> grpc.StatusCode | None:
    """For a response whose :status is not 200, the gRPC code gRPC maps it to."""
    for name, value in headers:
        if name == b":status":
            if value == b"200":
                return None
            try:
                return _HTTP_TO_GRPC.get(int(value), grpc.StatusCode.UNKNOWN)
            except ValueError:
                return grpc.StatusCode.UNKNOWN
    return grpc.StatusCode.INTERNAL
