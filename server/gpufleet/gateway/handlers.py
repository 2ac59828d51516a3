"""The one wrapper every gateway RPC behavior runs in: refusals become their status,
anything unexpected is logged and answered INTERNAL (no traceback reaches a client).

It also names the kind of call for the metrics: the behavior's name (`model_infer`,
`model_stream_infer`, `model_metadata`, `proxy`, ...) is set as `CALL_KIND` while it runs.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from gpufleet.gateway.call_observer import CALL_KIND, OTHER_KIND
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

    kind: str = getattr(behavior, "__name__", OTHER_KIND)

    @functools.wraps(behavior)
    async def wrapper(request: _Request, context: _Context) -> _Response:
        kind_token = CALL_KIND.set(kind)
        try:
            return await behavior(request, context)
        except CallError as err:
            await abort_call(context, err)
        except grpc.aio.AbortError:
            raise
        except Exception:  # noqa: BLE001 - the point of this wrapper
            _log.exception("unexpected error in %s", getattr(behavior, "__qualname__", "a call"))
            await context.abort(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)
        finally:
            CALL_KIND.reset(kind_token)

    return wrapper
