"""Domain errors of the control plane.

Plain exceptions with no gRPC in them: the store and the request handlers raise these, and
`gpufleet.server.api.error_mapping` is the one place that turns them into gRPC statuses with
rich details. Each error has a machine-readable `reason` (google.rpc.ErrorInfo.reason,
UPPER_SNAKE_CASE) and optional string `metadata` for ErrorInfo.metadata.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol


class FieldViolationLike(Protocol):
    """A field path and what is wrong with it (validation.FieldViolation fits)."""

    @property
    def field(self) -> str: ...

    @property
    def description(self) -> str: ...


@dataclass(frozen=True)
class Violation:
    """A request-level field violation raised outside the spec validator (paging, revision)."""

    field: str
    """Path of the offending request field, e.g. "page_token"."""
    description: str
    """What is wrong and how to fix it."""


class GpufleetError(Exception):
    """Base of every domain error; `str(err)` is the message shown to the caller."""

    default_reason = "ERROR"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata: dict[str, str] = dict(metadata or {})


class NotFound(GpufleetError):
    """The named object does not exist."""

    default_reason = "NOT_FOUND"


class AlreadyExists(GpufleetError):
    """An object with that name exists already."""

    default_reason = "ALREADY_EXISTS"


class RevisionMismatch(GpufleetError):
    """The caller's revision is not the stored one: someone changed the object meanwhile."""

    default_reason = "REVISION_MISMATCH"

    def __init__(self, kind: str, name: str, expected: int, actual: int) -> None:
        super().__init__(
            f"{kind} {name!r} is at revision {actual}, not {expected}: it changed since you "
            "read it; read it again and retry",
            metadata={"name": name, "expected_revision": str(expected), "revision": str(actual)},
        )
        self.expected = expected
        self.actual = actual


class InvalidArgument(GpufleetError):
    """The request is malformed; `violations` lists every bad field at once."""

    default_reason = "INVALID_ARGUMENT"

    def __init__(
        self, violations: Sequence[FieldViolationLike], message: str | None = None
    ) -> None:
        items = list(violations)
        if message is None:
            fields = ", ".join(dict.fromkeys(v.field for v in items))
            message = f"invalid request: {len(items)} field violation(s) in {fields}"
        super().__init__(message)
        self.violations: list[FieldViolationLike] = items


class FailedPrecondition(GpufleetError):
    """The object is in a state that does not allow the operation (e.g. being deleted)."""

    default_reason = "FAILED_PRECONDITION"


class OutOfRange(GpufleetError):
    """A revision outside the kept event history."""

    default_reason = "REVISION_COMPACTED"


class Unauthenticated(GpufleetError):
    """No credential was presented."""

    default_reason = "MISSING_TOKEN"


class PermissionDenied(GpufleetError):
    """The presented credential is wrong or does not allow the call."""

    default_reason = "INVALID_TOKEN"


class Unavailable(GpufleetError):
    """The server cannot serve the call now (shutting down); retrying later can succeed."""

    default_reason = "UNAVAILABLE"


class StartupError(Exception):
    """The server cannot start: bad configuration, unreadable files or an unusable state
    dir. The message says what is wrong and how to fix it; it is shown as one line."""
