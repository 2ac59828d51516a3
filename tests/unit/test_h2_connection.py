"""gateway/h2/connection.py between two real sockets on 127.0.0.1: flow control holds a
writer back until its reader lets bytes on, trailers wait for the data queued before them,
large header blocks cross as CONTINUATION frames, GOAWAY and a lost connection end the
streams they should."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest

from gpufleet.gateway.h2 import frames as f
from gpufleet.gateway.h2.connection import (
    CONNECTION_LOST,
    LOCAL_STREAM_WINDOW,
    H2Connection,
    flush_dirty,
)
from gpufleet.gateway.h2.hpack_codec import Header

pytestmark = pytest.mark.timeout(30)

REQUEST: list[Header] = [
    (b":method", b"POST"),
    (b":scheme", b"http"),
    (b":path", b"/test/Call"),
    (b":authority", b"test"),
]


@dataclass
class Recorder:
    """A stream handler that records what it hears and lets nothing on by itself."""

    headers: list[tuple[tuple[Header, ...], bool]] = field(default_factory=list)
    data: bytearray = field(default_factory=bytearray)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    resets: list[tuple[int, str]] = field(default_factory=list)
    sent: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def on_headers(self, headers: tuple[Header, ...], end_stream: bool) -> None:
        self.headers.append((headers, end_stream))
        if end_stream:
            self.ended.set()
        self.changed.set()

    def on_data(self, data: bytes, end_stream: bool) -> None:
        self.data += data
        if end_stream:
            self.ended.set()
        self.changed.set()

    def on_reset(self, error_code: int, reason: str) -> None:
        self.resets.append((error_code, reason))
        self.ended.set()
        self.changed.set()

    def on_sent(self, count: int) -> None:
        self.sent += count
        self.changed.set()


@dataclass
class Pair:
    client: H2Connection
    server_streams: list[tuple[H2Connection, int, Recorder]]
    server_connections: list[H2Connection]
    server: asyncio.base_events.Server

    async def next_server_stream(self) -> tuple[H2Connection, int, Recorder]:
        for _ in range(200):
            if self.server_streams:
                return self.server_streams.pop(0)
            await asyncio.sleep(0.01)
        raise AssertionError("no stream reached the server")


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    async def wait() -> None:
        while not predicate():
            await asyncio.sleep(0.005)

    await asyncio.wait_for(wait(), timeout)


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    loop = asyncio.get_running_loop()
    streams: list[tuple[H2Connection, int, Recorder]] = []

    def new_stream(
        connection: H2Connection, stream_id: int, headers: tuple[Header, ...], end: bool
    ) -> Recorder:
        recorder = Recorder()
        streams.append((connection, stream_id, recorder))
        return recorder

    connections: list[H2Connection] = []

    def new_connection() -> H2Connection:
        connection = H2Connection(client=False, on_new_stream=new_stream)
        connections.append(connection)
        return connection

    server = await loop.create_server(new_connection, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = H2Connection(client=True, name="test")
    await loop.create_connection(lambda: client, "127.0.0.1", port)
    yield Pair(client, streams, connections, server)
    client.close()
    for connection in connections:
        connection.close()
    server.close()
    await server.wait_closed()


async def test_a_reader_that_lets_nothing_on_holds_the_writer_at_its_window(pair: Pair) -> None:
    sender = Recorder()
    stream_id = pair.client.open_stream(REQUEST, False, sender)
    total = LOCAL_STREAM_WINDOW + 300_000
    pair.client.send_data(stream_id, b"x" * total, end_stream=True)
    flush_dirty()
    server, server_id, receiver = await pair.next_server_stream()
    await until(lambda: len(receiver.data) == LOCAL_STREAM_WINDOW)
    await asyncio.sleep(0.1)
    assert len(receiver.data) == LOCAL_STREAM_WINDOW  # nothing beyond the window
    assert pair.client.queued_bytes(stream_id) == 300_000
    assert sender.sent == LOCAL_STREAM_WINDOW
    # Letting the bytes on refills the window, and the rest comes with END_STREAM.
    server.release_window(server_id, len(receiver.data))
    flush_dirty()
    await asyncio.wait_for(receiver.ended.wait(), 5)
    assert len(receiver.data) == total and pair.client.queued_bytes(stream_id) == 0


async def test_trailers_wait_for_the_data_queued_before_them(pair: Pair) -> None:
    caller = Recorder()
    stream_id = pair.client.open_stream(REQUEST, True, caller)
    flush_dirty()
    server, server_id, _ = await pair.next_server_stream()
    server.send_headers(server_id, [(b":status", b"200")], False)
    body = b"y" * (LOCAL_STREAM_WINDOW + 70_000)  # more than the client's window
    server.send_data(server_id, body)
    server.send_headers(server_id, [(b"grpc-status", b"0")], True)
    flush_dirty()
    await until(lambda: len(caller.data) == LOCAL_STREAM_WINDOW)
    await asyncio.sleep(0.1)
    assert len(caller.headers) == 1 and not caller.ended.is_set()  # trailers held back
    pair.client.release_window(stream_id, len(caller.data))
    flush_dirty()
    await asyncio.wait_for(caller.ended.wait(), 5)
    assert bytes(caller.data) == body
    assert caller.headers[-1] == (((b"grpc-status", b"0"),), True)


async def test_large_header_blocks_cross_as_continuation_frames(pair: Pair) -> None:
    big = (b"x-big", b"v" * 40_000)  # more than the default 16 KiB frame
    stream_id = pair.client.open_stream([*REQUEST, big], True, Recorder())
    flush_dirty()
    _, server_id, receiver = await pair.next_server_stream()
    assert server_id == stream_id
    await until(lambda: bool(receiver.headers))
    headers, end_stream = receiver.headers[0]
    assert end_stream and headers[-1] == big


async def test_goaway_refuses_the_streams_above_its_last_id(pair: Pair) -> None:
    first = Recorder()
    pair.client.open_stream(REQUEST, False, first)
    flush_dirty()
    server, _, _ = await pair.next_server_stream()
    unseen = Recorder()
    pair.client.open_stream(REQUEST, False, unseen)  # queued, not yet sent
    server.goaway()  # names stream 1, the last the server saw
    await asyncio.wait_for(unseen.ended.wait(), 5)
    assert unseen.resets[0][0] == f.REFUSED_STREAM
    assert not pair.client.accepting and not pair.client.can_open_stream()
    # The stream the server had seen stays open and can still finish.
    assert first.resets == []
    late = Recorder()
    pair.client.open_stream(REQUEST, True, late)
    flush_dirty()
    await asyncio.wait_for(late.ended.wait(), 5)
    assert late.resets[0][0] == f.REFUSED_STREAM  # the server takes no new stream


async def test_a_lost_connection_ends_every_open_stream(pair: Pair) -> None:
    callers = [Recorder() for _ in range(3)]
    for caller in callers:
        pair.client.open_stream(REQUEST, False, caller)
    flush_dirty()
    for _ in callers:
        await pair.next_server_stream()
    for connection in pair.server_connections:
        connection.close()
    for caller in callers:
        await asyncio.wait_for(caller.ended.wait(), 5)
        assert caller.resets[0][0] == CONNECTION_LOST
    assert pair.client.closed and pair.client.stream_count() == 0


async def test_bytes_queued_on_a_reset_stream_count_as_sent(pair: Pair) -> None:
    # The handler gives a window back for every byte it queued, sent or dropped: else the
    # connection its bytes came from would lose that much window for good.
    stream_id = pair.client.open_stream(REQUEST, True, Recorder())
    flush_dirty()
    server, server_id, responder = await pair.next_server_stream()
    server.send_headers(server_id, [(b":status", b"200")], False)
    total = LOCAL_STREAM_WINDOW + 500_000
    server.send_data(server_id, b"z" * total)
    flush_dirty()
    await until(lambda: responder.sent == LOCAL_STREAM_WINDOW)
    assert server.queued_bytes(server_id) == 500_000
    pair.client.reset_stream(stream_id, f.CANCEL)
    flush_dirty()
    await until(lambda: responder.sent == total)
    assert responder.resets[0][0] == f.CANCEL


async def test_bytes_queued_when_the_connection_is_lost_count_as_sent(pair: Pair) -> None:
    sender = Recorder()
    stream_id = pair.client.open_stream(REQUEST, False, sender)
    pair.client.send_data(stream_id, b"q" * (LOCAL_STREAM_WINDOW + 1000))
    flush_dirty()
    await pair.next_server_stream()
    await until(lambda: sender.sent == LOCAL_STREAM_WINDOW)
    for connection in pair.server_connections:
        connection.close()
    await asyncio.wait_for(sender.ended.wait(), 5)
    assert sender.sent == LOCAL_STREAM_WINDOW + 1000
