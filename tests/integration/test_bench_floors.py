"""The gateway benchmarks' floors forward gRPC faithfully, so that their figures measure a
working hop: each floor runs as a real process in front of a real example model server,
and unary calls (small, many at once, and one larger than any HTTP/2 frame or initial
window) and a windowed bidi stream must come back as the exact echo."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from bench.bare_proxy import LISTENING as BARE_PROXY_LISTENING
from bench.gateway_targets import MODEL_SERVER_LISTENING
from bench.h2_proxy import LISTENING as H2_PROXY_LISTENING
from bench.oip_load import check_echo, infer_request, stream_load
from bench.processes import ServerProcess
from bench.tcp_splice import LISTENING as TCP_SPLICE_LISTENING
from gpufleet.inference import grpc_service_pb2_grpc

MODEL = "echo"
CALL_TIMEOUT_S = 20.0
# Each larger than HTTP/2's default 16 KiB frame; together larger than the 4 MiB windows
# grpc grants, so the h2 proxy's flow-control accounting must hold in both directions.
LARGE_PAYLOAD_BYTES = 1536 * 1024
LARGE_CALLS = 4


@pytest.fixture(scope="module")
def model_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log_dir = tmp_path_factory.mktemp("floors")
    server = ServerProcess(
        "model-server", ["examples.model_server", "--port", "0"], MODEL_SERVER_LISTENING, log_dir
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("module", "listening"),
    [
        ("bench.bare_proxy", BARE_PROXY_LISTENING),
        ("bench.h2_proxy", H2_PROXY_LISTENING),
        ("bench.tcp_splice", TCP_SPLICE_LISTENING),
    ],
)
async def test_floor_forwards_unary_and_stream_calls_exactly(
    model_server: ServerProcess, module: str, listening: str, tmp_path: Path
) -> None:
    proxy = ServerProcess(
        module.rpartition(".")[2], [module, "--upstream", model_server.address], listening, tmp_path
    )
    await asyncio.to_thread(proxy.start)
    try:
        async with grpc.aio.insecure_channel(proxy.address) as channel:
            stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
            small = infer_request(MODEL, 1024)
            check_echo(small, await stub.ModelInfer(small, timeout=CALL_TIMEOUT_S))

            answers = await asyncio.gather(
                *(stub.ModelInfer(small, timeout=CALL_TIMEOUT_S) for _ in range(16))
            )
            for answer in answers:
                check_echo(small, answer)

            large = infer_request(MODEL, LARGE_PAYLOAD_BYTES)
            answers = await asyncio.gather(
                *(stub.ModelInfer(large, timeout=CALL_TIMEOUT_S) for _ in range(LARGE_CALLS))
            )
            for answer in answers:
                check_echo(large, answer)

            # Raises if any answer is missing, wrong or carries an error.
            streamed = await stream_load(stub, small, (), in_flight=8, seconds=0.3)
            assert streamed.calls > 0
    finally:
        await asyncio.to_thread(proxy.stop)
        assert "Traceback" not in proxy.stderr(), proxy.stderr()
