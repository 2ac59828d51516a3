"""What the call path tells the gateway's metrics about each call, and nothing more.

The dispatcher (dispatch.py) is the one place on the call path that reports: it sees a call
arrive at a deployment, admission refuse or admit it, and (through the `CallTarget` it
returns) the call end. The kind of call (`model_infer`, `proxy`, ...) comes from the
handler wrapper (handlers.guarded), which sets `CALL_KIND` for the call's task.

`CallObserver` is a Protocol so that dispatch.py does not depend on prometheus_client;
gateway/metrics.py implements it.
"""

from __future__ import annotations

import asyncio
from contextvars import ContextVar
from typing import Any, Protocol

import grpc

from gpufleet.gateway.rpc_errors import CallError

UNKNOWN_DEPLOYMENT = "_unknown"
"""`deployment` label of calls naming no deployment the gateway knows. Deployment names are
[a-z0-9-], so it cannot collide with one, and unknown names never become label values."""

OTHER_KIND = "other"
"""`kind` of a call admitted outside a guarded handler (no kind was set)."""

CALL_KIND: ContextVar[str] = ContextVar("gpufleet_gateway_call_kind", default=OTHER_KIND)
"""The handler kind of the call running in this task, set by handlers.guarded."""

INSTANCE_STATUS = "INSTANCE_STATUS"
"""`reason` of a non-OK status the instance returned (the gateway passed it through)."""
CLIENT_CANCELLED = "CLIENT_CANCELLED"
"""`reason` of a call the client cancelled (or whose connection dropped)."""
DEADLINE_PASSED = "DEADLINE_PASSED"
"""`reason` of a call whose own deadline passed while the gateway was forwarding it."""
GATEWAY_INTERNAL = "GATEWAY_INTERNAL"
"""`reason` of a call that failed on an unexpected error in the gateway (a bug; see its log)."""


class CallObserver(Protocol):
    """Receives the life of each call sent to a deployment; every method runs on the event
    loop, must be quick and must not raise."""

    def arrived(self, deployment: str, kind: str) -> None:
        """A call for `deployment` (UNKNOWN_DEPLOYMENT when the name is unknown) arrived."""

    def cold_start(self, deployment: str) -> None:
        """The call passed the token and route rule checks and found no ready instance: it
        waits for one to start (or is refused)."""

    def rejected(self, deployment: str, kind: str, code: grpc.StatusCode, reason: str) -> None:
        """The gateway refused the call before it reached an instance (`reason` is the
        ErrorInfo reason it sent)."""

    def admitted(self, deployment: str, kind: str, cold: bool, waited_s: float) -> None:
        """The call got a slot on an instance `waited_s` seconds after it arrived; `cold`:
        it was a cold start."""

    def ended(
        self,
        deployment: str,
        kind: str,
        code: grpc.StatusCode,
        reason: str,
        seconds: float | None,
    ) -> None:
        """The call ended with `code` (OK included; `reason` empty then). `seconds` from
        arrival to the end for a call that reached an instance; None for one that left the
        queue without reaching any (cancelled while waiting)."""


class NullObserver:
    """Observes nothing (a dispatcher built without metrics)."""

    def arrived(self, deployment: str, kind: str) -> None:
        return None

    def cold_start(self, deployment: str) -> None:
        return None

    def rejected(self, deployment: str, kind: str, code: grpc.StatusCode, reason: str) -> None:
        return None

    def admitted(self, deployment: str, kind: str, cold: bool, waited_s: float) -> None:
        return None

    def ended(
        self,
        deployment: str,
        kind: str,
        code: grpc.StatusCode,
        reason: str,
        seconds: float | None,
    ) -> None:
        return None


NULL_OBSERVER = NullObserver()


class CallContext(Protocol):
    """What the dispatcher reads from a call: a grpc.aio ServicerContext, or the HTTP/2
    front's own call context."""

    def time_remaining(self) -> float | None:
        """Seconds left before the call's deadline; None without one."""

    def peer(self) -> str:
        """The client connection (per-connection limits count by it)."""

    def code(self) -> Any:
        """The status code set on the call so far (grpc.StatusCode), or None."""


def call_outcome(
    error: BaseException | None, context: CallContext
) -> tuple[grpc.StatusCode, str]:
    """The status code and reason a forwarded call ended with, from the exception that ended
    its `with target:` block (None: it returned normally)."""
    if error is None:
        return grpc.StatusCode.OK, ""
    if isinstance(error, CallError):
        return error.code, error.reason
    if isinstance(error, grpc.aio.AbortError):
        # forward.py aborts only to pass the instance's own status on.
        code: grpc.StatusCode | None = context.code()
        return code or grpc.StatusCode.UNKNOWN, INSTANCE_STATUS
    if isinstance(error, asyncio.CancelledError):
        # Typed as float, but None when the call has no deadline.
        remaining: float | None = context.time_remaining()
        if remaining is not None and remaining <= 0:
            return grpc.StatusCode.DEADLINE_EXCEEDED, DEADLINE_PASSED
        return grpc.StatusCode.CANCELLED, CLIENT_CANCELLED
    return grpc.StatusCode.INTERNAL, GATEWAY_INTERNAL
