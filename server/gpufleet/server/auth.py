"""Bearer-token authentication for the gRPC services that ask for it.

`BearerAuthInterceptor` guards only the services (or single methods) it is given, each with
its own Guard: the admin API and the routing API take the admin token; NodeService.Connect
takes a node's own secret plus its id in metadata `gpufleet-node-id`; NodeService.Register
(join token in the request), health and reflection are not listed and stay open. The admin
token is no node credential and a node secret is no admin token, so neither works on the
other's services.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc

from gpufleet.server import errors
from gpufleet.server.api.error_mapping import abort_with
from gpufleet.server.tokens import sha256_hex, tokens_equal
from gpufleet.v1 import deployment_service_pb2, node_service_pb2, routing_service_pb2

TokenVerifier = Callable[[str], bool]
"""Says whether a presented bearer token is accepted."""

Metadata = Iterable[tuple[str, Any]]
"""Invocation metadata as grpc hands it over."""

DEPLOYMENT_SERVICE = (
    deployment_service_pb2.DESCRIPTOR.services_by_name["DeploymentService"].full_name
)
ROUTING_SERVICE = routing_service_pb2.DESCRIPTOR.services_by_name["RoutingService"].full_name
NODE_SERVICE = node_service_pb2.DESCRIPTOR.services_by_name["NodeService"].full_name
NODE_CONNECT_METHOD = f"/{NODE_SERVICE}/Connect"
ADMIN_SERVICES = (DEPLOYMENT_SERVICE, ROUTING_SERVICE)
"""Services that need the admin token."""
NODE_ID_METADATA = "gpufleet-node-id"
"""Metadata key carrying the node id on NodeService.Connect."""


@dataclass(frozen=True)
class Guard:
    """How one service or method checks its callers."""

    verify: Callable[[str, Metadata], bool]
    """(bearer token, metadata) -> accepted."""
    missing: str
    """Message when no bearer token (or no other required metadata) was sent."""
    refused: str
    """Message when the credential is not accepted."""
    required_metadata: tuple[str, ...] = ()
    """Metadata keys that must be present besides the bearer token."""


def admin_guard(admin_token: str, service: str) -> Guard:
    """Guard taking exactly the admin token."""
    verify_token = admin_token_verifier(admin_token)
    return Guard(
        verify=lambda token, _metadata: verify_token(token),
        missing=(
            f"{service} needs metadata 'authorization: Bearer <token>'; the admin token is in "
            "<state-dir>/admin-token on the control plane host"
        ),
        refused=(
            f"the bearer token is not accepted by {service}; check that you use the admin "
            "token from <state-dir>/admin-token"
        ),
    )


class NodeCredentials:
    """Node id -> hash of its secret, kept in memory for the per-call check."""

    def __init__(self, secret_hashes: Mapping[str, str] | None = None) -> None:
        self._hashes = dict(secret_hashes or {})

    def set(self, node_id: str, secret_sha256: str) -> None:
        """Record a node's (new) secret hash."""
        self._hashes[node_id] = secret_sha256

    def secret_hash(self, node_id: str) -> str | None:
        """The stored hash of a node's secret; None for an unknown node."""
        return self._hashes.get(node_id)

    def known(self, node_id: str) -> bool:
        """The node id is registered."""
        return node_id in self._hashes

    def verify(self, node_id: str, secret: str) -> bool:
        """The secret is the node's (constant-time compare of the hashes)."""
        expected = self._hashes.get(node_id)
        return expected is not None and tokens_equal(sha256_hex(secret), expected)


def metadata_value(metadata: Metadata | None, key: str) -> str | None:
    """The first string value of `key` in call metadata, or None."""
    for name, value in metadata or ():
        if name.lower() == key and isinstance(value, str) and value.strip():
            return value.strip()
    return None


def node_guard(credentials: NodeCredentials) -> Guard:
    """Guard taking a node's own secret together with its id."""

    def verify(token: str, metadata: Metadata) -> bool:
        node_id = metadata_value(metadata, NODE_ID_METADATA)
        return node_id is not None and credentials.verify(node_id, token)

    return Guard(
        verify=verify,
        missing=(
            "NodeService.Connect needs metadata 'authorization: Bearer <node secret>' and "
            f"'{NODE_ID_METADATA}: <node id>', both from NodeService.Register"
        ),
        refused=(
            "the node id and secret are not accepted (the admin token is not a node "
            "credential); register again with the join token, or with the node id and "
            "secret the agent stored"
        ),
        required_metadata=(NODE_ID_METADATA,),
    )

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
    """Rejects calls to guarded services or methods without an accepted credential.

    `guards` is keyed by full method ("/pkg.Service/Method", checked first) or by service
    ("pkg.Service"). No token (or required metadata): UNAUTHENTICATED. A credential the
    guard refuses: PERMISSION_DENIED. Calls nothing guards pass untouched.
    """

    def __init__(self, guards: Mapping[str, Guard]) -> None:
        self._guards = dict(guards)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[_Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> _Handler:
        method = handler_call_details.method
        handler = await continuation(handler_call_details)
        guard = self._guards.get(method) or self._guards.get(service_of(method))
        if guard is None or handler is None:
            return handler
        metadata = handler_call_details.invocation_metadata
        token = bearer_token(metadata)
        missing = [k for k in guard.required_metadata if metadata_value(metadata, k) is None]
        if token is None or missing:
            return _deny(handler, errors.Unauthenticated(guard.missing))
        if not guard.verify(token, metadata or ()):
            return _deny(handler, errors.PermissionDenied(guard.refused))
        return handler


def _deny(handler: _Handler, err: errors.GpufleetError) -> _Handler:
    """A handler of the same kind as `handler` that fails every call with `err`.

    The refused request is not even parsed (no deserializer: it stays bytes), so a caller
    without credentials learns nothing about its request, only that it is refused.
    """

    async def reject(_request: Any, context: _Context) -> None:
        await abort_with(context, err)

    serializer = handler.response_serializer
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(reject, None, serializer)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(reject, None, serializer)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(reject, None, serializer)
    return grpc.unary_unary_rpc_method_handler(reject, None, serializer)
