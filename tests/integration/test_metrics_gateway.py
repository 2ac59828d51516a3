"""The gateway's /metrics endpoint over HTTP on 127.0.0.1, against a real gateway, a scripted
control plane, a real model server process and a small gRPC service for proxied calls:
calls by kind, an instance error, refused calls, a stream in flight, and a cold start
queued until its instance appears."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest

from gpufleet.gateway.call_observer import INSTANCE_STATUS, UNKNOWN_DEPLOYMENT
from gpufleet.gateway.metrics import start_gateway_metrics
from gpufleet.inference import grpc_service_pb2 as pb
from gpufleet.inference import grpc_service_pb2_grpc as pb_grpc
from gpufleet.server.errors import StartupError
from tests.integration.test_gateway_support import (
    AUTH,
    ModelServer,
    control_plane,
    failure,
    open_stream,
    read_message,
    route,
    running_gateway,
    start_model_server,
)
from tests.integration.test_metrics_support import Scrape, scrape, scrape_until

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def model_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelServer]:
    server = start_model_server(tmp_path_factory.mktemp("metrics"))
    yield server
    server.stop()


@contextlib.asynccontextmanager
async def demo_service() -> AsyncIterator[str]:
    """`demo.Echo/Say` answers its request; `demo.Echo/Fail` fails FAILED_PRECONDITION."""

    async def say(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        return request

    async def fail(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "scripted failure")

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "demo.Echo",
                {
                    "Say": grpc.unary_unary_rpc_method_handler(say),
                    "Fail": grpc.unary_unary_rpc_method_handler(fail),
                },
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


def _infer(model: str) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name="INPUT0", datatype="INT32", shape=[1])
    tensor.contents.int_contents.append(1)
    return request


async def test_gateway_metrics_count_calls_refusals_streams_and_cold_starts(
    model_server: ModelServer,
) -> None:
    async with demo_service() as demo, control_plane(
        route("echo", [("echo-1", model_server.address)], max_request_concurrency=4),
        route("demo", [("demo-1", demo)]),
        # No instance and no queue: every call is refused at once with QUEUE_FULL.
        route("full", max_queue_size=0),
        # Scaled to zero: a call waits until the test adds an instance.
        route("cold", queue_timeout_s=30),
    ) as plane, running_gateway(plane) as gateway:
        metrics = start_gateway_metrics(gateway, "127.0.0.1:0")
        try:
            assert metrics.host == "127.0.0.1" and metrics.port > 0
            async with grpc.aio.insecure_channel(gateway.address) as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                await stub.ModelInfer(_infer("echo"), metadata=AUTH, timeout=10)
                full = await failure(stub.ModelInfer(_infer("full"), metadata=AUTH, timeout=10))
                assert full.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                unknown = await failure(stub.ModelInfer(_infer("nope"), metadata=AUTH, timeout=10))
                assert unknown.code() == grpc.StatusCode.NOT_FOUND
                to_demo = (*AUTH, ("gpufleet-deployment", "demo"))
                say = channel.unary_unary("/demo.Echo/Say", None, None)
                assert await say(b"hi", metadata=to_demo, timeout=10) == b"hi"
                # The instance's own failure, passed through.
                fail = channel.unary_unary("/demo.Echo/Fail", None, None)
                failed = await failure(fail(b"", metadata=to_demo, timeout=10))
                assert failed.code() == grpc.StatusCode.FAILED_PRECONDITION

                stream = open_stream(
                    stub.ModelStreamInfer, pb.ModelStreamInferResponse, metadata=AUTH, timeout=20
                )
                await stream.write(_infer("echo"))
                assert await read_message(stream) is not None
                held = await scrape(metrics.url)
                assert held.value("gpufleet_gateway_in_flight_requests", deployment="echo") == 1
                await stream.done_writing()
                assert await read_message(stream) is None
                assert await stream.code() == grpc.StatusCode.OK

                cold_call = asyncio.ensure_future(
                    stub.ModelInfer(_infer("cold"), metadata=AUTH, timeout=20)
                )
                queued = await scrape_until(
                    metrics.url,
                    lambda s: s.value("gpufleet_gateway_queue_depth", deployment="cold") == 1,
                )
                assert queued.value("gpufleet_gateway_ready_instances", deployment="cold") == 0
                plane.set_route(
                    route("cold", [("cold-1", model_server.address)], queue_timeout_s=30)
                )
                await cold_call
            got = await scrape(metrics.url)
        finally:
            await metrics.stop()
    _check_calls(got)
    _check_refusals(got)
    _check_cold_start(got)
    assert got.value("gpufleet_gateway_in_flight_requests", deployment="echo") == 0
    assert got.value("gpufleet_gateway_route_table_synced") == 1
    assert got.content_type.startswith("text/plain")
    assert "process_cpu_seconds_total" in got.names()


def _check_calls(got: Scrape) -> None:
    requests = "gpufleet_gateway_requests_total"
    assert got.value(requests, deployment="echo", kind="model_infer") == 1
    assert got.value(requests, deployment="echo", kind="model_stream_infer") == 1
    assert got.value(requests, deployment="demo", kind="proxy") == 2
    duration = "gpufleet_gateway_request_duration_seconds_count"
    assert got.value(duration, deployment="echo", kind="model_infer") == 1
    assert got.value(duration, deployment="echo", kind="model_stream_infer") == 1
    assert got.value(duration, deployment="demo", kind="proxy") == 2
    errors = "gpufleet_gateway_errors_total"
    assert (
        got.value(errors, deployment="demo", code="FAILED_PRECONDITION", reason=INSTANCE_STATUS)
        == 1
    )
    # Nothing else failed on echo or demo.
    failed = {
        labels: value
        for (name, labels), value in got.samples.items()
        if name == errors and dict(labels)["deployment"] in ("echo", "demo")
    }
    assert list(failed.values()) == [1]


def _check_refusals(got: Scrape) -> None:
    assert got.value("gpufleet_gateway_requests_total", deployment="full", kind="model_infer") == 1
    assert got.value("gpufleet_gateway_rejected_total", deployment="full", reason="QUEUE_FULL") == 1
    assert (
        got.value(
            "gpufleet_gateway_errors_total",
            deployment="full",
            code="RESOURCE_EXHAUSTED",
            reason="QUEUE_FULL",
        )
        == 1
    )
    # It reached admission with no instance (a cold start), but never got one.
    assert got.value("gpufleet_gateway_cold_starts_total", deployment="full") == 1
    assert got.value("gpufleet_gateway_cold_start_duration_seconds_count", deployment="full") is None
    # Unknown names share one label value instead of becoming label values themselves.
    assert (
        got.value(
            "gpufleet_gateway_rejected_total",
            deployment=UNKNOWN_DEPLOYMENT,
            reason="ROUTE_TARGET_NOT_FOUND",
        )
        == 1
    )
    assert not any(("deployment", "nope") in labels for _, labels in got.samples)


def _check_cold_start(got: Scrape) -> None:
    assert got.value("gpufleet_gateway_requests_total", deployment="cold", kind="model_infer") == 1
    assert got.value("gpufleet_gateway_cold_starts_total", deployment="cold") == 1
    assert got.value("gpufleet_gateway_cold_start_duration_seconds_count", deployment="cold") == 1
    waited = got.value("gpufleet_gateway_cold_start_duration_seconds_sum", deployment="cold")
    assert waited is not None and waited > 0
    assert got.value("gpufleet_gateway_queue_depth", deployment="cold") == 0
    assert got.value("gpufleet_gateway_ready_instances", deployment="cold") == 1
    # Warm calls are no cold starts.
    assert got.value("gpufleet_gateway_cold_starts_total", deployment="echo") is None


async def test_a_busy_metrics_port_is_a_startup_error() -> None:
    async with control_plane() as plane, running_gateway(plane) as gateway:
        first = start_gateway_metrics(gateway, "127.0.0.1:0")
        try:
            with pytest.raises(StartupError, match="cannot serve metrics"):
                start_gateway_metrics(gateway, f"127.0.0.1:{first.port}")
        finally:
            await first.stop()
