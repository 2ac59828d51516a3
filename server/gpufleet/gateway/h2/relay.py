"""Streams the HTTP/2 front does not serve itself: relayed unchanged, frame by frame, to
the gateway's grpc.aio server. Also the pieces both kinds of forwarded stream share."""

from __future__ import annotations

from typing import Protocol

import grpc

from gpufleet.gateway.h2 import frames as f
from gpufleet.gateway.h2 import grpc_headers as gh
from gpufleet.gateway.h2.connection import CONNECTION_LOST, H2Connection
from gpufleet.gateway.h2.hpack_codec import Header


class UpstreamOwner(Protocol):
    """A forwarded call, as the stream towards its server reports to it."""

    def up_headers(self, headers: tuple[Header, ...], end_stream: bool) -> None: ...

    def up_data(self, data: bytes, end_stream: bool) -> None: ...

    def up_reset(self, error_code: int, reason: str) -> None: ...

    def up_sent(self, count: int) -> None: ...


class Relay:
    """A stream relayed unchanged to the internal grpc.aio server."""

    def __init__(self, upstream: H2Connection, client: H2Connection, stream_id: int) -> None:
        self._upstream = upstream
        self._client = client
        self._stream_id = stream_id
        self._upstream_id = 0
        self._side = UpstreamSide(self)
        self._done = False
        self._answered = False

    def on_headers(self, headers: tuple[Header, ...], end_stream: bool) -> None:
        if self._upstream_id:
            self._upstream.send_headers(self._upstream_id, headers, end_stream)
            return
        self._upstream_id = self._upstream.open_stream(headers, end_stream, self._side)

    def on_data(self, data: bytes, end_stream: bool) -> None:
        self._client.release_connection_window(len(data))
        if not self._upstream.send_data(self._upstream_id, data, end_stream):
            self._client.release_stream_window(self._stream_id, len(data))

    def on_reset(self, error_code: int, reason: str) -> None:
        if not self._done:
            self._done = True
            self._upstream.reset_stream(self._upstream_id, f.CANCEL)

    def on_sent(self, count: int) -> None:
        self._upstream.release_stream_window(self._upstream_id, count)

    # upstream side
    def up_headers(self, headers: tuple[Header, ...], end_stream: bool) -> None:
        self._answered = self._answered or end_stream
        self._client.send_headers(self._stream_id, headers, end_stream)

    def up_data(self, data: bytes, end_stream: bool) -> None:
        self._answered = self._answered or end_stream
        self._upstream.release_connection_window(len(data))
        if not self._client.send_data(self._stream_id, data, end_stream):
            self._upstream.release_stream_window(self._upstream_id, len(data))

    def up_reset(self, error_code: int, reason: str) -> None:
        if self._done:
            return
        if error_code == f.NO_ERROR and self._answered:
            # The server answered in full and reads no more of the request: the answer,
            # perhaps still queued for the client, must not be cut off.
            return
        self._done = True
        if error_code == CONNECTION_LOST or error_code == f.REFUSED_STREAM:
            send_status(
                self._client, self._stream_id, grpc.StatusCode.UNAVAILABLE,
                f"the gateway's internal server is unavailable ({reason}); retry the call",
            )
        else:
            self._client.reset_stream(self._stream_id, error_code)

    def up_sent(self, count: int) -> None:
        self._client.release_stream_window(self._stream_id, count)


class UpstreamSide:
    """The events of the instance-side stream of a call, passed to its owner."""

    __slots__ = ("_owner",)

    def __init__(self, owner: UpstreamOwner) -> None:
        self._owner = owner

    def on_headers(self, headers: tuple[Header, ...], end_stream: bool) -> None:
        self._owner.up_headers(headers, end_stream)

    def on_data(self, data: bytes, end_stream: bool) -> None:
        self._owner.up_data(data, end_stream)

    def on_reset(self, error_code: int, reason: str) -> None:
        self._owner.up_reset(error_code, reason)

    def on_sent(self, count: int) -> None:
        self._owner.up_sent(count)


def send_status(
    connection: H2Connection,
    stream_id: int,
    code: grpc.StatusCode,
    message: str,
    metadata: tuple[tuple[str, str | bytes], ...] = (),
    headers_sent: bool = False,
) -> None:
    """End a stream with a status (trailers-only unless headers were sent)."""
    trailers = gh.status_trailers(code, message, metadata)
    if not headers_sent:
        trailers[:0] = [gh.STATUS_200, gh.CONTENT_TYPE_GRPC]
    connection.send_headers(stream_id, trailers, True)
