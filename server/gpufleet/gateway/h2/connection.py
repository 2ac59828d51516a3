"""One HTTP/2 connection (RFC 9113), either side, as an asyncio Protocol.

Only what a gRPC proxy needs, and fast: frames are parsed straight from what the socket
returned, output is gathered and written once per batch (`flush_dirty`), header blocks use
hpack_codec. Flow control is honoured both ways: data queued with `send_data` goes out as
the peer's windows allow, and the peer's windows are refilled only when the stream's
handler calls `release_window` (when the bytes it got went on towards their destination),
so a slow reader on one side holds back the writer on the other instead of filling memory.
Server push is off. Priorities are ignored.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Protocol

from gpufleet.gateway.h2 import frames as f
from gpufleet.gateway.h2.hpack_codec import Decoder, Header, HpackError, encode

_log = logging.getLogger(__name__)

LOCAL_STREAM_WINDOW = 4 * 1024 * 1024
"""Receive window of each stream, advertised in SETTINGS."""
LOCAL_CONNECTION_WINDOW = 16 * 1024 * 1024
"""Receive window of the whole connection."""
LOCAL_MAX_FRAME_SIZE = 1024 * 1024
"""Largest frame accepted (fewer, larger DATA frames cost less Python per byte)."""
MAX_HEADER_BLOCK = 256 * 1024
"""Largest header block accepted, CONTINUATION frames included."""
CONNECTION_LOST = -1
"""`on_reset` code when the connection itself ended."""

_dirty: set[H2Connection] = set()


def flush_dirty() -> None:
    """Write what every connection has gathered since the last flush."""
    while _dirty:
        _dirty.pop().flush()


class StreamEvents(Protocol):
    """What happens on one stream, as its handler hears it."""

    def on_headers(self, headers: tuple[Header, ...], end_stream: bool) -> None:
        """A complete header block arrived (request or response headers, or trailers)."""

    def on_data(self, data: bytes, end_stream: bool) -> None:
        """Data arrived; give its length back with release_window once it moved on."""

    def on_reset(self, error_code: int, reason: str) -> None:
        """The stream ended abnormally (RST_STREAM, GOAWAY or the connection's end)."""

    def on_sent(self, count: int) -> None:
        """`count` bytes queued with send_data were written to the connection."""


class _Stream:
    __slots__ = (
        "stream_id",
        "events",
        "send_window",
        "pending",
        "end_pending",
        "trailers",
        "local_closed",
        "remote_closed",
        "unacked",
        "pending_bytes",
    )

    def __init__(self, stream_id: int, events: StreamEvents, send_window: int) -> None:
        self.stream_id = stream_id
        self.events = events
        self.send_window = send_window
        self.pending: deque[bytes] = deque()
        self.end_pending = False
        self.trailers: tuple[Header, ...] | None = None
        self.local_closed = False
        self.remote_closed = False
        self.unacked = 0
        self.pending_bytes = 0


NewStream = Callable[["H2Connection", int, tuple[Header, ...], bool], StreamEvents]


class H2Connection(asyncio.Protocol):
    """An HTTP/2 connection. As a server, `on_new_stream` gives each stream opened by the
    peer its handler; as a client, `open_stream` opens them."""

    def __init__(
        self,
        *,
        client: bool,
        on_new_stream: NewStream | None = None,
        on_closed: Callable[[H2Connection], None] | None = None,
        name: str = "",
    ) -> None:
        self.client = client
        self.name = name
        self._on_new_stream = on_new_stream
        self._on_closed = on_closed
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.accepting = True
        """False once either side sent GOAWAY: open no new streams here."""
        self.peer: str = ""
        self._out: list[bytes] = []
        self._leftover = b""
        self._preface_pending = not client
        self._decoder = Decoder()
        self._streams: dict[int, _Stream] = {}
        self._next_stream_id = 1
        self._last_peer_stream = 0
        self._send_window = f.DEFAULT_WINDOW
        self._peer_initial_window = f.DEFAULT_WINDOW
        self._peer_max_frame = f.DEFAULT_MAX_FRAME_SIZE
        self._peer_max_streams = 2**31
        self._recv_window = LOCAL_CONNECTION_WINDOW
        self._conn_unacked = 0
        self._continuation: tuple[int, int, bytearray] | None = None
        self._paused = False
        self._close_when_idle = False
        self._idle = asyncio.Event()
        self._idle.set()
        self.close_reason = ""

    # -- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            host = str(peer[0])
            self.peer = f"ipv6:[{host}]:{peer[1]}" if ":" in host else f"ipv4:{host}:{peer[1]}"
        preface = [f.PREFACE] if self.client else []
        settings = {
            f.SETTINGS_INITIAL_WINDOW_SIZE: LOCAL_STREAM_WINDOW,
            f.SETTINGS_MAX_FRAME_SIZE: LOCAL_MAX_FRAME_SIZE,
        }
        if self.client:
            settings[f.SETTINGS_ENABLE_PUSH] = 0
        # Frames queued before the transport existed (a client's first streams) follow.
        self._out[:0] = [
            *preface,
            f.settings_frame(settings),
            f.window_update(0, LOCAL_CONNECTION_WINDOW - f.DEFAULT_WINDOW),
        ]
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self._end(f"connection lost: {exc}" if exc else "the peer closed the connection")

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        for stream in list(self._streams.values()):
            if stream.pending or stream.end_pending or stream.trailers is not None:
                self._pump(stream)
        flush_dirty()

    def data_received(self, data: bytes) -> None:
        if self._leftover:
            data = self._leftover + data
            self._leftover = b""
        position = 0
        if self._preface_pending:
            if len(data) < len(f.PREFACE):
                if not f.PREFACE.startswith(data):
                    self._fail_connection(f.PROTOCOL_ERROR, "not an HTTP/2 client preface")
                    return
                self._leftover = data
                return
            if not data.startswith(f.PREFACE):
                self._fail_connection(f.PROTOCOL_ERROR, "not an HTTP/2 client preface")
                return
            self._preface_pending = False
            position = len(f.PREFACE)
        end = len(data)
        try:
            while end - position >= 9 and not self.closed:
                length, kind, flags, stream_id = f.parse_header(data, position)
                if length > LOCAL_MAX_FRAME_SIZE:
                    raise _ConnectionError(
                        f.FRAME_SIZE_ERROR, f"frame of {length} bytes exceeds the maximum"
                    )
                stop = position + 9 + length
                if stop > end:
                    break
                payload = data[position + 9 : stop]
                position = stop
                self._frame(kind, flags, stream_id, payload)
        except _ConnectionError as err:
            self._fail_connection(err.code, err.reason)
            flush_dirty()
            return
        if position < end:
            self._leftover = data[position:]
        flush_dirty()

    # -- sending ---------------------------------------------------------------------

    def open_stream(
        self, headers: list[Header] | tuple[Header, ...], end_stream: bool, events: StreamEvents
    ) -> int:
        """Open a stream (client side) with its request headers; returns its id."""
        stream_id = self._next_stream_id
        self._next_stream_id += 2
        stream = _Stream(stream_id, events, self._peer_initial_window)
        self._streams[stream_id] = stream
        self._idle.clear()
        self._write_headers(stream_id, headers, end_stream)
        if end_stream:
            stream.local_closed = True
        return stream_id

    def can_open_stream(self) -> bool:
        """Whether a new stream may be opened here now."""
        return (
            self.accepting
            and not self.closed
            and len(self._streams) < self._peer_max_streams
            and self._next_stream_id < 2**31 - 1
        )

    def send_headers(
        self, stream_id: int, headers: list[Header] | tuple[Header, ...], end_stream: bool
    ) -> None:
        """Response headers, or trailers (end_stream: after any data still queued)."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.local_closed:
            return
        if end_stream and (stream.pending or stream.end_pending):
            stream.trailers = tuple(headers)
            return
        self._write_headers(stream_id, headers, end_stream)
        if end_stream:
            self._close_local(stream)

    def send_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> bool:
        """Queue data; it goes out as the windows allow (on_sent tells when). False: the
        stream is gone or its side is closed, and nothing was queued (on_sent will not
        come for these bytes)."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.local_closed or stream.end_pending:
            return False
        if data:
            stream.pending.append(data)
            stream.pending_bytes += len(data)
        if end_stream:
            stream.end_pending = True
        self._pump(stream)
        return True

    def queued_bytes(self, stream_id: int) -> int:
        """Bytes queued with send_data that the peer's windows have not let out yet."""
        stream = self._streams.get(stream_id)
        return 0 if stream is None else stream.pending_bytes

    def reset_stream(self, stream_id: int, error_code: int) -> None:
        """Send RST_STREAM and forget the stream (its handler hears nothing more)."""
        stream = self._streams.pop(stream_id, None)
        if stream is None:
            return
        if not self.closed:
            self._queue(f.rst_stream(stream_id, error_code))
        self._forget(stream)

    def release_window(self, stream_id: int, count: int) -> None:
        """`count` received bytes of the stream went on: let the peer send as many more."""
        self.release_connection_window(count)
        self.release_stream_window(stream_id, count)

    def release_connection_window(self, count: int) -> None:
        """The connection-level half of release_window. A proxy gives this back as soon as
        bytes are handed to their stream, so that one stream whose reader is slow holds
        back only itself (through its stream window), never the connection's other
        streams."""
        if count <= 0 or self.closed:
            return
        self._conn_unacked += count
        if self._conn_unacked >= LOCAL_CONNECTION_WINDOW // 4:
            self._queue(f.window_update(0, self._conn_unacked))
            self._recv_window += self._conn_unacked
            self._conn_unacked = 0

    def release_stream_window(self, stream_id: int, count: int) -> None:
        """The stream-level half of release_window."""
        if count <= 0 or self.closed:
            return
        stream = self._streams.get(stream_id)
        if stream is None or stream.remote_closed:
            return
        stream.unacked += count
        if stream.unacked >= LOCAL_STREAM_WINDOW // 4:
            self._queue(f.window_update(stream_id, stream.unacked))
            stream.unacked = 0

    def goaway(self, error_code: int = f.NO_ERROR, debug: str = "") -> None:
        """Tell the peer to open no more streams; those open may finish."""
        if self.closed or not self.accepting:
            return
        self.accepting = False
        last = self._last_peer_stream if not self.client else 0
        self._queue(f.goaway(last, error_code, debug.encode()[:256]))
        self.flush()

    async def wait_idle(self) -> None:
        """Wait until no stream is open."""
        await self._idle.wait()

    def close(self) -> None:
        """Close the transport now (open streams end with on_reset)."""
        if self.transport is not None and not self.closed:
            self.flush()
            self.transport.close()
        self._end("closed by the gateway")

    def stream_count(self) -> int:
        """Open streams."""
        return len(self._streams)

    def flush(self) -> None:
        """Write the gathered frames."""
        _dirty.discard(self)
        if self._out and self.transport is not None and not self.closed:
            data = b"".join(self._out)
            self._out.clear()
            self.transport.write(data)

    def fail(self, reason: str) -> None:
        """The connection could not be made (client side): end everything."""
        self._end(reason)

    # -- internals -------------------------------------------------------------------

    def _queue(self, data: bytes) -> None:
        self._out.append(data)
        _dirty.add(self)

    def _write_headers(
        self, stream_id: int, headers: list[Header] | tuple[Header, ...], end_stream: bool
    ) -> None:
        block = encode(headers)
        flags = f.FLAG_END_STREAM if end_stream else 0
        limit = self._peer_max_frame
        if len(block) <= limit:
            self._queue(f.frame(f.HEADERS, flags | f.FLAG_END_HEADERS, stream_id, block))
            return
        self._queue(f.frame(f.HEADERS, flags, stream_id, block[:limit]))
        position = limit
        while position < len(block):
            chunk = block[position : position + limit]
            position += limit
            last = f.FLAG_END_HEADERS if position >= len(block) else 0
            self._queue(f.frame(f.CONTINUATION, last, stream_id, chunk))

    def _pump(self, stream: _Stream) -> None:
        if self.closed or stream.local_closed:
            return
        sent = 0
        pending = stream.pending
        stream_id = stream.stream_id
        while pending and not self._paused:
            allowed = min(stream.send_window, self._send_window, self._peer_max_frame)
            if allowed <= 0:
                break
            chunk = pending[0]
            if len(chunk) <= allowed:
                pending.popleft()
            else:
                pending[0] = chunk[allowed:]
                chunk = chunk[:allowed]
            size = len(chunk)
            stream.pending_bytes -= size
            stream.send_window -= size
            self._send_window -= size
            sent += size
            last = not pending and stream.end_pending and stream.trailers is None
            self._queue(f.frame(f.DATA, f.FLAG_END_STREAM if last else 0, stream_id, chunk))
            if last:
                self._close_local(stream)
                break
        if not pending and not stream.local_closed:
            if stream.trailers is not None:
                trailers = stream.trailers
                stream.trailers = None
                stream.end_pending = False
                self._write_headers(stream_id, trailers, True)
                self._close_local(stream)
            elif stream.end_pending:
                self._queue(f.frame(f.DATA, f.FLAG_END_STREAM, stream_id))
                self._close_local(stream)
        if sent:
            stream.events.on_sent(sent)

    def _close_local(self, stream: _Stream) -> None:
        stream.local_closed = True
        stream.end_pending = False
        if stream.remote_closed:
            self._streams.pop(stream.stream_id, None)
            self._forget(stream)

    def _close_remote(self, stream: _Stream) -> None:
        stream.remote_closed = True
        if stream.local_closed:
            self._streams.pop(stream.stream_id, None)
            self._forget(stream)

    def _forget(self, stream: _Stream) -> None:
        self._drop_pending(stream)
        if not self._streams:
            self._idle.set()
            if self._close_when_idle:
                self.close()

    def _closed_by_peer_frame(self, stream: _Stream, kind: str) -> None:
        # A frame after the peer ended its side is a stream error (RFC 9113, 5.1): the
        # stream is reset, and its handler must end its work as for any reset.
        self._streams.pop(stream.stream_id, None)
        self._forget(stream)
        stream.events.on_reset(f.STREAM_CLOSED, f"the peer sent {kind} after ending the stream")

    @staticmethod
    def _drop_pending(stream: _Stream) -> None:
        # Queued bytes that will never go out leave this connection all the same: the
        # handler hears of them as sent, so that it gives their window back to the side
        # they came from (else that connection's window would shrink for good).
        dropped = stream.pending_bytes
        stream.pending.clear()
        stream.pending_bytes = 0
        if dropped:
            stream.events.on_sent(dropped)

    def close_when_idle(self) -> None:
        """Close once the last open stream ends (now if none is open)."""
        self._close_when_idle = True
        if not self._streams:
            self.close()

    def _frame(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        if self._continuation is not None and kind != f.CONTINUATION:
            raise _ConnectionError(f.PROTOCOL_ERROR, "expected a CONTINUATION frame")
        if kind == f.DATA:
            self._data(flags, stream_id, payload)
        elif kind == f.HEADERS:
            self._headers(flags, stream_id, payload)
        elif kind == f.CONTINUATION:
            self._continuation_frame(flags, stream_id, payload)
        elif kind == f.WINDOW_UPDATE:
            self._window_update(stream_id, payload)
        elif kind == f.SETTINGS:
            self._settings(flags, stream_id, payload)
        elif kind == f.PING:
            if len(payload) != 8 or stream_id:
                raise _ConnectionError(f.PROTOCOL_ERROR, "malformed PING")
            if not flags & f.FLAG_ACK:
                self._queue(f.frame(f.PING, f.FLAG_ACK, 0, payload))
        elif kind == f.RST_STREAM:
            if len(payload) != 4 or not stream_id:
                raise _ConnectionError(f.PROTOCOL_ERROR, "malformed RST_STREAM")
            stream = self._streams.pop(stream_id, None)
            if stream is not None:
                self._forget(stream)
                stream.events.on_reset(f.read_u32(payload), "the peer reset the stream")
        elif kind == f.GOAWAY:
            self._goaway(payload)
        elif kind == f.PUSH_PROMISE:
            raise _ConnectionError(f.PROTOCOL_ERROR, "server push is disabled")
        # PRIORITY and unknown frame types are ignored, as RFC 9113 allows.

    def _data(self, flags: int, stream_id: int, payload: bytes) -> None:
        if not stream_id:
            raise _ConnectionError(f.PROTOCOL_ERROR, "DATA on stream 0")
        length = len(payload)
        self._recv_window -= length
        if self._recv_window < 0:
            raise _ConnectionError(f.FLOW_CONTROL_ERROR, "the peer overran the window")
        data = payload
        padding = 0
        if flags & f.FLAG_PADDED:
            if not length:
                raise _ConnectionError(f.PROTOCOL_ERROR, "padded DATA without a pad length")
            padding = payload[0] + 1
            if padding > length:
                raise _ConnectionError(f.PROTOCOL_ERROR, "padding longer than the frame")
            data = payload[1 : length - payload[0]]
        stream = self._streams.get(stream_id)
        if stream is None or stream.remote_closed:
            self.release_connection_window(length)
            if stream is None and stream_id > self._highest_seen():
                raise _ConnectionError(f.PROTOCOL_ERROR, "DATA on an idle stream")
            self._queue(f.rst_stream(stream_id, f.STREAM_CLOSED))
            if stream is not None:
                self._closed_by_peer_frame(stream, "DATA")
            return
        if padding:
            self.release_window(stream_id, padding)
        end_stream = bool(flags & f.FLAG_END_STREAM)
        if end_stream:
            self._close_remote(stream)
        if data or end_stream:
            stream.events.on_data(data, end_stream)

    def _highest_seen(self) -> int:
        return self._next_stream_id - 2 if self.client else self._last_peer_stream

    def _headers(self, flags: int, stream_id: int, payload: bytes) -> None:
        if not stream_id:
            raise _ConnectionError(f.PROTOCOL_ERROR, "HEADERS on stream 0")
        start = 0
        end = len(payload)
        if flags & f.FLAG_PADDED:
            if not end:
                raise _ConnectionError(f.PROTOCOL_ERROR, "padded HEADERS without a pad length")
            start = 1
            end -= payload[0]
        if flags & f.FLAG_PRIORITY:
            start += 5
        if start > end:
            raise _ConnectionError(f.PROTOCOL_ERROR, "HEADERS padding longer than the frame")
        block = payload[start:end]
        if flags & f.FLAG_END_HEADERS:
            self._header_block(stream_id, flags, block)
        else:
            self._continuation = (stream_id, flags, bytearray(block))

    def _continuation_frame(self, flags: int, stream_id: int, payload: bytes) -> None:
        if self._continuation is None or self._continuation[0] != stream_id:
            raise _ConnectionError(f.PROTOCOL_ERROR, "unexpected CONTINUATION frame")
        _, first_flags, block = self._continuation
        block += payload
        if len(block) > MAX_HEADER_BLOCK:
            raise _ConnectionError(f.ENHANCE_YOUR_CALM, "header block too large")
        if flags & f.FLAG_END_HEADERS:
            self._continuation = None
            self._header_block(stream_id, first_flags, bytes(block))

    def _header_block(self, stream_id: int, flags: int, block: bytes) -> None:
        try:
            headers = self._decoder.decode(block)
        except HpackError as err:
            raise _ConnectionError(f.COMPRESSION_ERROR, str(err)) from None
        end_stream = bool(flags & f.FLAG_END_STREAM)
        stream = self._streams.get(stream_id)
        if stream is not None:
            if stream.remote_closed:
                self._queue(f.rst_stream(stream_id, f.STREAM_CLOSED))
                self._closed_by_peer_frame(stream, "HEADERS")
                return
            if end_stream:
                self._close_remote(stream)
            stream.events.on_headers(headers, end_stream)
            return
        if self.client or not stream_id & 1 or stream_id <= self._last_peer_stream:
            # A stream already forgotten (reset by us): its late frames are dropped.
            if stream_id > self._highest_seen():
                raise _ConnectionError(f.PROTOCOL_ERROR, f"HEADERS on idle stream {stream_id}")
            return
        self._last_peer_stream = stream_id
        if not self.accepting or self._on_new_stream is None:
            self._queue(f.rst_stream(stream_id, f.REFUSED_STREAM))
            return
        events = self._on_new_stream(self, stream_id, headers, end_stream)
        stream = _Stream(stream_id, events, self._peer_initial_window)
        self._streams[stream_id] = stream
        self._idle.clear()
        if end_stream:
            stream.remote_closed = True
        events.on_headers(headers, end_stream)

    def _window_update(self, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise _ConnectionError(f.FRAME_SIZE_ERROR, "malformed WINDOW_UPDATE")
        increment = f.read_u32(payload) & 0x7FFF_FFFF
        if stream_id == 0:
            if not increment:
                raise _ConnectionError(f.PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self._send_window += increment
            if self._send_window > f.MAX_WINDOW:
                raise _ConnectionError(f.FLOW_CONTROL_ERROR, "connection window overflow")
            for stream in list(self._streams.values()):
                if stream.pending:
                    self._pump(stream)
            return
        target = self._streams.get(stream_id)
        if target is None:
            return
        target.send_window += increment
        if target.pending:
            self._pump(target)

    def _settings(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id or len(payload) % 6:
            raise _ConnectionError(f.PROTOCOL_ERROR, "malformed SETTINGS")
        if flags & f.FLAG_ACK:
            return
        for key, value in f.parse_settings(payload):
            if key == f.SETTINGS_INITIAL_WINDOW_SIZE:
                if value > f.MAX_WINDOW:
                    raise _ConnectionError(f.FLOW_CONTROL_ERROR, "initial window too large")
                delta = value - self._peer_initial_window
                self._peer_initial_window = value
                for stream in self._streams.values():
                    stream.send_window += delta
            elif key == f.SETTINGS_MAX_FRAME_SIZE:
                if not 16_384 <= value <= 16_777_215:
                    raise _ConnectionError(f.PROTOCOL_ERROR, "bad SETTINGS_MAX_FRAME_SIZE")
                self._peer_max_frame = value
            elif key == f.SETTINGS_MAX_CONCURRENT_STREAMS:
                self._peer_max_streams = value
        self._queue(f.frame(f.SETTINGS, f.FLAG_ACK, 0))
        for stream in list(self._streams.values()):
            if stream.pending:
                self._pump(stream)

    def _goaway(self, payload: bytes) -> None:
        if len(payload) < 8:
            raise _ConnectionError(f.PROTOCOL_ERROR, "malformed GOAWAY")
        last_stream_id = f.read_u32(payload) & 0x7FFF_FFFF
        self.accepting = False
        if not self.client:
            return
        for stream_id in [s for s in self._streams if s > last_stream_id]:
            stream = self._streams.pop(stream_id)
            self._forget(stream)
            stream.events.on_reset(f.REFUSED_STREAM, "the instance is shutting down")
        if not self._streams:
            self.close()

    def _fail_connection(self, code: int, reason: str) -> None:
        _log.debug("HTTP/2 connection %s failed: %s", self.peer or self.name, reason)
        if self.transport is not None and not self.closed:
            self._queue(f.goaway(self._last_peer_stream, code, reason.encode()[:256]))
            self.flush()
            self.transport.close()
        self._end(reason)

    def _end(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.accepting = False
        self.close_reason = reason
        _dirty.discard(self)
        self._out.clear()
        streams = list(self._streams.values())
        self._streams.clear()
        self._idle.set()
        for stream in streams:
            self._drop_pending(stream)
            stream.events.on_reset(CONNECTION_LOST, reason)
        if self._on_closed is not None:
            self._on_closed(self)
        flush_dirty()


class _ConnectionError(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
