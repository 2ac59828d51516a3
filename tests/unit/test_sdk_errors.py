"""RPCError keeps the rich status details of a failed call (sync and asyncio shapes)."""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc import aio

from gpufleet.client.errors import FieldViolation, RPCError

DETAILS_KEY = "grpc-status-details-bin"


class _FailedCall(grpc.RpcError, grpc.Call):
    """The shape of a failed sync call: code, details and trailing metadata."""

    def __init__(
        self, code: grpc.StatusCode, details: str, trailing: tuple[tuple[str, str | bytes], ...]
    ):
        super().__init__()
        self._code = code
        self._details = details
        self._trailing = trailing

    def code(self):
        return self._code

    def details(self):
        return self._details

    def trailing_metadata(self):
        return self._trailing

    def initial_metadata(self):
        return ()

    def is_active(self):
        return False

    def time_remaining(self):
        return None

    def cancel(self):
        return False

    def add_callback(self, callback):
        return False


def _packed(message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def _invalid_spec_status() -> status_pb2.Status:
    bad_request = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(
                field="spec.gpu.core_percent", description="must be 1-100, got 150"
            ),
            error_details_pb2.BadRequest.FieldViolation(
                field="spec.port", description="must be 0-65535, got 70000"
            ),
        ]
    )
    info = error_details_pb2.ErrorInfo(
        reason="INVALID_SPEC", domain="gpufleet.dev", metadata={"name": "echo"}
    )
    return status_pb2.Status(
        code=code_pb2.INVALID_ARGUMENT,
        message="invalid deployment spec",
        details=[_packed(bad_request), _packed(info)],
    )


def test_sync_error_keeps_field_violations_and_error_info() -> None:
    status = _invalid_spec_status()
    trailing = ((DETAILS_KEY, status.SerializeToString()), ("x-extra", "1"))
    error = RPCError.from_grpc(
        _FailedCall(grpc.StatusCode.INVALID_ARGUMENT, "invalid deployment spec", trailing)
    )
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.message == "invalid deployment spec"
    assert error.field_violations == [
        ("spec.gpu.core_percent", "must be 1-100, got 150"),
        ("spec.port", "must be 0-65535, got 70000"),
    ]
    assert isinstance(error.field_violations[0], FieldViolation)
    assert (error.reason, error.domain, error.metadata) == (
        "INVALID_SPEC",
        "gpufleet.dev",
        {"name": "echo"},
    )
    assert ("x-extra", "1") in error.trailing_metadata
    assert error.status == status
    assert str(error) == "INVALID_ARGUMENT: invalid deployment spec"


def test_asyncio_error_is_decoded_the_same_way() -> None:
    status = _invalid_spec_status()
    aio_error = aio.AioRpcError(
        grpc.StatusCode.INVALID_ARGUMENT,
        aio.Metadata(),
        aio.Metadata((DETAILS_KEY, status.SerializeToString())),
        details="invalid deployment spec",
        debug_error_string=None,
    )
    error = RPCError.from_grpc(aio_error)
    assert [v.field for v in error.field_violations] == ["spec.gpu.core_percent", "spec.port"]
    assert error.reason == "INVALID_SPEC"


def test_error_info_alone_carries_the_reason() -> None:
    status = status_pb2.Status(
        code=code_pb2.RESOURCE_EXHAUSTED,
        message="queue full",
        details=[_packed(error_details_pb2.ErrorInfo(reason="QUEUE_FULL"))],
    )
    error = RPCError.from_grpc(
        _FailedCall(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "queue full",
            ((DETAILS_KEY, status.SerializeToString()), ("grpc-retry-pushback-ms", "250")),
        )
    )
    assert error.reason == "QUEUE_FULL" and error.field_violations == []
    assert ("grpc-retry-pushback-ms", "250") in error.trailing_metadata


def test_a_plain_status_has_no_details() -> None:
    error = RPCError.from_grpc(
        _FailedCall(grpc.StatusCode.NOT_FOUND, "deployment 'x' not found", ())
    )
    assert (error.code, error.message) == (grpc.StatusCode.NOT_FOUND, "deployment 'x' not found")
    assert error.status is None and error.field_violations == [] and error.reason == ""


def test_a_status_contradicting_the_call_is_not_trusted() -> None:
    status = _invalid_spec_status()
    error = RPCError.from_grpc(
        _FailedCall(grpc.StatusCode.INTERNAL, "boom", ((DETAILS_KEY, status.SerializeToString()),))
    )
    assert error.code == grpc.StatusCode.INTERNAL and error.message == "boom"
    assert error.status is None and error.field_violations == []


def test_undecodable_details_are_ignored() -> None:
    error = RPCError.from_grpc(
        _FailedCall(grpc.StatusCode.INTERNAL, "boom", ((DETAILS_KEY, b"\xff\xff\xff"),))
    )
    assert error.code == grpc.StatusCode.INTERNAL and error.status is None
