"""The floor of benchmark 6: a bare grpc.aio NodeService that only takes heartbeats.

`python -m bench.heartbeat_floor [--listen 127.0.0.1:0] [--heartbeat-interval 1]` answers
Register with a made-up node id and secret (no join token check, no store), and Connect by
sending one empty ConnectResponse (as the control plane's first message) and then reading
and dropping every heartbeat. The generated servicer still parses each ConnectRequest, as
the control plane's does. What the control plane uses beyond this, for the same agent
pool, is what gpufleet's node handling costs. Prints "heartbeat floor listening on
HOST:PORT" once it serves.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import signal
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc

from gpufleet.v1 import node_service_pb2 as pb, node_service_pb2_grpc

LISTENING = "heartbeat floor listening on "

_Context = grpc.aio.ServicerContext[Any, Any]


class DiscardingNodeService(node_service_pb2_grpc.NodeServiceServicer):
    """Register hands out ids; Connect swallows heartbeats."""

    def __init__(self, heartbeat_interval_seconds: int) -> None:
        self._interval = heartbeat_interval_seconds
        self._ids = itertools.count(1)

    async def Register(  # noqa: N802 - gRPC method name
        self, request: pb.RegisterRequest, context: _Context
    ) -> pb.RegisterResponse:
        number = next(self._ids)
        return pb.RegisterResponse(
            node_id=f"floor-{number}",
            node_secret=f"floor-secret-{number}",
            heartbeat_interval_seconds=self._interval,
        )

    async def Connect(  # noqa: N802 - gRPC method name
        self, request_iterator: AsyncIterator[pb.ConnectRequest], context: _Context
    ) -> AsyncIterator[pb.ConnectResponse]:
        yield pb.ConnectResponse(desired=pb.DesiredInstances())
        async for _ in request_iterator:
            pass


async def serve(listen: str, heartbeat_interval_seconds: int) -> None:
    """Serve until SIGTERM or SIGINT."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    node_service_pb2_grpc.add_NodeServiceServicer_to_server(
        DiscardingNodeService(heartbeat_interval_seconds), server
    )
    port = server.add_insecure_port(listen)
    if port == 0:
        raise SystemExit(f"heartbeat floor: cannot listen on {listen}; pick another --listen")
    await server.start()
    print(f"{LISTENING}{listen.rpartition(':')[0]}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop(1.0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.heartbeat_floor",
        description="NodeService that accepts agents and discards their heartbeats.",
    )
    parser.add_argument("--listen", default="127.0.0.1:0", metavar="HOST:PORT")
    parser.add_argument("--heartbeat-interval", type=int, default=1, metavar="SECONDS")
    args = parser.parse_args(argv)
    if args.heartbeat_interval < 1:
        parser.error("--heartbeat-interval must be a whole number of seconds >= 1")
    asyncio.run(serve(args.listen, args.heartbeat_interval))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
