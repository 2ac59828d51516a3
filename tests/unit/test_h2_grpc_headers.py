"""gRPC header handling of the gateway's HTTP/2 front: the same crossing rules as the
grpc.aio path (gateway/metadata.py), deadlines and statuses on the wire."""

from __future__ import annotations

import base64

import grpc
import pytest

from gpufleet.gateway import metadata
from gpufleet.gateway.h2 import grpc_headers as gh

CLIENT_HEADERS = [
    (b":method", b"POST"),
    (b":path", b"/inference.GRPCInferenceService/ModelInfer"),
    (b":authority", b"gw:8001"),
    (b"content-type", b"application/grpc"),
    (b"te", b"trailers"),
    (b"user-agent", b"grpc-python/1.81"),
    (b"grpc-timeout", b"5S"),
    (b"grpc-accept-encoding", b"identity,gzip"),
    (b"authorization", b"Bearer secret"),
    (b"gpufleet-deployment", b"resnet"),
    (b"deploy-route-rule", b"instance-id:abc"),
    (b"x-request-id", b"42"),
    (b"trace-bin", base64.b64encode(b"\x00\x01\xff").rstrip(b"=")),
]


def test_request_headers_cross_like_the_grpc_path() -> None:
    forwarded = gh.request_headers_to_forward(CLIENT_HEADERS)
    assert forwarded == [(b"x-request-id", b"42"), CLIENT_HEADERS[-1]]
    as_metadata = metadata.request_metadata_to_forward(gh.metadata_of(CLIENT_HEADERS))
    assert as_metadata == (("x-request-id", "42"), ("trace-bin", b"\x00\x01\xff"))


def test_metadata_of_decodes_binary_values_and_skips_pseudo_headers() -> None:
    entries = dict(gh.metadata_of(CLIENT_HEADERS))
    assert ":path" not in entries
    assert entries["authorization"] == "Bearer secret"
    assert entries["trace-bin"] == b"\x00\x01\xff"
    assert gh.metadata_of([(b"bad-bin", b"!!!")]) == ()


def test_response_headers_and_trailers_cross_like_the_grpc_path() -> None:
    headers = [(b":status", b"200"), (b"content-type", b"application/grpc"),
               (b"deploy-route-target", b"spoofed"), (b"x-model-version", b"3")]
    assert gh.response_headers_to_return(headers) == [(b"x-model-version", b"3")]
    trailers = [(b"x-took-ms", b"5"), (b"grpc-status", b"8"), (b"grpc-message", b"full"),
                (b"grpc-status-details-bin", b"AAA"), (b"grpc-retry-pushback-ms", b"100"),
                (b"grpc-other", b"x")]
    assert gh.trailers_to_return(trailers) == [
        (b"grpc-status", b"8"), (b"grpc-message", b"full"), (b"x-took-ms", b"5"),
        (b"grpc-status-details-bin", b"AAA"), (b"grpc-retry-pushback-ms", b"100"),
    ]


@pytest.mark.parametrize(
    "value, seconds",
    [(b"5S", 5.0), (b"100m", 0.1), (b"250u", 250e-6), (b"7n", 7e-9), (b"2M", 120.0),
     (b"1H", 3600.0), (b"99999999S", 99999999.0)],
)
def test_parse_timeout(value: bytes, seconds: float) -> None:
    assert gh.parse_timeout(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", [b"", b"5", b"S", b"5s", b"-5S", b"123456789S", b"1.5S"])
def test_parse_timeout_rejects_malformed_values(value: bytes) -> None:
    assert gh.parse_timeout(value) is None


@pytest.mark.parametrize("seconds", [1e-9, 0.0005, 0.25, 3.0, 150.0, 1e6, 1e9])
def test_format_timeout_round_trips_within_its_unit(seconds: float) -> None:
    value = gh.format_timeout(seconds)
    assert len(value) <= 9
    parsed = gh.parse_timeout(value)
    assert parsed is not None
    assert parsed == pytest.approx(max(seconds, 1e-6), rel=1e-2, abs=1e-6)


def test_grpc_message_is_percent_encoded() -> None:
    assert gh.encode_message("plain text") == b"plain text"
    assert gh.encode_message("100% sûr\n") == b"100%25 s%C3%BBr%0A"


def test_status_trailers_and_codes() -> None:
    trailers = gh.status_trailers(
        grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full",
        [("grpc-status-details-bin", b"\x08\x08"), ("grpc-retry-pushback-ms", "250")],
    )
    assert trailers == [(b"grpc-status", b"8"), (b"grpc-message", b"queue full"),
                        (b"grpc-status-details-bin", b"CAg"), (b"grpc-retry-pushback-ms", b"250")]
    assert gh.status_code_of(trailers) is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert gh.status_code_of([(b"grpc-status", b"x")]) is grpc.StatusCode.UNKNOWN
    assert gh.status_code_of([]) is grpc.StatusCode.UNKNOWN


@pytest.mark.parametrize(
    "status, code",
    [(b"200", None), (b"503", grpc.StatusCode.UNAVAILABLE), (b"404", grpc.StatusCode.UNIMPLEMENTED),
     (b"418", grpc.StatusCode.UNKNOWN), (b"abc", grpc.StatusCode.UNKNOWN)],
)
def test_http_status_maps_like_grpc(status: bytes, code: grpc.StatusCode | None) -> None:
    assert gh.http_status_code([(b":status", status)]) is code
