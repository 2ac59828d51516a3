"""The one wrapper every gateway RPC behavior runs in: refusals become their status,
anything unexpected is logged and answered INTERNAL (no traceback reaches a client)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from gpufleet.gateway.rpc_errors import CallError, abort_call

_log = logging.getLogger(__name__)

INTERNAL_MESSAGE = "internal error in the gpufleet gateway; the gateway log has details"

_Request = TypeVar("_Request")
_Response = TypeVar("_Response")
_Context = grpc.aio.ServicerContext[Any, Any]


def guarded(
    behavior: Callable[[_Request, _Context], Awaitable[_Response]],
) -> Callable[[_Request, _Context], Awaitable[_Response]]:
    """Wrap a unary or write-style streaming behavior (a coroutine function)."""

    @functools.wraps(behavior)
    async def wrapper(request: _Request, context: _Context) -> _Response:
        try:
            return await behavior(request, context)
        except CallError as err:
            await abort_call(context, err)
        except grpc.aio.AbortError:
            raise
        except Exception:  # noqa: BLE001 - the point of this wrapper
            _log.exception("unexpected error in %s", getattr(behavior, "__qualname__", "a call"))
            await context.abort(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)

    return wrapper
