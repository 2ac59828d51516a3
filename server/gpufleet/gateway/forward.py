"""Forwarding one admitted call to its instance as raw bytes, both ways.

No message is decoded: request and response bytes pass through unchanged, which is both
the fastest way and what makes the proxy transparent to any service. Around the messages:

- request metadata goes out filtered (metadata.py), with the time left before the client's
  deadline as the instance call's deadline;
- the instance's initial metadata comes back first, with `deploy-route-target` added;
- its trailing metadata, status code and details come back unchanged;
- a client that cancels (or whose deadline passes) cancels the instance call;
- nothing is ever retried, so no stream message reaches an instance twice.

A stream forwarded here may be a unary, client-, server- or bidi-streaming call on the
client's side: on the wire all four are a stream of messages each way.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any, cast

import grpc

from gpufleet.gateway.metadata import Metadatum, headers_to_return, trailers_to_return
from gpufleet.gateway.upstreams import StreamMethod, UnaryMethod

_log = logging.getLogger(__name__)

_Context = grpc.aio.ServicerContext[Any, Any]


async def forward_unary(
    context: _Context,
    instance_method: UnaryMethod,
    request: bytes,
    *,
    metadata: Sequence[Metadatum],
    timeout: float | None,
    route_target: str,
) -> bytes:
    """Forward a unary call to `instance_method` (Upstream.unary_unary); returns the
    response bytes or ends the call with the instance's status."""
    call = instance_method(request, timeout=timeout, metadata=metadata)
    try:
        response: bytes = await call
    except grpc.aio.AioRpcError as err:
        await context.send_initial_metadata(
            headers_to_return(err.initial_metadata(), route_target)
        )
        # The stubs type these as grpc's sync metadata; at run time they are aio Metadata.
        trailers = cast(Iterable[Metadatum], err.trailing_metadata())
        await context.abort(err.code(), err.details() or "", trailers_to_return(trailers))
    except asyncio.CancelledError:
        call.cancel()
        raise
    await context.send_initial_metadata(
        headers_to_return(await call.initial_metadata(), route_target)
    )
    context.set_trailing_metadata(trailers_to_return(await call.trailing_metadata()))
    return response


class StreamWriter:
    """The one writer of a forwarded stream's responses.

    Responses from the instance and responses the gateway adds itself (see
    `write_after_headers`) are written one at a time, and never before the headers.
    """

    def __init__(self, context: _Context) -> None:
        self._context = context
        self._lock = asyncio.Lock()
        self._headers_sent = asyncio.Event()
        self._pending: set[asyncio.Task[None]] = set()

    async def send_headers(self, headers: Sequence[Metadatum]) -> None:
        """Send the initial metadata; must come before any write."""
        await self._context.send_initial_metadata(headers)
        self._headers_sent.set()

    async def write(self, message: bytes) -> None:
        """Write one response now (the headers are sent)."""
        async with self._lock:
            await self._context.write(message)

    def write_after_headers(self, message: bytes) -> None:
        """Queue a response of the gateway's own without blocking the caller: the request
        pump calls this and must not wait for the instance to send its headers."""
        task = asyncio.get_running_loop().create_task(self._write_later(message))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def flush(self) -> None:
        """Wait for the queued responses to be written."""
        while self._pending:
            queued = list(self._pending)
            await asyncio.gather(*queued, return_exceptions=True)
            self._pending.difference_update(queued)

    def cancel(self) -> None:
        """Drop the queued responses (the call is over)."""
        for task in self._pending:
            task.cancel()

    async def _write_later(self, message: bytes) -> None:
        await self._headers_sent.wait()
        try:
            await self.write(message)
        except Exception as err:  # noqa: BLE001 - the client is gone; nothing to tell it
            _log.debug("dropping a gateway response on a finished stream: %s", err)


async def forward_stream(
    context: _Context,
    instance_method: StreamMethod,
    requests: AsyncIterator[bytes],
    writer: StreamWriter,
    *,
    metadata: Sequence[Metadatum],
    timeout: float | None,
    route_target: str,
) -> None:
    """Forward a call of any kind as a stream to `instance_method`
    (Upstream.stream_stream); ends the call with the instance's status.

    `requests` is consumed by the instance call as the instance reads; when it ends, the
    instance sees the client's half-close.
    """
    call = instance_method(requests, timeout=timeout, metadata=metadata)
    try:
        headers = await call.initial_metadata()
        await writer.send_headers(headers_to_return(headers, route_target))
        try:
            async for message in call:
                await writer.write(message)
        except grpc.aio.AioRpcError:
            pass  # the status is read below, the same way for every ending
        code = await call.code()
        details = await call.details()
        trailers = trailers_to_return(await call.trailing_metadata())
        await writer.flush()
    except asyncio.CancelledError:
        call.cancel()
        writer.cancel()
        raise
    if code is not grpc.StatusCode.OK:
        writer.cancel()
        await context.abort(code, details or "", trailers)
    context.set_trailing_metadata(trailers)
