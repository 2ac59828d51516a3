"""Open Inference Protocol load for the gateway benchmarks: the same client code drives the
gateway and the instance, with the generated stubs over grpc.aio.

- unary: `in_flight` workers each call ModelInfer back to back;
- stream: one ModelStreamInfer stream with up to `in_flight` requests unanswered at a time
  (a window), each response matched to its request by id.

Every call must succeed: a failure ends the benchmark, since a figure that counts failed
calls would flatter the side that fails fast.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import grpc

from gpufleet.inference import grpc_service_pb2 as pb

if TYPE_CHECKING:
    # Declared only in the generated .pyi: the runtime class is GRPCInferenceServiceStub.
    from gpufleet.inference.grpc_service_pb2_grpc import (
        GRPCInferenceServiceAsyncStub as InferenceStub,
    )

CALL_TIMEOUT_SECONDS = 30.0
EOF: object = getattr(grpc.aio, "EOF")  # noqa: B009 - missing from the type stubs
_Metadata = Sequence[tuple[str, str]]


@dataclass(frozen=True)
class LoadResult:
    """One measured stretch of load."""

    seconds: float
    """From the first call started to the last answer."""
    latencies: list[float]
    """Seconds from sending each request to its answer."""

    @property
    def calls(self) -> int:
        return len(self.latencies)

    @property
    def per_second(self) -> float:
        return self.calls / self.seconds if self.seconds > 0 else 0.0


def infer_request(model: str, payload_bytes: int) -> pb.ModelInferRequest:
    """An echo request with one FP32 tensor of `payload_bytes` raw bytes (tritonclient's
    layout: shapes in `inputs`, data in raw_input_contents)."""
    if payload_bytes < 4 or payload_bytes % 4:
        raise ValueError(f"payload_bytes must be a positive multiple of 4 (FP32), got {payload_bytes}")
    payload = bytes(index % 251 for index in range(payload_bytes))
    return pb.ModelInferRequest(
        model_name=model,
        inputs=[
            pb.ModelInferRequest.InferInputTensor(
                name="INPUT0", datatype="FP32", shape=[payload_bytes // 4]
            )
        ],
        raw_input_contents=[payload],
    )


def check_echo(request: pb.ModelInferRequest, response: pb.ModelInferResponse) -> None:
    """Raise unless `response` echoes `request`'s tensor byte for byte."""
    if list(response.raw_output_contents) != list(request.raw_input_contents):
        raise RuntimeError(
            f"the echo model answered {len(response.raw_output_contents)} raw outputs that "
            "differ from the request's tensor; is the target the example model server?"
        )


async def unary_load(
    stub: InferenceStub,
    request: pb.ModelInferRequest,
    metadata: _Metadata,
    in_flight: int,
    seconds: float,
) -> LoadResult:
    """`in_flight` workers call ModelInfer until `seconds` pass."""
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            await stub.ModelInfer(request, metadata=metadata, timeout=CALL_TIMEOUT_SECONDS)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    return LoadResult(time.perf_counter() - started, latencies)


async def stream_load(
    stub: InferenceStub,
    template: pb.ModelInferRequest,
    metadata: _Metadata,
    in_flight: int,
    seconds: float,
) -> LoadResult:
    """One ModelStreamInfer stream: write while fewer than `in_flight` requests are
    unanswered, until `seconds` pass; then half-close and collect the last answers."""
    # The stubs type the request iterator as required; None is how grpc.aio asks for a
    # call driven with write() and read().
    call = cast(
        "grpc.aio.StreamStreamCall[pb.ModelInferRequest, pb.ModelStreamInferResponse]",
        cast(Any, stub.ModelStreamInfer)(None, metadata=metadata, timeout=None),
    )
    window = asyncio.Semaphore(in_flight)
    sent_at: dict[str, float] = {}
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    request = pb.ModelInferRequest()
    request.CopyFrom(template)

    async def write() -> None:
        number = 0
        while time.perf_counter() < deadline:
            await window.acquire()
            # write() serializes before it returns, so the one message can be reused.
            request.id = str(number)
            number += 1
            sent_at[request.id] = time.perf_counter()
            await call.write(request)
        await call.done_writing()

    async def read() -> None:
        while True:
            response = await call.read()
            if response is EOF:
                return
            answer = cast(pb.ModelStreamInferResponse, response)
            if answer.error_message:
                raise RuntimeError(f"stream request failed: {answer.error_message}")
            started = sent_at.pop(answer.infer_response.id)
            latencies.append(time.perf_counter() - started)
            window.release()

    started = time.perf_counter()
    try:
        await asyncio.wait_for(asyncio.gather(write(), read()), seconds + CALL_TIMEOUT_SECONDS)
    except BaseException:
        call.cancel()
        raise
    if sent_at:
        raise RuntimeError(f"the stream ended with {len(sent_at)} requests unanswered")
    return LoadResult(time.perf_counter() - started, latencies)
