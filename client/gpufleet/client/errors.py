"""RPCError: the one exception the SDK raises, keeping the server's rich status details."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple, cast

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status


class FieldViolation(NamedTuple):
    """One invalid field of a request, from a google.rpc.BadRequest detail."""

    field: str
    """Path of the field, e.g. ``deployment.spec.gpu.core_percent``."""
    description: str
    """What is wrong with it and what is allowed."""


Metadatum = tuple[str, str | bytes]


class RPCError(Exception):
    """A failed call to the control plane, with the status details the server attached.

    Every SDK method raises only this class for failed calls, connection failures included
    (they arrive as ``UNAVAILABLE``).
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        field_violations: Sequence[FieldViolation] = (),
        reason: str = "",
        domain: str = "",
        metadata: Mapping[str, str] | None = None,
        trailing_metadata: Sequence[Metadatum] = (),
        status: status_pb2.Status | None = None,
    ) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        """gRPC status code."""
        self.message = message
        """Status message sent by the server (or by gRPC for transport failures)."""
        self.field_violations = list(field_violations)
        """Invalid fields as (field, description), from google.rpc.BadRequest; empty if none."""
        self.reason = reason
        """google.rpc.ErrorInfo reason, e.g. ``QUEUE_FULL``; empty if none."""
        self.domain = domain
        """google.rpc.ErrorInfo domain; empty if none."""
        self.metadata: dict[str, str] = dict(metadata or {})
        """google.rpc.ErrorInfo metadata; empty if none."""
        self.trailing_metadata = tuple(trailing_metadata)
        """The call's raw trailing metadata (e.g. ``grpc-retry-pushback-ms``)."""
        self.status = status
        """The decoded google.rpc.Status, or None when the server sent no details."""

    @classmethod
    def from_grpc(cls, error: grpc.RpcError) -> RPCError:
        """Build an RPCError from a failed sync or asyncio gRPC call."""
        code = error.code()
        message = error.details() or ""
        trailing = _metadata_pairs(error)
        try:
            # Asyncio errors have the same synchronous accessors as a finished sync Call.
            status = rpc_status.from_call(cast(grpc.Call, error))
        except (ValueError, DecodeError):
            # A status proto that contradicts the call's own code or cannot be decoded is
            # not trusted; the plain code and message still describe the failure.
            status = None
        if not isinstance(status, status_pb2.Status):
            return cls(code, message, trailing_metadata=trailing)
        violations: list[FieldViolation] = []
        info = error_details_pb2.ErrorInfo()
        for detail in status.details:
            if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad_request = error_details_pb2.BadRequest()
                detail.Unpack(bad_request)
                violations.extend(
                    FieldViolation(v.field, v.description) for v in bad_request.field_violations
                )
            elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                detail.Unpack(info)
        return cls(
            code,
            message,
            field_violations=violations,
            reason=info.reason,
            domain=info.domain,
            metadata=dict(info.metadata),
            trailing_metadata=trailing,
            status=status,
        )


def _metadata_pairs(error: grpc.RpcError) -> tuple[Metadatum, ...]:
    # Sync calls return a tuple of (key, value) named tuples, asyncio calls a grpc.aio.Metadata
    # that iterates as (key, value) tuples: both unpack as pairs.
    raw = cast(Iterable[tuple[str, str | bytes]], error.trailing_metadata() or ())
    return tuple((str(key), value) for key, value in raw)
