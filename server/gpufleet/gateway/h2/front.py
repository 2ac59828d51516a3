"""The gateway's data plane port: its own HTTP/2 server in front of the grpc.aio one.

Calls of the inference methods that go to instances (ModelInfer, ModelMetadata,
ModelStreamInfer) are served here (forwarded_call.py): the request's first message gives
the model name, the Dispatcher admits the call exactly as for the grpc.aio handlers, and
the call's frames are then forwarded on one shared HTTP/2 connection per instance, bytes
unchanged. So are transparent proxy calls, whose `gpufleet-deployment` metadata names the
deployment.
Messages compressed with gzip or deflate are inflated only to read them. Every other
stream (health, reflection, the gateway's own OIP answers, ModelReady, other encodings,
proxy calls naming no deployment) is relayed unchanged (relay.py) to the grpc.aio server
on an internal loopback port, over one internal connection per client connection so that
per-connection limits still see each client connection as one.

Flow control: a connection's window is given back as soon as its bytes are handed to
their stream, a stream's only once they moved on to the other side. So a slow reader, or
a call waiting in the queue, holds back its own stream and never the other calls sharing
its connection (the instance connection is shared by every client of the instance).

Why: one grpc.aio hop costs as much CPU and latency as the instance's own gRPC server, so
a grpc.aio gateway cannot stay within 2 x the latency of a direct call (bench/RESULTS.md).
"""

from __future__ import annotations

import asyncio
import itertools
import ssl

from gpufleet.gateway.dispatch import Dispatcher
from gpufleet.gateway.h2 import grpc_headers as gh
from gpufleet.gateway.h2.connection import H2Connection, StreamEvents
from gpufleet.gateway.h2.forwarded_call import ZLIB_WBITS, ForwardedCall
from gpufleet.gateway.h2.hpack_codec import Header
from gpufleet.gateway.h2.relay import Relay
from gpufleet.gateway.h2.upstream_pool import H2UpstreamPool
from gpufleet.gateway.metadata import DEPLOYMENT_METADATA_KEY
from gpufleet.gateway.oip_service import SERVICE_NAME

# path -> (call kind for the metrics, field named in errors, streaming)
_FAST_METHODS: dict[bytes, tuple[str, str, bool]] = {
    f"/{SERVICE_NAME}/ModelInfer".encode(): ("model_infer", "model_name", False),
    f"/{SERVICE_NAME}/ModelMetadata".encode(): ("model_metadata", "name", False),
    f"/{SERVICE_NAME}/ModelStreamInfer".encode(): ("model_stream_infer", "model_name", True),
}
_PROXY = ("proxy", "", False)
# Message encodings the front reads (grpc-encoding); calls with others go to grpc.aio.
_ENCODINGS = frozenset({b"", b"identity", *ZLIB_WBITS})
# Served by the grpc.aio server itself whatever the metadata (grpc's own services, OIP).
_SERVED_PREFIXES = (b"/grpc.", f"/{SERVICE_NAME}/".encode())
_DEPLOYMENT_KEY = DEPLOYMENT_METADATA_KEY.encode()


class Front:
    """The HTTP/2 server of the data plane port."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        internal_address: str,
        max_message_bytes: int,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.dispatcher = dispatcher
        self.upstreams = H2UpstreamPool()
        self.max_message_bytes = max_message_bytes
        self._internal_address = internal_address
        self._ssl = ssl_context
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[H2Connection] = set()
        self._internal: dict[H2Connection, H2Connection] = {}
        self._internal_pool = H2UpstreamPool()
        self._internal_keys = itertools.count(1)

    async def start(self, host: str, port: int) -> int:
        """Listen on host:port; returns the bound port."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._new_connection, host.strip("[]") or None, port, ssl=self._ssl,
            reuse_address=True,
        )
        sockets = self._server.sockets
        bound: int = sockets[0].getsockname()[1]
        return bound

    async def stop(self, grace: float) -> None:
        """Refuse new streams (GOAWAY), let open ones finish for `grace` s, then close."""
        if self._server is not None:
            self._server.close()
        for connection in list(self._connections):
            connection.goaway()
        waits = [c.wait_idle() for c in list(self._connections)]
        if waits:
            try:
                await asyncio.wait_for(asyncio.gather(*waits), grace)
            except asyncio.TimeoutError:
                pass
        for connection in list(self._connections):
            connection.close()
        self.upstreams.close()
        self._internal_pool.close()

    def retain(self, addresses: frozenset[str]) -> None:
        """The route table's instance addresses now (others close once idle)."""
        self.upstreams.retain(addresses)

    def _new_connection(self) -> H2Connection:
        connection = H2Connection(
            client=False, on_new_stream=self._new_stream, on_closed=self._closed
        )
        self._connections.add(connection)
        return connection

    def _closed(self, connection: H2Connection) -> None:
        self._connections.discard(connection)
        internal = self._internal.pop(connection, None)
        if internal is not None:
            internal.close_when_idle()

    def _new_stream(
        self,
        connection: H2Connection,
        stream_id: int,
        headers: tuple[Header, ...],
        end_stream: bool,
    ) -> StreamEvents:
        path = b""
        method = b""
        content_type = b""
        encoding = b""
        te = False
        timeout = b""
        for name, value in headers:
            if name == b":path":
                path = value
            elif name == b":method":
                method = value
            elif name == b"content-type":
                content_type = value
            elif name == b"te":
                te = value == b"trailers"
            elif name == gh.GRPC_ENCODING:
                encoding = value
            elif name == gh.GRPC_TIMEOUT:
                timeout = value
        grpc_call = (
            not end_stream
            and method == b"POST"
            and te
            and encoding in _ENCODINGS
            and (
                content_type == b"application/grpc"
                or content_type.startswith(b"application/grpc+")
            )
        )
        if grpc_call:
            fast = _FAST_METHODS.get(path)
            if fast is not None:
                return ForwardedCall(
                    self, connection, stream_id, path, fast, encoding=encoding, timeout=timeout
                )
            deployment = _proxied_deployment(path, headers)
            if deployment:
                return ForwardedCall(
                    self, connection, stream_id, path, _PROXY, deployment,
                    encoding=encoding, timeout=timeout,
                )
        return Relay(self._internal_connection(connection), connection, stream_id)

    def _internal_connection(self, connection: H2Connection) -> H2Connection:
        internal = self._internal.get(connection)
        if internal is None or not internal.can_open_stream():
            # One per client connection: a fresh key so the pool never shares it.
            key = f"{self._internal_address}#{next(self._internal_keys)}"
            internal = self._internal_pool.connection_to(key, self._internal_address)
            self._internal[connection] = internal
        return internal


def _proxied_deployment(path: bytes, headers: tuple[Header, ...]) -> str:
    """The deployment a call to the transparent proxy names, or "" when the call is not one
    for the proxy, or names none (the grpc.aio proxy answers those with their error)."""
    if path.startswith(_SERVED_PREFIXES):
        return ""
    for name, value in headers:
        if name == _DEPLOYMENT_KEY:
            try:
                return value.decode("ascii").strip()
            except UnicodeDecodeError:
                return ""
    return ""
