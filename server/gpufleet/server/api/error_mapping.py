"""The one place where exceptions become gRPC statuses.

Domain errors (gpufleet.server.errors) are answered with their gRPC code, a
google.rpc.ErrorInfo (reason, domain "gpufleet.dev", metadata) and, for InvalidArgument, a
google.rpc.BadRequest listing every field violation; all of it travels in the
`grpc-status-details-bin` trailer. Any other exception is logged with its traceback and
answered INTERNAL with a short message: tracebacks never reach clients.

A request whose bytes do not parse as the method's request type is answered
INVALID_ARGUMENT: grpc would otherwise answer UNKNOWN from its deserializer before any
handler runs, so the deserializer here never raises and the handler's wrapper refuses the
request instead.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, NoReturn, cast

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from gpufleet.server import errors

_log = logging.getLogger(__name__)

ERROR_DOMAIN = "gpufleet.dev"

# Most specific first: subclasses must come before their bases.
_CODES: tuple[tuple[type[errors.GpufleetError], grpc.StatusCode], ...] = (
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (errors.RevisionMismatch, grpc.StatusCode.ABORTED),
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.OutOfRange, grpc.StatusCode.OUT_OF_RANGE),
    (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
)

INTERNAL_MESSAGE = "internal error in the gpufleet control plane; the server log has details"

if TYPE_CHECKING:
    _Context = grpc.aio.ServicerContext[Any, Any]
    _InterceptorBase = grpc.aio.ServerInterceptor[Any, Any]
    _Handler = grpc.RpcMethodHandler[Any, Any]
else:
    _Context = Any
    _InterceptorBase = grpc.aio.ServerInterceptor
    _Handler = grpc.RpcMethodHandler


def status_code_of(err: errors.GpufleetError) -> grpc.StatusCode:
    """The gRPC code a domain error is answered with."""
    for error_type, code in _CODES:
        if isinstance(err, error_type):
            return code
    return grpc.StatusCode.INTERNAL


# Errors echo client input (names, field paths, values), and grpc clients start dropping
# responses whose metadata passes 8 KiB (the message travels twice, and the binary details
# base64-encoded): the client would then see RESOURCE_EXHAUSTED "Stream removed" instead of
# the error. These bounds keep a status under about 5 KiB, whatever the request held.
_MAX_MESSAGE_CHARS = 512
_MAX_DETAIL_CHARS = 96
_MAX_VIOLATIONS = 8


MAX_MESSAGE_CHARS = _MAX_MESSAGE_CHARS
"""The longest status message any gpufleet server sends (the gateway uses it too)."""
MAX_DETAIL_CHARS = _MAX_DETAIL_CHARS
"""The longest ErrorInfo metadata key or value, or BadRequest field path."""


def clip_text(text: str, limit: int) -> str:
    """`text` cut to `limit` characters, marked with an ellipsis when cut."""
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


_clip = clip_text


def to_rpc_status(err: errors.GpufleetError) -> grpc.Status:
    """Build the status (code, message, rich details trailer) for a domain error."""
    code = status_code_of(err)
    status = status_pb2.Status(code=code.value[0], message=_clip(err.message, _MAX_MESSAGE_CHARS))
    info = error_details_pb2.ErrorInfo(
        reason=err.reason,
        domain=ERROR_DOMAIN,
        metadata={
            _clip(key, _MAX_DETAIL_CHARS): _clip(value, _MAX_DETAIL_CHARS)
            for key, value in err.metadata.items()
        },
    )
    status.details.add().Pack(info)
    if isinstance(err, errors.InvalidArgument):
        shown = err.violations[:_MAX_VIOLATIONS]
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=_clip(v.field, _MAX_DETAIL_CHARS),
                    description=_clip(v.description, _MAX_DETAIL_CHARS * 2),
                )
                for v in shown
            ]
        )
        if len(err.violations) > len(shown):
            bad_request.field_violations.add(
                field="...",
                description=f"{len(err.violations) - len(shown)} more violations not listed; "
                "fix these and send again to see the rest",
            )
        status.details.add().Pack(bad_request)
    return rpc_status.to_status(status)


async def abort_with(context: _Context, err: errors.GpufleetError) -> NoReturn:
    """End the call with the status of a domain error."""
    status = to_rpc_status(err)
    await context.abort(status.code, status.details, status.trailing_metadata)


async def _answer(context: _Context, method: str, exc: Exception) -> NoReturn:
    if isinstance(exc, errors.GpufleetError):
        await abort_with(context, exc)
    _log.error("unexpected error in %s", method, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)


class UndecodableRequest:
    """Stands in for a request whose bytes are not a message of the method's request type."""

    __slots__ = ("problem",)

    def __init__(self, problem: str) -> None:
        self.problem = problem


