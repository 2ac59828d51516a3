"""A wire floor of the gateway benchmarks: the least any Python hop can cost.

`python -m bench.tcp_splice --upstream HOST:PORT` copies bytes both ways between each
client connection and a connection of its own to the instance, with asyncio protocols and
no parsing at all: no HTTP/2, no gRPC, so no routing or per-call anything. A gateway
cannot be this cheap (it must at least read each call's method and model name); the
figure bounds from below what a Python process on the path costs on this machine.
Prints "tcp splice listening on HOST:PORT" once it serves.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from bench.proxy_cli import run_proxy, wait_for_stop_signal

LISTENING = "tcp splice listening on "


class _Pipe(asyncio.Protocol):
    """One side of a spliced pair: what it reads goes to `peer`'s transport."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Pipe | None = None
        self._early: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is None or peer.transport is None:
            self._early.append(data)  # the instance connection is still being opened
            return
        peer.transport.write(data)

    def attach(self, peer: _Pipe) -> None:
        self.peer = peer
        assert peer.transport is not None
        for data in self._early:
            peer.transport.write(data)
        self._early.clear()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()


async def serve(upstream: str, listen: str) -> None:
    """Serve until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    upstream_host, _, upstream_port = upstream.rpartition(":")

    def accepted() -> _Pipe:
        client = _Pipe()

        async def connect() -> None:
            try:
                _, instance = await loop.create_connection(
                    _Pipe, upstream_host, int(upstream_port)
                )
            except OSError:
                if client.transport is not None:
                    client.transport.close()
                return
            instance.peer = client
            client.attach(instance)

        loop.create_task(connect())
        return client

    host, _, port = listen.rpartition(":")
    server = await loop.create_server(accepted, host, int(port))
    bound = server.sockets[0].getsockname()[1]
    print(f"{LISTENING}{host}:{bound}", flush=True)
    await wait_for_stop_signal()
    server.close()


def main(argv: Sequence[str] | None = None) -> int:
    return run_proxy(argv, "python -m bench.tcp_splice", "Copy TCP bytes both ways between each client and the instance.", serve)

if __name__ == "__main__":
    raise SystemExit(main())
