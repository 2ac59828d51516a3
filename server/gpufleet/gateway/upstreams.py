"""Long-lived gRPC channels to instances: one per instance address, shared by all calls.

Opening a channel (TCP + HTTP/2 handshake) per call would cost more than a small inference
call itself, so a channel is opened on first use and kept while its address is in the route
table. When an address leaves the table its channel is closed as soon as no call uses it:
calls still running on a removed (e.g. draining) instance are allowed to finish.

The raw-bytes method objects ("multicallables") of a channel are made once per method and
kept with it: every call of the same method reuses them instead of building a new one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection, Sequence
from types import TracebackType
from typing import Any

import grpc

_log = logging.getLogger(__name__)

UnaryMethod = grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]
StreamMethod = grpc.aio.StreamStreamMultiCallable[bytes, bytes]


class _Entry:
    __slots__ = ("address", "channel", "users", "unary", "streams")

    def __init__(self, address: str, channel: grpc.aio.Channel) -> None:
        self.address = address
        self.channel = channel
        self.users = 0
        # One per method the gateway has forwarded to this instance; the method set is
        # small (the inference service's plus the deployment's own), so no bound is needed
        # beyond the channel's life.
        self.unary: dict[str, UnaryMethod] = {}
        self.streams: dict[str, StreamMethod] = {}


class Upstream:
    """One call's use of an instance channel; release it when the call ends."""

    __slots__ = ("_pool", "_entry", "_released")

    def __init__(self, pool: UpstreamPool, entry: _Entry) -> None:
        self._pool = pool
        self._entry = entry
        self._released = False

    @property
    def channel(self) -> grpc.aio.Channel:
        """The instance's channel."""
        return self._entry.channel

    @property
    def address(self) -> str:
        """The instance's "host:port"."""
        return self._entry.address

    def unary_unary(self, method: str) -> UnaryMethod:
        """`method` ("/package.Service/Method") as a raw-bytes unary call on the channel."""
        callable_ = self._entry.unary.get(method)
        if callable_ is None:
            # No (de)serializers: bytes pass through unchanged both ways.
            callable_ = self._entry.channel.unary_unary(method, None, None)
            self._entry.unary[method] = callable_
        return callable_

    def stream_stream(self, method: str) -> StreamMethod:
        """`method` as a raw-bytes bidi-streaming call on the channel."""
        callable_ = self._entry.streams.get(method)
        if callable_ is None:
            callable_ = self._entry.channel.stream_stream(method, None, None)
            self._entry.streams[method] = callable_
        return callable_

    def release(self) -> None:
        """The call is over; later calls do nothing."""
        if self._released:
            return
        self._released = True
        self._pool._release(self._entry)

    def __enter__(self) -> Upstream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()


class UpstreamPool:
    """Channels to instances, keyed by "host:port"."""

    def __init__(self, options: Sequence[tuple[str, Any]] = ()) -> None:
        self._options = list(options)
        self._entries: dict[str, _Entry] = {}
        self._wanted: frozenset[str] = frozenset()
        self._closing: set[asyncio.Task[None]] = set()
        self._closed = False
        self.on_retain: Callable[[frozenset[str]], None] | None = None
        """Told the table's addresses on every retain (the HTTP/2 front's own pool)."""

    @property
    def addresses(self) -> frozenset[str]:
        """Addresses that have an open channel now."""
        return frozenset(self._entries)

    def checkout(self, address: str) -> Upstream:
        """The channel to `address` for one call, opening it if needed."""
        if self._closed:
            raise RuntimeError("the upstream pool is closed; the gateway is stopping")
        entry = self._entries.get(address)
        if entry is None:
            # An address the table does not list (it changed meanwhile) gets a channel too;
            # it closes when the call ends.
            entry = _Entry(address, grpc.aio.insecure_channel(address, options=self._options))
            self._entries[address] = entry
        entry.users += 1
        return Upstream(self, entry)

    def retain(self, addresses: Collection[str]) -> None:
        """The route table's addresses now: others close once their calls have ended."""
        self._wanted = frozenset(addresses)
        if self.on_retain is not None:
            self.on_retain(self._wanted)
        for address, entry in list(self._entries.items()):
            if address not in self._wanted and entry.users == 0:
                self._close_entry(entry)

    async def close(self) -> None:
        """Close every channel at once (calls still running are cancelled)."""
        self._closed = True
        for entry in list(self._entries.values()):
            self._close_entry(entry)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    def _release(self, entry: _Entry) -> None:
        entry.users -= 1
        if self._entries.get(entry.address) is not entry:
            return  # closed already, by close()
        if entry.users == 0 and entry.address not in self._wanted:
            self._close_entry(entry)

    def _close_entry(self, entry: _Entry) -> None:
        if self._entries.get(entry.address) is entry:
            del self._entries[entry.address]
        task = asyncio.get_running_loop().create_task(entry.channel.close(None))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
        _log.debug("closing the channel to instance address %s", entry.address)
