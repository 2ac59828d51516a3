"""One call the HTTP/2 front serves itself: an inference call (its first message names
the model) or a transparent proxy call (its metadata names the deployment). The call is
admitted by the gateway's Dispatcher, then its frames go to the instance unchanged."""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from typing import Protocol

import grpc

from gpufleet.gateway.call_observer import (
    CALL_KIND,
    CLIENT_CANCELLED,
    DEADLINE_PASSED,
    GATEWAY_INTERNAL,
    INSTANCE_STATUS,
)
from gpufleet.gateway.dispatch import CallTarget, Dispatcher
from gpufleet.gateway.h2 import frames as f
from gpufleet.gateway.h2 import grpc_headers as gh
from gpufleet.gateway.h2.connection import CONNECTION_LOST, H2Connection, flush_dirty
from gpufleet.gateway.h2.hpack_codec import Header
from gpufleet.gateway.h2.relay import UpstreamSide, send_status
from gpufleet.gateway.h2.upstream_pool import H2UpstreamPool
from gpufleet.gateway.handlers import INTERNAL_MESSAGE
from gpufleet.gateway.oip_service import model_name_of, stream_error_response
from gpufleet.gateway.rpc_errors import INVALID_REQUEST, CallError
from gpufleet.gateway.wire import WireFormatError, read_string_field

_log = logging.getLogger(__name__)

ZLIB_WBITS = {b"gzip": 16 + zlib.MAX_WBITS, b"deflate": zlib.MAX_WBITS}
"""The message encodings a forwarded call can read (grpc-encoding -> zlib wbits)."""
_USER_AGENT: Header = (b"user-agent", b"gpufleet-gateway")
_MESSAGE_PREFIX = 5
_MAX_HELD_BYTES = 1024 * 1024
"""Request bytes the front holds for one call (waiting for admission, or for the
instance's window) before it stops refilling the call's stream window."""
_MODEL_NAME_FIELD = 1


class CallServices(Protocol):
    """What a forwarded call uses of the front."""

    dispatcher: Dispatcher
    upstreams: H2UpstreamPool
    max_message_bytes: int


class _Context:
    """What Dispatcher.admit reads from a call: its deadline and its connection."""

    __slots__ = ("deadline", "connection_id")

    def __init__(self, deadline: float | None, connection_id: str) -> None:
        self.deadline = deadline
        self.connection_id = connection_id

    def time_remaining(self) -> float | None:
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - time.monotonic())

    def peer(self) -> str:
        return self.connection_id

    def code(self) -> grpc.StatusCode | None:
        return None


