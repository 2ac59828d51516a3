"""The floor of the gateway benchmarks: the least a grpc.aio proxy can do per call.

`python -m bench.bare_proxy --upstream HOST:PORT` forwards ModelInfer and ModelStreamInfer
to one instance as raw bytes over one channel with its two method objects made once: no
routing, admission, token check, metadata or status handling. What the gateway costs
beyond this is what gpufleet's own data-plane code costs; the rest is the price of a
Python gRPC hop. Prints "bare proxy listening on HOST:PORT" once it serves.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc

from bench.proxy_cli import run_proxy, wait_for_stop_signal

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
    await wait_for_stop_signal()
    await server.stop(1.0)
    await channel.close(None)


def main(argv: Sequence[str] | None = None) -> int:
    return run_proxy(
        argv,
        "python -m bench.bare_proxy",
        "Raw-bytes grpc.aio proxy of ModelInfer/ModelStreamInfer to one instance.",
        serve,
    )


if __name__ == "__main__":
    raise SystemExit(main())