def tolerant_deserializer(
    deserializer: Callable[[bytes], Any] | None,
) -> Callable[[bytes], Any] | None:
    """`deserializer`, returning an UndecodableRequest where it would raise."""
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # noqa: BLE001 - DecodeError, or whatever a custom one raises
            return UndecodableRequest(str(exc) or type(exc).__name__)

    return deserialize


def _undecodable(method: str, request: UndecodableRequest) -> errors.InvalidArgument:
    return errors.InvalidArgument(
        [],
        message=f"the request to {method} is not a valid protobuf message of the method's "
        f"request type ({request.problem}); send the request message its .proto declares",
    )


def _decoded(request: Any, method: str, streaming: bool) -> Any:
    """The request, or for a request stream one that raises InvalidArgument at the first
    undecodable message; raises InvalidArgument for an undecodable unary request."""
    if not streaming:
        if isinstance(request, UndecodableRequest):
            raise _undecodable(method, request)
        return request

    async def checked() -> AsyncIterator[Any]:
        async for item in request:
            if isinstance(item, UndecodableRequest):
                raise _undecodable(method, item)
            yield item

    return checked()


def _unary_response(
    behavior: Callable[..., Any], method: str, streaming: bool
) -> Callable[..., Awaitable[Any]]:
    async def wrapped(request: Any, context: _Context) -> Any:
        try:
            result = behavior(_decoded(request, method, streaming), context)
            return await result if inspect.isawaitable(result) else result
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - the point of this module
            await _answer(context, method, exc)

    return wrapped


def _stream_response(
    behavior: Callable[..., Any], method: str, streaming: bool
) -> Callable[..., Any]:
    # grpc.aio tells streaming styles apart by the behavior's kind, so the wrapper must be
    # an async generator exactly when the wrapped behavior is one.
    if inspect.isasyncgenfunction(behavior):

        async def wrapped_gen(request: Any, context: _Context) -> AsyncIterator[Any]:
            try:
                async for response in behavior(_decoded(request, method, streaming), context):
                    yield response
            except grpc.aio.AbortError:
                raise
            except Exception as exc:  # noqa: BLE001
                await _answer(context, method, exc)

        return wrapped_gen
    return _unary_response(behavior, method, streaming)


def wrap_handler(handler: _Handler, method: str) -> _Handler:
    """Return a handler of the same kind whose behavior maps exceptions to statuses and
    whose undecodable requests are refused with INVALID_ARGUMENT."""
    deserializer = tolerant_deserializer(handler.request_deserializer)
    serializer = handler.response_serializer
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(
            _stream_response(cast(Callable[..., Any], handler.stream_stream), method, True),
            deserializer,
            serializer,
        )
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(
            _unary_response(cast(Callable[..., Any], handler.stream_unary), method, True),
            deserializer,
            serializer,
        )
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(
            _stream_response(cast(Callable[..., Any], handler.unary_stream), method, False),
            deserializer,
            serializer,
        )
    return grpc.unary_unary_rpc_method_handler(
        _unary_response(cast(Callable[..., Any], handler.unary_unary), method, False),
        deserializer,
        serializer,
    )


class ErrorMappingInterceptor(_InterceptorBase):
    """Server interceptor applying `wrap_handler` to every method of every service."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[_Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> _Handler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        return wrap_handler(handler, handler_call_details.method)


class DecodeGuardInterceptor(_InterceptorBase):
    """Applies `wrap_handler` only to methods that deserialize their requests, so that
    undecodable bytes get INVALID_ARGUMENT instead of grpc's UNKNOWN. For a server whose
    hot methods take raw bytes (the gateway): those handlers are passed through untouched
    and cost nothing extra."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[_Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> _Handler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        return wrap_handler(handler, handler_call_details.method)

