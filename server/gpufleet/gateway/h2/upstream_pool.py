"""HTTP/2 client connections from the gateway to instances, one shared per address."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection

from gpufleet.gateway.h2.connection import H2Connection

_log = logging.getLogger(__name__)


def split_address(address: str) -> tuple[str, int]:
    """"HOST:PORT" or "[v6]:PORT" (a gRPC target, optionally "ipv4:"/"ipv6:" prefixed)."""
    for prefix in ("ipv4:", "ipv6:", "dns:///", "dns:"):
        if address.startswith(prefix):
            address = address[len(prefix) :]
    host, _, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


class H2UpstreamPool:
    """Open connections by address; a new one replaces one that closed or refuses streams."""

    def __init__(self) -> None:
        self._connections: dict[str, H2Connection] = {}
        self._connecting: set[asyncio.Task[None]] = set()

    def connection(self, address: str) -> H2Connection:
        """A connection to `address` that can take a new stream now (it may still be
        connecting: frames queue until it is up, or its streams fail if it cannot be)."""
        return self.connection_to(address, address)

    def connection_to(self, key: str, address: str) -> H2Connection:
        """Like `connection`, kept under `key` (several connections to one address)."""
        connection = self._connections.get(key)
        if connection is not None and connection.can_open_stream():
            return connection
        if connection is not None:
            connection.close_when_idle()
        connection = H2Connection(client=True, on_closed=self._closed, name=key)
        self._connections[key] = connection
        task = asyncio.get_running_loop().create_task(self._connect(connection, address))
        self._connecting.add(task)
        task.add_done_callback(self._connecting.discard)
        return connection

    async def _connect(self, connection: H2Connection, address: str) -> None:
        loop = asyncio.get_running_loop()
        try:
            if address.startswith("unix:"):
                await loop.create_unix_connection(lambda: connection, address[len("unix:") :])
            else:
                host, port = split_address(address)
                await loop.create_connection(lambda: connection, host, port)
        except (OSError, ValueError) as err:
            connection.fail(f"cannot connect to {address}: {err}")

    def _closed(self, connection: H2Connection) -> None:
        if self._connections.get(connection.name) is connection:
            del self._connections[connection.name]

    def retain(self, addresses: Collection[str]) -> None:
        """Close (once idle) the connections to addresses no longer routed to."""
        for address, connection in list(self._connections.items()):
            if address not in addresses:
                del self._connections[address]
                connection.close_when_idle()

    def close(self) -> None:
        """Close every connection now."""
        for task in self._connecting:
            task.cancel()
        for connection in list(self._connections.values()):
            connection.close()
        self._connections.clear()
