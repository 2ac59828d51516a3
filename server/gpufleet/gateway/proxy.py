"""Transparent proxy for every method the gateway does not serve itself.

The deployment (or service) comes from request metadata `gpufleet-deployment`. The call
is admitted like an inference call (token, route rule, slot) and forwarded as raw bytes.
The handler is bidi-streaming whatever the method: the gateway cannot know a user
service's call kind, and on the wire unary, client-, server- and bidi-streaming calls are
all streams of messages, so one handler forwards all four unchanged.

Register `ProxyHandler` after every other handler: it claims every method.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc

from gpufleet.gateway.dispatch import Dispatcher
from gpufleet.gateway.forward import StreamWriter, forward_stream
from gpufleet.gateway.handlers import guarded
from gpufleet.gateway.metadata import (
    DEPLOYMENT_METADATA_KEY,
    first_text,
    request_metadata_to_forward,
)
from gpufleet.gateway.rpc_errors import INVALID_METADATA, CallError

if TYPE_CHECKING:
    _GenericHandler = grpc.GenericRpcHandler[Any, Any]
    _MethodHandler = grpc.RpcMethodHandler[Any, Any]
else:
    _GenericHandler = grpc.GenericRpcHandler
    _MethodHandler = grpc.RpcMethodHandler

_GRPC_INFRASTRUCTURE = "grpc."
_Context = grpc.aio.ServicerContext[Any, Any]
_Behavior = Callable[[AsyncIterator[bytes], _Context], Awaitable[None]]


class ProxyHandler(_GenericHandler):
    """Claims every method and forwards it to the deployment named in its metadata."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self._dispatcher = dispatcher

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> _MethodHandler | None:
        return grpc.stream_stream_rpc_method_handler(
            guarded(self._behavior(handler_call_details.method))
        )

    def _behavior(self, method: str) -> _Behavior:
        async def proxy(requests: AsyncIterator[bytes], context: _Context) -> None:
            await self.forward(method, requests, context)

        return proxy

    async def forward(
        self, method: str, requests: AsyncIterator[bytes], context: _Context
    ) -> None:
        """Admit and forward one call of `method`."""
        metadata = context.invocation_metadata()
        name = first_text(metadata, DEPLOYMENT_METADATA_KEY)
        if not name and method.lstrip("/").startswith(_GRPC_INFRASTRUCTURE):
            # grpc's own services (reflection v1, channelz, ...) that the gateway does not
            # serve: UNIMPLEMENTED lets tools fall back, as grpcurl does to reflection v1alpha.
            raise CallError(
                grpc.StatusCode.UNIMPLEMENTED,
                f"the gateway does not serve {method}; to reach a deployment's own, set "
                f"request metadata '{DEPLOYMENT_METADATA_KEY}: <deployment name>'",
                reason="METHOD_NOT_SERVED",
            )
        if not name:
            raise CallError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the gateway does not serve {method} itself; set request metadata "
                f"'{DEPLOYMENT_METADATA_KEY}: <deployment name>' to send the call to a "
                "deployment",
                reason=INVALID_METADATA,
                bad_field=DEPLOYMENT_METADATA_KEY,
            )
        with await self._dispatcher.admit(name.strip(), context, metadata) as target:
            writer = StreamWriter(context)
            await forward_stream(
                context,
                target.upstream.stream_stream(method),
                requests,
                writer,
                metadata=request_metadata_to_forward(metadata),
                timeout=context.time_remaining(),
                route_target=target.instance_id,
            )
