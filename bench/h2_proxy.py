"""A wire floor of the gateway benchmarks: an HTTP/2 frame-level proxy in Python.

`python -m bench.h2_proxy --upstream HOST:PORT` terminates each client's HTTP/2
connection with hyper-h2 (https://python-hyper.org/projects/h2) and forwards every stream
onto one HTTP/2 connection to the instance: headers are decoded and re-encoded (HPACK
state is per connection), DATA is passed on as bytes within both sides' flow-control
windows, trailers and resets go back the way they came. No gRPC library is involved, so
no per-call completion queue, thread hop or batch; and no routing, admission or token
either. It measures what a gateway built on HTTP/2 frames instead of grpc.aio could cost
at best, next to bench.bare_proxy (the grpc.aio floor) and bench.tcp_splice (no parsing).
Prints "h2 proxy listening on HOST:PORT" once it serves.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings

from bench.proxy_cli import run_proxy, wait_for_stop_signal

LISTENING = "h2 proxy listening on "
# grpc's own defaults are far above HTTP/2's 64 KiB; small windows would measure
# WINDOW_UPDATE round trips, not the proxy.
_WINDOW_BYTES = 4 * 1024 * 1024


def _config(client_side: bool) -> h2.config.H2Configuration:
    # A proxy passes headers on as they came; validating them is the endpoints' job.
    return h2.config.H2Configuration(
        client_side=client_side,
        header_encoding=None,
        validate_inbound_headers=False,
        validate_outbound_headers=False,
        normalize_inbound_headers=False,
        normalize_outbound_headers=False,
    )


@dataclass
class _Chunk:
    data: bytes
    end_stream: bool
    on_sent: Callable[[], None]


class _Side(asyncio.Protocol):
    """One HTTP/2 connection of the proxy, with DATA waiting for flow-control window."""

    def __init__(self, client_side: bool) -> None:
        self.conn = h2.connection.H2Connection(_config(client_side))
        self.transport: asyncio.Transport | None = None
        self._waiting: dict[int, deque[_Chunk]] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.conn.local_settings = h2.settings.Settings(
            client=self.conn.config.client_side,
            initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: _WINDOW_BYTES},
        )
        self.conn.initiate_connection()
        self.conn.increment_flow_control_window(_WINDOW_BYTES)
        self.flush()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and self.transport is not None:
            self.transport.write(data)

    def send_data(self, stream_id: int, chunk: _Chunk) -> None:
        """Send now what the windows allow; the rest waits for a WINDOW_UPDATE."""
        queue = self._waiting.get(stream_id)
        if queue is not None:
            queue.append(chunk)
            return
        if not self._send_some(stream_id, chunk):
            self._waiting[stream_id] = deque([chunk])

    def _send_some(self, stream_id: int, chunk: _Chunk) -> bool:
        """Send as much of `chunk` as fits; True when all of it went."""
        while True:
            try:
                window = self.conn.local_flow_control_window(stream_id)
            except h2.exceptions.StreamClosedError:
                chunk.on_sent()  # nobody to send to: release the sender's window anyway
                return True
            size = min(window, self.conn.max_outbound_frame_size, len(chunk.data))
            if size == 0 and chunk.data:
                return False
            last = size == len(chunk.data)
            self.conn.send_data(stream_id, chunk.data[:size], end_stream=chunk.end_stream and last)
            if last:
                chunk.on_sent()
                return True
            chunk.data = chunk.data[size:]

    def window_opened(self) -> None:
        for stream_id in list(self._waiting):
            queue = self._waiting[stream_id]
            while queue and self._send_some(stream_id, queue[0]):
                queue.popleft()
            if not queue:
                del self._waiting[stream_id]

    def forget(self, stream_id: int) -> None:
        self._waiting.pop(stream_id, None)

    def acknowledger(self, event: h2.events.DataReceived) -> Callable[[], None]:
        """What gives `event`'s bytes back to the sender's window once they are passed on:
        the window opens only as fast as the other side takes the data."""
        stream_id, length = event.stream_id, event.flow_controlled_length or 0

        def acknowledge() -> None:
            try:
                self.conn.acknowledge_received_data(length, stream_id)
            except h2.exceptions.StreamClosedError:
                self.conn.increment_flow_control_window(length)
            self.flush()

        return acknowledge


class _Instance(_Side):
    """The one connection to the instance; its streams answer client streams."""

    def __init__(self) -> None:
        super().__init__(client_side=True)
        self.routes: dict[int, tuple[_Client, int]] = {}

    def data_received(self, data: bytes) -> None:
        touched: set[_Side] = {self}
        for event in self.conn.receive_data(data):
            if isinstance(event, h2.events.WindowUpdated):
                self.window_opened()
                continue
            route = self.routes.get(getattr(event, "stream_id", 0) or 0)
            if route is None:
                continue
            client, client_stream = route
            touched.add(client)
            if isinstance(event, h2.events.ResponseReceived):
                client.conn.send_headers(client_stream, event.headers)
            elif isinstance(event, h2.events.DataReceived):
                client.send_data(
                    client_stream,
                    _Chunk(event.data, False, self.acknowledger(event)),
                )
            elif isinstance(event, h2.events.TrailersReceived):
                del self.routes[event.stream_id]
                client.conn.send_headers(client_stream, event.headers, end_stream=True)
                client.streams.pop(client_stream, None)
            elif isinstance(event, h2.events.StreamReset):
                del self.routes[event.stream_id]
                client.streams.pop(client_stream, None)
                client.forget(client_stream)
                client.conn.reset_stream(client_stream, event.error_code or 0)
        for side in touched:
            side.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        for client, client_stream in self.routes.values():
            client.conn.reset_stream(client_stream)
            client.flush()
        self.routes.clear()


class _Client(_Side):
    """A client's connection; each of its streams goes to a new instance stream."""

    def __init__(self, instance: _Instance) -> None:
        super().__init__(client_side=False)
        self.instance = instance
        self.streams: dict[int, int] = {}

    def data_received(self, data: bytes) -> None:
        instance = self.instance
        for event in self.conn.receive_data(data):
            if isinstance(event, h2.events.WindowUpdated):
                self.window_opened()
            elif isinstance(event, h2.events.RequestReceived):
                upstream = instance.conn.get_next_available_stream_id()
                ended = event.stream_ended is not None
                instance.conn.send_headers(upstream, event.headers, end_stream=ended)
                instance.routes[upstream] = (self, event.stream_id)
                if not ended:
                    self.streams[event.stream_id] = upstream
            elif isinstance(event, h2.events.DataReceived):
                upstream = self.streams.get(event.stream_id, 0)
                ended = event.stream_ended is not None
                if ended:
                    self.streams.pop(event.stream_id, None)
                acknowledge = self.acknowledger(event)
                if upstream:
                    instance.send_data(upstream, _Chunk(event.data, ended, acknowledge))
                else:
                    acknowledge()  # the instance stream is gone (reset): drop the bytes
            elif isinstance(event, h2.events.StreamEnded):
                upstream = self.streams.pop(event.stream_id, 0)
                if upstream:  # a HEADERS-only end: no DATA carried the flag
                    instance.send_data(upstream, _Chunk(b"", True, lambda: None))
            elif isinstance(event, h2.events.StreamReset):
                upstream = self.streams.pop(event.stream_id, 0)
                if upstream:
                    instance.routes.pop(upstream, None)
                    instance.forget(upstream)
                    instance.conn.reset_stream(upstream, event.error_code or 0)
        instance.flush()
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        for upstream in self.streams.values():
            self.instance.routes.pop(upstream, None)
            self.instance.conn.reset_stream(upstream)
        self.streams.clear()
        self.instance.flush()


async def serve(upstream: str, listen: str) -> None:
    """Serve until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    upstream_host, _, upstream_port = upstream.rpartition(":")
    _, instance = await loop.create_connection(_Instance, upstream_host, int(upstream_port))
    host, _, port = listen.rpartition(":")
    server = await loop.create_server(lambda: _Client(instance), host, int(port))
    bound = server.sockets[0].getsockname()[1]
    print(f"{LISTENING}{host}:{bound}", flush=True)
    await wait_for_stop_signal()
    server.close()


def main(argv: Sequence[str] | None = None) -> int:
    return run_proxy(argv, "python -m bench.h2_proxy", "HTTP/2 frame-level proxy (hyper-h2) of every stream to one instance.", serve)

if __name__ == "__main__":
    raise SystemExit(main())