class ForwardedCall:
    """One call served by the front: admission, then its frames to the instance."""

    def __init__(
        self,
        front: CallServices,
        client: H2Connection,
        stream_id: int,
        path: bytes,
        method: tuple[str, str, bool],
        proxied_to: str = "",
        *,
        encoding: bytes = b"",
        timeout: bytes = b"",
    ) -> None:
        self._front = front
        self._client = client
        self._stream_id = stream_id
        self._path = path
        self._kind, self._field, self._streaming = method
        self._arrived_at = time.monotonic()
        self._headers: tuple[Header, ...] = ()
        # grpc-timeout as the front read it from the headers (b"" for none).
        self._timeout = timeout
        self._context: _Context | None = None
        self._buffer = bytearray()
        self._client_ended = False
        self._unreleased = 0
        self._first_length = -1
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._target: CallTarget | None = None
        self._upstream: H2Connection | None = None
        self._upstream_id = 0
        # A transparent proxy call names its deployment in metadata: admitted on its
        # headers, its messages are never read.
        self._proxy = bool(proxied_to)
        # Messages flagged compressed are inflated with this to read them, and forwarded
        # as they came, with the encoding named to the instance.
        self._encoding = b"" if encoding == b"identity" else encoding
        self._model = proxied_to
        self._headers_sent = False
        self._done = False
        # Streams only: request messages still being read, and the gateway's own error
        # responses waiting for a message boundary of the instance's responses.
        self._injected: list[bytes] = []
        self._injected_bytes = 0
        self._response_header = b""
        self._response_left = 0

    # -- the client's stream ---------------------------------------------------------

    def on_headers(self, headers: tuple[Header, ...], end_stream: bool) -> None:
        if self._context is None:
            self._headers = headers
            seconds = gh.parse_timeout(self._timeout) if self._timeout else None
            deadline = None if seconds is None else self._arrived_at + seconds
            self._context = _Context(deadline, self._client.peer or f"h2-{id(self._client)}")
            if deadline is not None:
                self._timer = asyncio.get_running_loop().call_at(
                    _loop_time(deadline), self._deadline_passed
                )
            if self._proxy:
                self._first_length = 0
                self._task = asyncio.get_running_loop().create_task(self._admit())
            return
        # Trailers from a client end its side; gRPC clients send none.
        if end_stream:
            self.on_data(b"", True)

    def on_data(self, data: bytes, end_stream: bool) -> None:
        if end_stream:
            self._client_ended = True
        # The connection's window comes back at once (see release_connection_window);
        # the stream's only as the bytes move on.
        self._client.release_connection_window(len(data))
        if self._done:
            return
        self._unreleased += len(data)
        if self._upstream_id and not self._streaming:
            assert self._upstream is not None
            self._upstream.send_data(self._upstream_id, data, end_stream)
        elif self._proxy:
            self._buffer += data  # until admission
        else:
            # Read messages: the first (for the model name) and, on streams, each one.
            self._buffer += data
            self._read_messages()
        self._release_window()

    def _release_window(self) -> None:
        """Let the client send as much again as it sent, unless the front already holds
        too much of it: a message it has not read whole is always let in (it is bounded
        by max_message_bytes), more only while the instance's side keeps up."""
        if not self._unreleased:
            return
        if self._done:
            # The call is over: nothing is held for it any more.
            self._client.release_stream_window(self._stream_id, self._unreleased)
            self._unreleased = 0
            return
        if self._upstream is not None:
            # What is left in the buffer is one message not yet whole: always let it in.
            held = self._upstream.queued_bytes(self._upstream_id)
        else:
            held = len(self._buffer) - max(self._first_length, 0)
        if self._first_length < 0 or held < _MAX_HELD_BYTES:
            self._client.release_stream_window(self._stream_id, self._unreleased)
            self._unreleased = 0

    def _read_messages(self) -> None:
        buffer = self._buffer
        while len(buffer) >= _MESSAGE_PREFIX and not self._done:
            if buffer[0] != 0 and not self._encoding:
                self._refuse(CallError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "the request message is flagged compressed but the call set no "
                    "grpc-encoding; send it uncompressed or set grpc-encoding",
                    reason=INVALID_REQUEST,
                ))
                return
            length = int.from_bytes(buffer[1:5], "big")
            if length > self._front.max_message_bytes:
                self._refuse(CallError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"the request message of {length} bytes exceeds the gateway's maximum of "
                    f"{self._front.max_message_bytes} bytes; send a smaller one",
                    reason=INVALID_REQUEST,
                ))
                return
            if len(buffer) < _MESSAGE_PREFIX + length:
                break
            if self._task is None and not self._upstream_id:
                self._first_length = _MESSAGE_PREFIX + length
                body = self._message_body(bytes(buffer[: _MESSAGE_PREFIX + length]))
                if body is None:
                    return
                self._start(body)
                if not self._streaming:
                    break  # unary: the rest goes to the instance as it is
                # Streams: the first message is sent on admission with the buffer.
                break
            if not self._upstream_id:
                break  # wait for admission with the messages buffered
            message = bytes(buffer[: _MESSAGE_PREFIX + length])
            del buffer[: _MESSAGE_PREFIX + length]
            self._stream_message(message)
        if self._client_ended and not self._done and self._task is None and not self._upstream_id:
            if self._streaming and not buffer:
                # A stream closed before its first request: nothing to forward.
                self._finish_local(grpc.StatusCode.OK, "")
            else:
                self._refuse(CallError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "the call ended before a complete request message; send one message",
                    reason=INVALID_REQUEST,
                ))
        elif self._upstream_id and self._streaming and self._client_ended:
            # A message cut off by the client's half-close is dropped, as grpc does.
            assert self._upstream is not None
            buffer.clear()
            self._upstream.send_data(self._upstream_id, b"", True)

    def _message_body(self, message: bytes) -> bytes | None:
        """A whole message's protobuf bytes (inflated if flagged compressed); None after
        refusing the call for a message that does not inflate within the size limit."""
        body = message[_MESSAGE_PREFIX:]
        if message[0] == 0:
            return body
        limit = self._front.max_message_bytes
        inflater = zlib.decompressobj(ZLIB_WBITS[self._encoding])
        try:
            inflated = inflater.decompress(body, limit + 1)
        except zlib.error as err:
            self._refuse(CallError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the request message does not inflate as {self._encoding.decode()} "
                f"({err}); compress it with the grpc-encoding the call names",
                reason=INVALID_REQUEST,
            ))
            return None
        if len(inflated) > limit:
            self._refuse(CallError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the request message inflates to more than the gateway's maximum of "
                f"{limit} bytes; send a smaller one",
                reason=INVALID_REQUEST,
            ))
            return None
        return inflated

    def _stream_message(self, message: bytes) -> None:
        """A later request on a stream: forwarded if it names the stream's model."""
        assert self._upstream is not None
        body = self._message_body(message)
        if body is None:
            return
        try:
            other = read_string_field(body, _MODEL_NAME_FIELD) or ""
        except WireFormatError as err:
            self._inject(stream_error_response(
                f"the request is not a valid protobuf message ({err})", body, ""))
            return
        if other != self._model:
            self._inject(stream_error_response(
                f"this stream serves model {self._model!r} (its first request named it); "
                f"open another stream for model {other!r}", body, other))
            return
        self._upstream.send_data(self._upstream_id, message, False)

    def on_reset(self, error_code: int, reason: str) -> None:
        if self._done:
            return
        remaining = self._context.time_remaining() if self._context else None
        expired = remaining is not None and remaining <= 0
        if self._task is not None:
            self._task.cancel()  # admission tells the observer itself
        if self._upstream_id and self._upstream is not None:
            self._upstream.reset_stream(self._upstream_id, f.CANCEL)
        if expired:
            self._end(grpc.StatusCode.DEADLINE_EXCEEDED, DEADLINE_PASSED)
        else:
            self._end(grpc.StatusCode.CANCELLED, CLIENT_CANCELLED)

    def on_sent(self, count: int) -> None:
        """Response bytes reached the client's connection: the instance may send more."""
        if self._injected_bytes:
            own = min(count, self._injected_bytes)
            self._injected_bytes -= own
            count -= own
        if self._upstream is not None and count:
            self._upstream.release_stream_window(self._upstream_id, count)

    # -- admission -------------------------------------------------------------------

    def _start(self, first_message: bytes) -> None:
        try:
            self._model = model_name_of(first_message, self._field)
        except CallError as err:
            self._refuse(err)
            return
        self._task = asyncio.get_running_loop().create_task(self._admit())

    async def _admit(self) -> None:
        CALL_KIND.set(self._kind)
        assert self._context is not None
        try:
            target = await self._front.dispatcher.admit(
                self._model, self._context, gh.metadata_of(self._headers)
            )
        except CallError as err:
            self._task = None
            self._refuse(err)
            flush_dirty()
            return
        except asyncio.CancelledError:
            return
        except Exception:  # noqa: BLE001 - a bug must not leave the client waiting
            _log.exception("unexpected error admitting a %s call", self._kind)
            self._task = None
            self._refuse(CallError(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE,
                                   reason=GATEWAY_INTERNAL))
            flush_dirty()
            return
        self._task = None
        target.context = None  # this call reports its own end
        if self._done:
            target.release()
            return
        self._target = target
        try:
            self._open_upstream(target)
        except Exception:  # noqa: BLE001 - as above
            _log.exception("unexpected error forwarding a %s call", self._kind)
            self._fail(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE, GATEWAY_INTERNAL)
        flush_dirty()

    def _open_upstream(self, target: CallTarget) -> None:
        address = target.upstream.address
        upstream = self._front.upstreams.connection(address)
        headers: list[Header] = [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", self._path),
            (b":authority", address.encode()),
            gh.CONTENT_TYPE_GRPC,
            (b"te", b"trailers"),
        ]
        assert self._context is not None
        remaining = self._context.time_remaining()
        if remaining is not None:
            headers.append((gh.GRPC_TIMEOUT, gh.format_timeout(remaining)))
        if self._encoding:
            headers.append((gh.GRPC_ENCODING, self._encoding))
        headers += gh.request_headers_to_forward(self._headers)
        headers.append(_USER_AGENT)
        self._upstream = upstream
        self._upstream_id = upstream.open_stream(headers, False, UpstreamSide(self))
        buffer = self._buffer
        if not self._streaming:
            data = bytes(buffer)
            buffer.clear()
            upstream.send_data(self._upstream_id, data, self._client_ended)
            self._release_window()
            return
        # Streams: the first message as it came, then the later ones one by one.
        length = int.from_bytes(buffer[1:5], "big")
        first = bytes(buffer[: _MESSAGE_PREFIX + length])
        del buffer[: _MESSAGE_PREFIX + length]
        upstream.send_data(self._upstream_id, first, False)
        self._read_messages()
        self._release_window()

    # -- the instance's stream -------------------------------------------------------

    def up_headers(self, headers: tuple[Header, ...], end_stream: bool) -> None:
        if self._done:
            return
        target = self._target
        assert target is not None
        if not self._headers_sent:
            self._headers_sent = True
            http_error = gh.http_status_code(headers)
            if http_error is not None:
                self._upstream_failed(http_error, "the instance answered with HTTP "
                                      "status other than 200; is it a gRPC server?")
                return
            out = [gh.STATUS_200, gh.CONTENT_TYPE_GRPC]
            if not end_stream:
                out += gh.response_headers_to_return(headers)
            out.append((gh.ROUTE_TARGET, target.instance_id.encode()))
            self._client.send_headers(self._stream_id, out, False)
            if not end_stream:
                self._flush_injected()
                return
        if not end_stream:
            return  # a second header block that is not trailers: not gRPC; ignore it
        self._flush_injected(final=True)
        trailers = gh.trailers_to_return(headers)
        code = gh.status_code_of(headers)
        if not any(name == gh.GRPC_STATUS for name, _ in trailers):
            trailers = [*gh.status_trailers(code, "the instance sent no grpc-status"), *trailers]
        self._client.send_headers(self._stream_id, trailers, True)
        self._end(code, "" if code is grpc.StatusCode.OK else INSTANCE_STATUS)

    def up_data(self, data: bytes, end_stream: bool) -> None:
        assert self._upstream is not None
        self._upstream.release_connection_window(len(data))
        if self._done:
            return
        if data:
            if not self._client.send_data(self._stream_id, data, False):
                self._upstream.release_stream_window(self._upstream_id, len(data))
            if self._streaming:
                self._track_responses(data)
                self._flush_injected()
        if end_stream:
            self._upstream_failed(grpc.StatusCode.INTERNAL,
                                  "the instance ended its response without a gRPC status")

    def up_reset(self, error_code: int, reason: str) -> None:
        if self._done:
            return
        if error_code == f.CANCEL:
            self._upstream_failed(grpc.StatusCode.CANCELLED, "the instance cancelled the call")
        elif error_code in (CONNECTION_LOST, f.REFUSED_STREAM):
            target = self._target
            where = f" {target.instance_id!r}" if target is not None else ""
            self._upstream_failed(grpc.StatusCode.UNAVAILABLE,
                                  f"instance{where} is unreachable ({reason}); retry the call")
        elif error_code == f.ENHANCE_YOUR_CALM:
            self._upstream_failed(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                  "the instance refused the call as too many")
        else:
            self._upstream_failed(grpc.StatusCode.INTERNAL,
                                  f"the instance reset the call (HTTP/2 error {error_code})")

    def up_sent(self, count: int) -> None:
        """Request bytes reached the instance's connection: the client may send more."""
        self._release_window()

    def _upstream_failed(self, code: grpc.StatusCode, message: str) -> None:
        if self._upstream is not None and self._upstream_id:
            self._upstream.reset_stream(self._upstream_id, f.CANCEL)
        self._flush_injected(final=True)
        target = self._target
        if not self._headers_sent and target is not None:
            self._headers_sent = True
            self._client.send_headers(
                self._stream_id,
                [gh.STATUS_200, gh.CONTENT_TYPE_GRPC,
                 (gh.ROUTE_TARGET, target.instance_id.encode())],
                False,
            )
        send_status(self._client, self._stream_id, code, message, headers_sent=True)
        self._end(code, INSTANCE_STATUS)

    # -- gateway responses inside a stream -------------------------------------------

    def _inject(self, response: bytes) -> None:
        self._injected.append(b"\x00" + len(response).to_bytes(4, "big") + response)
        self._flush_injected()

    def _track_responses(self, data: bytes) -> None:
        """Follow the instance's message boundaries so injected responses fit between."""
        position = 0
        end = len(data)
        while position < end:
            if self._response_left:
                step = min(self._response_left, end - position)
                self._response_left -= step
                position += step
                continue
            need = _MESSAGE_PREFIX - len(self._response_header)
            self._response_header += data[position : position + need]
            position += need
            if len(self._response_header) == _MESSAGE_PREFIX:
                self._response_left = int.from_bytes(self._response_header[1:5], "big")
                self._response_header = b""

    def _flush_injected(self, final: bool = False) -> None:
        if not self._injected or not self._headers_sent:
            return
        at_boundary = not self._response_left and not self._response_header
        if not (at_boundary or final):
            return
        for message in self._injected:
            self._injected_bytes += len(message)
            self._client.send_data(self._stream_id, message, False)
        self._injected.clear()

    # -- endings ---------------------------------------------------------------------

    def _deadline_passed(self) -> None:
        self._timer = None
        if self._done:
            return
        if self._task is not None:
            return  # admission ends the wait itself (QUEUE_TIMEOUT)
        if self._upstream_id and self._upstream is not None:
            self._upstream.reset_stream(self._upstream_id, f.CANCEL)
        self._fail(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", DEADLINE_PASSED)
        flush_dirty()

    def _refuse(self, err: CallError) -> None:
        """End the call with a refusal of the gateway's own."""
        if self._done:
            return
        send_status(self._client, self._stream_id, err.code, err.message,
                     err.trailing_metadata(), self._headers_sent)
        self._end(err.code, err.reason)

    def _fail(self, code: grpc.StatusCode, message: str, reason: str) -> None:
        send_status(self._client, self._stream_id, code, message,
                     headers_sent=self._headers_sent)
        self._end(code, reason)

    def _finish_local(self, code: grpc.StatusCode, message: str) -> None:
        send_status(self._client, self._stream_id, code, message)
        self._done = True
        self._cancel_timer()
        self._release_window()

    def _end(self, code: grpc.StatusCode, reason: str) -> None:
        if self._done:
            return
        self._done = True
        self._cancel_timer()
        self._buffer.clear()
        self._injected.clear()
        self._release_window()
        target = self._target
        if target is None:
            return
        target.release()
        target.observer.ended(
            target.deployment.name, self._kind, code, reason,
            time.monotonic() - self._arrived_at,
        )

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def _loop_time(deadline: float) -> float:
    """A time.monotonic() deadline on the event loop's clock."""
    loop = asyncio.get_running_loop()
    return loop.time() + (deadline - time.monotonic())
