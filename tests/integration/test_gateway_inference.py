"""The Open Inference Protocol on the gateway through gpufleet's typed stub, against a real
model server process: response headers, model names, in-stream errors, health, reflection.
(tritonclient itself is driven in test_gateway_tritonclient.py.)"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import grpc
import pytest

from gpufleet.gateway.app import Gateway
from gpufleet.inference import grpc_service_pb2 as pb
from gpufleet.inference import grpc_service_pb2_grpc as pb_grpc
from tests.integration.test_gateway_support import (
    AUTH,
    ROUTE_TARGET_KEY,
    ModelServer,
    control_plane,
    error_info,
    failure,
    metadata_dict,
    open_stream,
    route,
    running_gateway,
    start_model_server,
)

pytestmark = pytest.mark.timeout(60)


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelServer]:
    server = start_model_server(tmp_path_factory.mktemp("oip"), "--token-delay-ms", "5")
    yield server
    server.stop()


@pytest.fixture
async def gateway(model_server: ModelServer) -> AsyncIterator[Gateway]:
    routes = (
        route("echo", [("echo-1", model_server.address)], max_request_concurrency=4),
        route("tokens", [("tokens-1", model_server.address)], max_request_concurrency=2),
        route("cold"),  # scaled to zero: no endpoint
    )
    async with control_plane(*routes) as plane:
        async with running_gateway(plane) as running:
            yield running


@pytest.fixture
async def stub(gateway: Gateway) -> AsyncIterator[pb_grpc.GRPCInferenceServiceAsyncStub]:
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def _echo_request(model: str = "echo", request_id: str = "") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, id=request_id)
    tensor = request.inputs.add(name="INPUT0", datatype="INT32", shape=[2])
    tensor.contents.int_contents.extend([7, 8])
    return request


# --- tests ----------------------------------------------------------------------------------


async def test_infer_names_the_instance_in_the_response_headers(
    stub: pb_grpc.GRPCInferenceServiceAsyncStub,
) -> None:
    call = stub.ModelInfer(_echo_request(request_id="h"), metadata=AUTH, timeout=10)
    response = await call
    assert (response.id, list(response.outputs[0].contents.int_contents)) == ("h", [7, 8])
    assert metadata_dict(await call.initial_metadata())[ROUTE_TARGET_KEY] == "echo-1"


async def test_unknown_and_empty_model_names(stub: pb_grpc.GRPCInferenceServiceAsyncStub) -> None:
    unknown = await failure(stub.ModelInfer(_echo_request("nope"), metadata=AUTH, timeout=10))
    assert unknown.code() == grpc.StatusCode.NOT_FOUND
    assert error_info(unknown).reason == "ROUTE_TARGET_NOT_FOUND"
    empty = await failure(stub.ModelInfer(_echo_request(""), metadata=AUTH, timeout=10))
    assert empty.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "model_name" in (empty.details() or "")


async def test_malformed_request_bytes_are_invalid_argument(gateway: Gateway) -> None:
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer", None, None)
        err = await failure(infer(b"\x0a\x05ec", metadata=AUTH, timeout=10))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_stream_request_for_another_model_gets_an_in_stream_error(
    stub: pb_grpc.GRPCInferenceServiceAsyncStub,
) -> None:
    stream = open_stream(
        stub.ModelStreamInfer, pb.ModelStreamInferResponse, metadata=AUTH, timeout=20
    )
    prompt = pb.ModelInferRequest(model_name="tokens", id="t")
    text = prompt.inputs.add(name="PROMPT", datatype="BYTES", shape=[1])
    text.contents.bytes_contents.append(b"a b")
    await stream.write(prompt)
    await stream.write(_echo_request("echo", request_id="wrong-model"))
    await stream.done_writing()
    responses = [response async for response in stream]
    errors = [r for r in responses if r.error_message]
    tokens = [r for r in responses if not r.error_message]
    assert len(errors) == 1 and errors[0].infer_response.id == "wrong-model"
    assert "open another stream" in errors[0].error_message
    assert errors[0].infer_response.parameters["triton_final_response"].bool_param
    assert [list(r.infer_response.outputs[0].contents.bytes_contents) for r in tokens] == [
        [b"a"], [b"b"]
    ]
    assert metadata_dict(await stream.initial_metadata())[ROUTE_TARGET_KEY] == "tokens-1"
    assert await stream.code() == grpc.StatusCode.OK


async def test_empty_stream_ends_ok(stub: pb_grpc.GRPCInferenceServiceAsyncStub) -> None:
    stream = open_stream(
        stub.ModelStreamInfer, pb.ModelStreamInferResponse, metadata=AUTH, timeout=10
    )
    await stream.done_writing()
    assert [response async for response in stream] == []
    assert await stream.code() == grpc.StatusCode.OK


async def test_health_and_reflection_on_the_gateway(gateway: Gateway) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    async with grpc.aio.insecure_channel(gateway.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            answer = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        responses = [r async for r in reflection.ServerReflectionInfo(iter([request]), timeout=5)]
    names = {s.name for s in responses[0].list_services_response.service}
    assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names

