"""Bearer-token authentication for the gRPC services that ask for it.

`BearerAuthInterceptor` guards only the services it is given, each with its own verifier:
the admin API and the routing API take the admin token; health and reflection are not
listed and stay open. NodeService (node credentials) plugs in by adding its service name
with a verifier of its own.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import grpc

from gpufleet.server import errors
from gpufleet.server.api.error_mapping import abort_with
from gpufleet.server.tokens import tokens_equal
from gpufleet.v1 import deployment_service_pb2, routing_service_pb2

TokenVerifier = Callable[[str], bool]
"""Says whether a presented bearer token is accepted."""

DEPLOYMENT_SERVICE = (
    deployment_service_pb2.DESCRIPTOR.services_by_name["DeploymentService"].full_name
)
ROUTING_SERVICE = routing_service_pb2.DESCRIPTOR.services_by_name["RoutingService"].full_name
ADMIN_SERVICES = (DEPLOYMENT_SERVICE, ROUTING_SERVICE)
"""Services that need the admin token."""

if TYPE_CHECKING:
    _Context = grpc.aio.ServicerContext[Any, Any]
    _InterceptorBase = grpc.aio.ServerInterceptor[Any, Any]
    _Handler = grpc.RpcMethodHandler[Any, Any]
else:
    _Context = Any
    _InterceptorBase = grpc.aio.ServerInterceptor
    _Handler = grpc.RpcMethodHandler


def admin_token_verifier(admin_token: str) -> TokenVerifier:
    """Accept exactly the admin token (constant-time compare)."""

    def verify(presented: str) -> bool:
        return tokens_equal(presented, admin_token)

    return verify


def bearer_token(metadata: Any) -> str | None:
    """The token of the first `authorization: Bearer <token>` entry, or None."""
    for key, value in metadata or ():
        if key.lower() != "authorization" or not isinstance(value, str):
            continue
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return None


def service_of(method: str) -> str:
    """"/pkg.Service/Method" -> "pkg.Service"."""
    return method.lstrip("/").partition("/")[0]


class BearerAuthInterceptor(_InterceptorBase):
    """Rejects calls to guarded services without an accepted bearer token.

    No token: UNAUTHENTICATED. A token the verifier refuses: PERMISSION_DENIED. Calls to
    services not in `guards` pass untouched.
    """

    def __init__(self, guards: Mapping[str, TokenVerifier]) -> None:
        self._guards = dict(guards)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[_Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> _Handler:
        service = service_of(handler_call_details.method)
        handler = await continuation(handler_call_details)
        verifier = self._guards.get(service)
        if verifier is None or handler is None:
            return handler
        token = bearer_token(handler_call_details.invocation_metadata)
        if token is None:
            return _deny(
                handler,
                errors.Unauthenticated(
                    f"{service} needs metadata 'authorization: Bearer <token>'; the admin "
                    "token is in <state-dir>/admin-token on the control plane host"
                ),
            )
        if not verifier(token):
            return _deny(
                handler,
                errors.PermissionDenied(
                    f"the bearer token is not accepted by {service}; check that you use the "
                    "admin token from <state-dir>/admin-token"
                ),
            )
        return handler


def _deny(handler: _Handler, err: errors.GpufleetError) -> _Handler:
    """A handler of the same kind as `handler` that fails every call with `err`."""

    async def reject(_request: Any, context: _Context) -> None:
        await abort_with(context, err)

    deserializer = handler.request_deserializer
    serializer = handler.response_serializer
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(reject, deserializer, serializer)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(reject, deserializer, serializer)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(reject, deserializer, serializer)
    return grpc.unary_unary_rpc_method_handler(reject, deserializer, serializer)
