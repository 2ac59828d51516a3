from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from gpufleet.gateway.errors import Code, GatewayError, Reason
from gpufleet.gateway.invoke_auth import check_invoke_token, token_sha256
from gpufleet.gateway.metadata import (
    bearer_token,
    first_text,
    first_value,
    headers_to_return,
    request_metadata_to_forward,
    trailers_to_return,
)
from gpufleet.gateway.rpc_errors import CallError


def test_request_metadata_drops_hop_and_gateway_keys() -> None:
    incoming = (
        ("user-agent", "grpc-python"),
        ("authorization", "Bearer secret"),
        ("gpufleet-deployment", "echo"),
        ("deploy-route-rule", "hash:session"),
        ("grpc-timeout", "5S"),
        (":authority", "gw"),
        ("session", "s1"),
        ("x-trace-bin", b"\x00"),
        ("te", "trailers"),
    )
    assert request_metadata_to_forward(incoming) == (("session", "s1"), ("x-trace-bin", b"\x00"))
    assert request_metadata_to_forward(None) == ()


def test_headers_name_the_instance_and_replace_a_forged_target() -> None:
    upstream = (("x-a", "1"), ("deploy-route-target", "forged"), ("grpc-encoding", "gzip"))
    assert headers_to_return(upstream, "echo-1") == (
        ("x-a", "1"),
        ("deploy-route-target", "echo-1"),
    )
    assert headers_to_return(None, "echo-1") == (("deploy-route-target", "echo-1"),)


def test_trailers_keep_rich_status_and_pushback() -> None:
    upstream = (
        ("grpc-status-details-bin", b"details"),
        ("grpc-retry-pushback-ms", "50"),
        ("grpc-message", "x"),
        ("x-t", "1"),
    )
    assert trailers_to_return(upstream) == (
        ("grpc-status-details-bin", b"details"),
        ("grpc-retry-pushback-ms", "50"),
        ("x-t", "1"),
    )


def test_first_value_and_text() -> None:
    metadata = (("k", "a"), ("k", "b"), ("k-bin", b"\x01"))
    assert first_value(metadata, "k") == "a"
    assert first_value(metadata, "k-bin") == b"\x01"
    assert first_text(metadata, "k-bin") is None
    assert first_value(None, "k") is None


@pytest.mark.parametrize(
    ("value", "token"),
    [
        ("Bearer abc", "abc"),
        ("bearer   abc ", "abc"),
        ("Basic abc", None),
        ("Bearer ", None),
        (b"Bearer abc", None),
    ],
)
def test_bearer_token(value: str | bytes, token: str | None) -> None:
    assert bearer_token((("authorization", value),)) == token


def test_invoke_token_checks() -> None:
    expected = token_sha256("right")
    check_invoke_token((("authorization", "Bearer right"),), "echo", expected)
    with pytest.raises(CallError) as missing:
        check_invoke_token((), "echo", expected)
    assert missing.value.code is grpc.StatusCode.UNAUTHENTICATED
    assert missing.value.reason == "MISSING_TOKEN"
    with pytest.raises(CallError) as wrong:
        check_invoke_token((("authorization", "Bearer wrong"),), "echo", expected)
    assert wrong.value.code is grpc.StatusCode.PERMISSION_DENIED
    assert "rotate-token echo" in wrong.value.message
    # A deployment without a token hash accepts nothing (fails closed).
    with pytest.raises(CallError) as none:
        check_invoke_token((("authorization", "Bearer x"),), "echo", "")
    assert none.value.code is grpc.StatusCode.PERMISSION_DENIED


def _status(err: CallError) -> tuple[status_pb2.Status, dict[str, str | bytes]]:
    trailers = dict(err.trailing_metadata())
    raw = trailers["grpc-status-details-bin"]
    assert isinstance(raw, bytes)
    return status_pb2.Status.FromString(raw), trailers


def test_gateway_error_becomes_status_with_error_info_and_pushback() -> None:
    err = CallError.from_gateway_error(
        GatewayError(
            Reason.QUEUE_FULL,
            Code.RESOURCE_EXHAUSTED,
            "queue full",
            retry_pushback_ms=250,
            metadata={"deployment": "echo"},
        )
    )
    assert err.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    status, trailers = _status(err)
    assert trailers["grpc-retry-pushback-ms"] == "250"
    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert status.message == "queue full"
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert (info.reason, info.domain, dict(info.metadata)) == (
        "QUEUE_FULL", "gpufleet.dev", {"deployment": "echo"}
    )


def test_bad_field_adds_a_bad_request() -> None:
    err = CallError(
        grpc.StatusCode.INVALID_ARGUMENT, "bad rule", reason="INVALID_METADATA",
        bad_field="deploy-route-rule",
    )
    status, trailers = _status(err)
    assert "grpc-retry-pushback-ms" not in trailers
    bad = error_details_pb2.BadRequest()
    assert status.details[1].Unpack(bad)
    assert [(v.field, v.description) for v in bad.field_violations] == [
        ("deploy-route-rule", "bad rule")
    ]


def test_call_errors_echoing_huge_input_stay_within_grpc_metadata_limits() -> None:
    from gpufleet.gateway.rpc_errors import CallError

    err = CallError(
        grpc.StatusCode.NOT_FOUND,
        "no deployment named " + "m" * 50_000,
        reason="ROUTE_TARGET_NOT_FOUND",
        metadata={"deployment": "m" * 50_000},
        bad_field="model_name",
    )
    size = len(err.message) + sum(len(key) + len(value) for key, value in err.trailing_metadata())
    assert size < 4 * 1024
    assert err.message.startswith("no deployment named mmm") and err.message.endswith("\u2026")
