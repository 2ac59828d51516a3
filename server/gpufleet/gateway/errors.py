"""Gateway error reasons and the one exception that carries them.

The pure gateway modules know nothing about gRPC: a `GatewayError` names its status code by
the `grpc.StatusCode` member name, so the I/O layer maps it with `grpc.StatusCode[err.code]`
and builds the `google.rpc.ErrorInfo` (reason, `ERROR_DOMAIN`, metadata) and, when
`retry_pushback_ms` is set, the `grpc-retry-pushback-ms` trailer.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum

ERROR_DOMAIN = "gpufleet.dev"
"""`google.rpc.ErrorInfo.domain` of every gateway error; the control plane uses the same."""

RETRY_PUSHBACK_METADATA_KEY = "grpc-retry-pushback-ms"
"""Trailer that tells gRPC's retry machinery how long to wait (milliseconds)."""


class Reason(StrEnum):
    """`google.rpc.ErrorInfo.reason` values from DESIGN.md's error table."""

    ROUTE_TARGET_NOT_FOUND = "ROUTE_TARGET_NOT_FOUND"
    REPLICA_QUOTA_EXCEEDED = "REPLICA_QUOTA_EXCEEDED"
    QUEUE_FULL = "QUEUE_FULL"
    RATE_LIMITED = "RATE_LIMITED"
    QUEUE_TIMEOUT = "QUEUE_TIMEOUT"


class Code(StrEnum):
    """gRPC status codes the gateway's admission errors use, by `grpc.StatusCode` name."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    UNAVAILABLE = "UNAVAILABLE"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"


class GatewayError(Exception):
    """A call the gateway refuses or gives up on, with everything the status needs."""

    def __init__(
        self,
        reason: Reason,
        code: Code,
        message: str,
        *,
        retry_pushback_ms: int | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        """ErrorInfo reason."""
        self.code = code
        """gRPC status code name."""
        self.message = message
        """Status message for the caller: what happened and what to do about it."""
        self.retry_pushback_ms = retry_pushback_ms
        """Suggested wait before a retry, in milliseconds; None sends no pushback trailer."""
        self.metadata: dict[str, str] = dict(metadata or {})
        """ErrorInfo metadata, e.g. {"deployment": "echo"}."""

    def __repr__(self) -> str:
        return (
            f"GatewayError(reason={self.reason.value}, code={self.code.value}, "
            f"message={self.message!r}, retry_pushback_ms={self.retry_pushback_ms})"
        )
