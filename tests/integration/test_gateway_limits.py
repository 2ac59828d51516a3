"""Admission limits through a real gateway and a real model server process: concurrency per
instance (a stream holds its slot), the FIFO queue and its bounds, rate limit, scale-out
quota and the per-connection limit, each with DESIGN.md's status and ErrorInfo."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
import pytest

from gpufleet.gateway.admission import DeploymentAdmission
from gpufleet.gateway.app import Gateway
from gpufleet.inference import grpc_service_pb2 as pb
from gpufleet.inference import grpc_service_pb2_grpc as pb_grpc
from gpufleet.v1 import routing_service_pb2
from tests.integration.test_gateway_support import (
    AUTH,
    PUSHBACK_KEY,
    ModelServer,
    control_plane,
    error_info,
    failure,
    metadata_dict,
    open_stream,
    read_message,
    route,
    running_gateway,
    start_model_server,
    wait_until,
)

pytestmark = pytest.mark.timeout(60)

if TYPE_CHECKING:
    Stub = pb_grpc.GRPCInferenceServiceAsyncStub
    StreamCall = grpc.aio.StreamStreamCall[pb.ModelInferRequest, pb.ModelStreamInferResponse]


@pytest.fixture(scope="module")
def model_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelServer]:
    server = start_model_server(tmp_path_factory.mktemp("limits"), "--token-delay-ms", "1")
    yield server
    server.stop()


@dataclass
class Setup:
    gateway: Gateway
    stub: Stub
    stack: AsyncExitStack

    @property
    def admission(self) -> DeploymentAdmission:
        state = self.gateway.table.deployment("tokens")
        assert state is not None
        return state.admission

    async def new_stub(self) -> Stub:
        """A stub on another client connection (channels share connections unless told
        to keep their own)."""
        own_connection = [("grpc.use_local_subchannel_pool", 1)]
        channel = await self.stack.enter_async_context(
            grpc.aio.insecure_channel(self.gateway.address, options=own_connection)
        )
        return pb_grpc.GRPCInferenceServiceStub(channel)


@contextlib.asynccontextmanager
async def _setup(model_server: ModelServer, **limits: Any) -> AsyncIterator[Setup]:
    tokens = route("tokens", [("tokens-1", model_server.address)], **limits)
    async with AsyncExitStack() as stack:
        plane = await stack.enter_async_context(control_plane(tokens))
        gateway = await stack.enter_async_context(running_gateway(plane))
        channel = await stack.enter_async_context(grpc.aio.insecure_channel(gateway.address))
        yield Setup(gateway, pb_grpc.GRPCInferenceServiceStub(channel), stack)


def _prompt(request_id: str) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="tokens", id=request_id)
    request.inputs.add(name="PROMPT", datatype="BYTES", shape=[1]).contents.bytes_contents.append(
        b"hi"
    )
    return request


async def _open_stream(stub: Stub, request_id: str) -> StreamCall:
    """A stream that has run one generation and stays open, holding its slot."""
    stream = open_stream(
        stub.ModelStreamInfer, pb.ModelStreamInferResponse, metadata=AUTH, timeout=30
    )
    await stream.write(_prompt(request_id))
    response = await read_message(stream)
    assert response is not None and response.infer_response.id == request_id
    return stream


async def _close_stream(stream: StreamCall) -> None:
    await stream.done_writing()
    assert await read_message(stream) is None
    assert await stream.code() == grpc.StatusCode.OK


async def _infer(stub: Stub, timeout: float = 10, **kwargs: Any) -> pb.ModelInferResponse:
    metadata = (*AUTH, *kwargs.pop("metadata", ()))
    call = stub.ModelInfer(_prompt("unary"), metadata=metadata, timeout=timeout, **kwargs)
    return await call


async def test_third_stream_waits_for_one_of_two_slots(model_server: ModelServer) -> None:
    async with _setup(model_server, max_request_concurrency=2, max_instances=1) as setup:
        first = await _open_stream(setup.stub, "s1")
        second = await _open_stream(setup.stub, "s2")
        assert setup.admission.in_flight == 2

        third = open_stream(
            setup.stub.ModelStreamInfer, pb.ModelStreamInferResponse, metadata=AUTH, timeout=30
        )
        await third.write(_prompt("s3"))
        reading = read_message(third)
        third_read = asyncio.ensure_future(reading)
        await wait_until(lambda: setup.admission.queue_depth == 1)
        assert not third_read.done() and setup.admission.in_flight == 2

        await _close_stream(first)
        response = await asyncio.wait_for(third_read, 10)
        assert response is not None and response.infer_response.id == "s3"
        assert (setup.admission.in_flight, setup.admission.queue_depth) == (2, 0)
        await _close_stream(second)
        await _close_stream(third)
        await wait_until(lambda: setup.admission.in_flight == 0)


async def test_queue_full_is_resource_exhausted_with_pushback(model_server: ModelServer) -> None:
    async with _setup(model_server, max_request_concurrency=1, max_queue_size=0) as setup:
        holder = await _open_stream(setup.stub, "hold")
        err = await failure(_infer(setup.stub))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error_info(err).reason == "QUEUE_FULL"
        assert int(metadata_dict(err.trailing_metadata())[PUSHBACK_KEY]) >= 100
        await _close_stream(holder)
        assert (await _infer(setup.stub)).id == "unary"


async def test_queue_timeout_is_deadline_exceeded(model_server: ModelServer) -> None:
    async with _setup(model_server, max_request_concurrency=1, queue_timeout_s=0.3) as setup:
        holder = await _open_stream(setup.stub, "hold")
        err = await failure(_infer(setup.stub, timeout=20))
        assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        info = error_info(err)
        assert info.reason == "QUEUE_TIMEOUT" and "queue_timeout" in (err.details() or "")
        assert setup.admission.queue_depth == 0
        await _close_stream(holder)


async def test_call_deadline_bounds_the_wait_and_frees_the_queue(
    model_server: ModelServer,
) -> None:
    async with _setup(model_server, max_request_concurrency=1) as setup:
        holder = await _open_stream(setup.stub, "hold")
        err = await failure(_infer(setup.stub, timeout=0.5))
        assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await wait_until(lambda: setup.admission.queue_depth == 0, timeout=5)
        await _close_stream(holder)


async def test_cancelled_queued_call_leaves_the_queue(model_server: ModelServer) -> None:
    async with _setup(model_server, max_request_concurrency=1) as setup:
        holder = await _open_stream(setup.stub, "hold")
        queued = setup.stub.ModelInfer(_prompt("queued"), metadata=AUTH, timeout=30)
        await wait_until(lambda: setup.admission.queue_depth == 1)
        queued.cancel()
        await wait_until(lambda: setup.admission.queue_depth == 0, timeout=5)
        assert setup.admission.in_flight == 1
        await _close_stream(holder)


async def test_rate_limit_is_resource_exhausted_with_pushback(model_server: ModelServer) -> None:
    limits = {"max_request_concurrency": 4, "rate_limit_per_second": 0.1, "rate_limit_burst": 1}
    async with _setup(model_server, **limits) as setup:
        await _infer(setup.stub)
        err = await failure(_infer(setup.stub))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error_info(err).reason == "RATE_LIMITED"
        assert int(metadata_dict(err.trailing_metadata())[PUSHBACK_KEY]) > 1000


async def test_scale_out_beyond_max_instances_is_replica_quota_exceeded(
    model_server: ModelServer,
) -> None:
    async with _setup(model_server, max_request_concurrency=4, max_instances=1) as setup:
        rule = (("deploy-route-rule", "scale-out"),)
        err = await failure(_infer(setup.stub, metadata=rule))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error_info(err).reason == "REPLICA_QUOTA_EXCEEDED"


async def test_scale_out_waits_for_a_new_instance(model_server: ModelServer) -> None:
    address = model_server.address
    tokens = route("tokens", [("tokens-1", address)], max_request_concurrency=4, max_instances=2)
    async with control_plane(tokens) as plane:

        def add_instance(report: routing_service_pb2.ReportLoadRequest) -> None:
            if any(load.scale_out_requests for load in report.loads):
                plane.set_route(
                    route("tokens", [("tokens-1", address), ("tokens-2", address)],
                          max_request_concurrency=4, max_instances=2)
                )

        plane.on_report = add_instance
        async with running_gateway(plane) as gateway, grpc.aio.insecure_channel(
            gateway.address
        ) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            call = stub.ModelInfer(
                _prompt("new"), metadata=(*AUTH, ("deploy-route-rule", "scale-out")), timeout=20
            )
            await call
            assert metadata_dict(await call.initial_metadata())["deploy-route-target"] == "tokens-2"


async def test_per_connection_limit_queues_only_that_connection(
    model_server: ModelServer,
) -> None:
    limits = {"max_request_concurrency": 4, "max_streams_per_connection": 1}
    async with _setup(model_server, **limits) as setup:
        holder = await _open_stream(setup.stub, "hold")
        same_connection = asyncio.ensure_future(_infer(setup.stub, timeout=30))
        await wait_until(lambda: setup.admission.queue_depth == 1)
        other = await setup.new_stub()
        assert (await _infer(other)).id == "unary"
        assert not same_connection.done()
        await _close_stream(holder)
        assert (await asyncio.wait_for(same_connection, 10)).id == "unary"
