"""gRPC statuses of the calls the gateway itself refuses.

Every refusal carries a `google.rpc.Status` in the `grpc-status-details-bin` trailer with a
`google.rpc.ErrorInfo` (reason, domain, metadata), plus a `google.rpc.BadRequest` when a
request field or metadata key is at fault, and `grpc-retry-pushback-ms` when the error
suggests a retry delay (QUEUE_FULL, RATE_LIMITED).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NoReturn

import grpc
from google.rpc import error_details_pb2, status_pb2

from gpufleet.gateway.errors import ERROR_DOMAIN, RETRY_PUSHBACK_METADATA_KEY, GatewayError
from gpufleet.server.api.error_mapping import MAX_DETAIL_CHARS, MAX_MESSAGE_CHARS, clip_text

STATUS_DETAILS_KEY = "grpc-status-details-bin"

MISSING_TOKEN = "MISSING_TOKEN"
INVALID_TOKEN = "INVALID_TOKEN"
INVALID_METADATA = "INVALID_METADATA"
INVALID_REQUEST = "INVALID_REQUEST"


class CallError(Exception):
    """A call the gateway ends itself, with everything its status needs."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        reason: str,
        metadata: Mapping[str, str] | None = None,
        bad_field: str | None = None,
        retry_pushback_ms: int | None = None,
    ) -> None:
        # Messages and metadata echo client input (a model name, a metadata value): bounded
        # like the control plane's, so the status always fits grpc's metadata limit.
        message = clip_text(message, MAX_MESSAGE_CHARS)
        super().__init__(message)
        self.code = code
        """gRPC status code."""
        self.message = message
        """Status message: what was wrong and how to fix it."""
        self.reason = reason
        """ErrorInfo reason."""
        self.metadata: dict[str, str] = {
            clip_text(key, MAX_DETAIL_CHARS): clip_text(value, MAX_DETAIL_CHARS)
            for key, value in (metadata or {}).items()
        }
        """ErrorInfo metadata."""
        self.bad_field = bad_field
        """Request field or metadata key at fault (sent as a BadRequest field violation)."""
        self.retry_pushback_ms = retry_pushback_ms
        """Suggested retry delay in milliseconds, or None."""

    @classmethod
    def from_gateway_error(cls, err: GatewayError) -> CallError:
        """The status of an admission error (queue, rate limit, routing)."""
        return cls(
            grpc.StatusCode[err.code.value],
            err.message,
            reason=err.reason.value,
            metadata=err.metadata,
            retry_pushback_ms=err.retry_pushback_ms,
        )

    def trailing_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        """The trailers: rich status details, and the pushback when there is one."""
        status = status_pb2.Status(code=self.code.value[0], message=self.message)
        info = error_details_pb2.ErrorInfo(
            reason=self.reason, domain=ERROR_DOMAIN, metadata=self.metadata
        )
        status.details.add().Pack(info)
        if self.bad_field is not None:
            bad_request = error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=self.bad_field, description=self.message
                    )
                ]
            )
            status.details.add().Pack(bad_request)
        trailers: list[tuple[str, str | bytes]] = [
            (STATUS_DETAILS_KEY, status.SerializeToString())
        ]
        if self.retry_pushback_ms is not None:
            trailers.append((RETRY_PUSHBACK_METADATA_KEY, str(self.retry_pushback_ms)))
        return tuple(trailers)

    def __repr__(self) -> str:
        return f"CallError({self.code.name}, reason={self.reason}, message={self.message!r})"


async def abort_call(context: grpc.aio.ServicerContext[Any, Any], err: CallError) -> NoReturn:
    """End the call with `err`'s status."""
    await context.abort(err.code, err.message, err.trailing_metadata())
