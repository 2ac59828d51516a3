"""The floor of the gateway benchmarks: the least a grpc.aio proxy can do per call.

`python -m bench.bare_proxy --upstream HOST:PORT` forwards ModelInfer and ModelStreamInfer
to one instance as raw bytes over one channel with its two method objects made once: no
routing, admission, token check, metadata or status handling. What the gateway costs
beyond this is what gpufleet's own data-plane code costs; the rest is the price of a
Python gRPC hop. Prints "bare proxy listening on HOST:PORT" once it serves.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc

SERVICE = "inference.GRPCInferenceService"
LISTENING = "bare proxy listening on "

_Context = grpc.aio.ServicerContext[Any, Any]


async def serve(upstream: str, listen: str) -> None:
    """Serve until SIGTERM or SIGINT."""
    channel = grpc.aio.insecure_channel(upstream)
    infer = channel.unary_unary(f"/{SERVICE}/ModelInfer", None, None)
    stream = channel.stream_stream(f"/{SERVICE}/ModelStreamInfer", None, None)

    async def model_infer(request: bytes, context: _Context) -> bytes:
        response: bytes = await infer(request)
        return response

    async def model_stream_infer(
        requests: AsyncIterator[bytes], context: _Context
    ) -> AsyncIterator[bytes]:
        async for response in stream(requests):
            yield response

    handlers = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "ModelInfer": grpc.unary_unary_rpc_method_handler(model_infer),
            "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(model_stream_infer),
        },
    )
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((handlers,))
    port = server.add_insecure_port(listen)
    if port == 0:
        raise SystemExit(f"bare proxy: cannot listen on {listen}; pick another --listen")
    await server.start()
    host = listen.rpartition(":")[0]
    print(f"{LISTENING}{host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop(1.0)
    await channel.close(None)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bare_proxy",
        description="Raw-bytes grpc.aio proxy of ModelInfer/ModelStreamInfer to one instance.",
    )
    parser.add_argument("--upstream", required=True, metavar="HOST:PORT")
    parser.add_argument("--listen", default="127.0.0.1:0", metavar="HOST:PORT")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.upstream, args.listen))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
