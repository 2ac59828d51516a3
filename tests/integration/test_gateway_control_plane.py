"""The gateway and its control plane: scale from zero through ReportLoad, load reports,
static stability while the control plane is down, route changes, and an instance that dies
in the middle of a stream. Instances are real model server processes."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from gpufleet.inference import grpc_service_pb2 as pb
from gpufleet.inference import grpc_service_pb2_grpc as pb_grpc
from gpufleet.v1 import routing_service_pb2
from tests.integration.test_gateway_support import (
    AUTH,
    ModelServer,
    control_plane,
    error_info,
    failure,
    open_stream,
    read_message,
    route,
    running_gateway,
    start_model_server,
    wait_until,
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def model_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelServer]:
    server = start_model_server(tmp_path_factory.mktemp("control"), "--token-delay-ms", "1")
    yield server
    server.stop()


def _echo() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="echo", id="e")
    request.inputs.add(name="INPUT0", datatype="INT32", shape=[1]).contents.int_contents.append(3)
    return request


def _stub(channel: grpc.aio.Channel) -> pb_grpc.GRPCInferenceServiceAsyncStub:
    return pb_grpc.GRPCInferenceServiceStub(channel)


def _loads(
    reports: list[routing_service_pb2.ReportLoadRequest], name: str
) -> list[routing_service_pb2.DeploymentLoad]:
    return [load for report in reports for load in report.loads if load.deployment == name]


async def test_scale_from_zero_waits_for_the_instance(model_server: ModelServer) -> None:
    async with control_plane(route("echo")) as plane:

        def start_instance(report: routing_service_pb2.ReportLoadRequest) -> None:
            if any(load.deployment == "echo" and load.wakeups for load in report.loads):
                plane.set_route(route("echo", [("echo-1", model_server.address)]))

        plane.on_report = start_instance
        async with running_gateway(plane) as gateway, grpc.aio.insecure_channel(
            gateway.address
        ) as channel:
            stub = _stub(channel)
            ready = await stub.ModelReady(pb.ModelReadyRequest(name="echo"), metadata=AUTH)
            assert ready.ready is False
            response = await stub.ModelInfer(_echo(), metadata=AUTH, timeout=20)
            assert list(response.outputs[0].contents.int_contents) == [3]
            woken = [load for load in _loads(plane.reports, "echo") if load.wakeups]
            assert woken and woken[0].queue_depth == 1
            ready = await stub.ModelReady(pb.ModelReadyRequest(name="echo"), metadata=AUTH)
            assert ready.ready is True


async def test_wakeups_are_reported_again_after_a_failed_report(model_server: ModelServer) -> None:
    async with control_plane(route("echo")) as plane:
        plane.reject_report = lambda report: not plane.failed_reports and any(
            load.wakeups for load in report.loads
        )

        def start_instance(report: routing_service_pb2.ReportLoadRequest) -> None:
            if any(load.wakeups for load in report.loads):
                plane.set_route(route("echo", [("echo-1", model_server.address)]))

        plane.on_report = start_instance
        async with running_gateway(plane) as gateway, grpc.aio.insecure_channel(
            gateway.address
        ) as channel:
            await _stub(channel).ModelInfer(_echo(), metadata=AUTH, timeout=20)
        # The failed report carried the wakeup; the first accepted one carries it again.
        assert [load.wakeups for load in _loads(plane.failed_reports, "echo")] == [1]
        assert [load.wakeups for load in _loads(plane.reports, "echo") if load.wakeups] == [1]


async def test_load_reports_carry_per_instance_load(model_server: ModelServer) -> None:
    echo = route("echo", [("echo-1", model_server.address)], max_request_concurrency=2)
    async with control_plane(echo) as plane:
        async with running_gateway(plane) as gateway, grpc.aio.insecure_channel(
            gateway.address
        ) as channel:
            await _stub(channel).ModelInfer(_echo(), metadata=AUTH, timeout=10)
            plane.reported.clear()
            await asyncio.wait_for(plane.reported.wait(), 10)
        report = plane.reports[-1]
        assert report.gateway_id == "gw-test"
        (load,) = [load for load in report.loads if load.deployment == "echo"]
        assert (load.in_flight, load.queue_depth) == (0, 0)
        (instance,) = load.instances
        assert instance.instance_id == "echo-1" and instance.in_flight == 0
        assert instance.idle_seconds >= 0
        assert plane.watch_requests[0].gateway_id == "gw-test"


async def test_static_stability_then_a_fresh_snapshot(model_server: ModelServer) -> None:
    echo = route("echo", [("echo-1", model_server.address)], max_request_concurrency=2)
    async with control_plane(echo, route("other")) as plane:
        async with running_gateway(plane) as gateway, grpc.aio.insecure_channel(
            gateway.address
        ) as channel:
            stub = _stub(channel)
            await stub.ModelInfer(_echo(), metadata=AUTH, timeout=10)

            await plane.stop()
            await wait_until(lambda: not gateway.watcher.connected)
            for _ in range(5):
                await stub.ModelInfer(_echo(), metadata=AUTH, timeout=10)
            ready = await stub.ServerReady(pb.ServerReadyRequest(), timeout=10)
            assert ready.ready is True

            # Back on the same port with a changed table: the new snapshot replaces the
            # old one, so "other" disappears and "echo" gets its second instance.
            echo_two = route(
                "echo",
                [("echo-1", model_server.address), ("echo-2", model_server.address)],
                max_request_concurrency=2,
            )
            plane.routes = {"echo": echo_two}
            await plane.start()
            await wait_until(lambda: gateway.watcher.connections == 2)
            assert gateway.table.deployment("other") is None
            state = gateway.table.deployment("echo")
            assert state is not None and set(state.addresses) == {"echo-1", "echo-2"}
            await stub.ModelInfer(_echo(), metadata=AUTH, timeout=10)


async def test_removed_deployment_fails_its_queue_and_is_not_found(
    model_server: ModelServer,
) -> None:
    async with control_plane(route("echo", queue_timeout_s=30)) as plane:
        async with running_gateway(plane) as gateway, grpc.aio.insecure_channel(
            gateway.address
        ) as channel:
            stub = _stub(channel)
            queued = asyncio.ensure_future(stub.ModelInfer(_echo(), metadata=AUTH, timeout=30))
            state = gateway.table.deployment("echo")
            assert state is not None
            await wait_until(lambda: state.admission.queue_depth == 1)
            plane.remove("echo")
            err = await failure(queued)
            assert err.code() == grpc.StatusCode.UNAVAILABLE
            assert error_info(err).reason == "ROUTE_TARGET_NOT_FOUND"
            gone = await failure(stub.ModelInfer(_echo(), metadata=AUTH, timeout=10))
            assert gone.code() == grpc.StatusCode.NOT_FOUND


async def test_instance_channels_follow_the_table(model_server: ModelServer) -> None:
    echo = route("echo", [("echo-1", model_server.address)])
    async with control_plane(echo) as plane:
        async with running_gateway(plane) as gateway, grpc.aio.insecure_channel(
            gateway.address
        ) as channel:
            await _stub(channel).ModelInfer(_echo(), metadata=AUTH, timeout=10)
            assert gateway.upstreams.addresses == {model_server.address}
            plane.set_route(route("echo"))
            await wait_until(lambda: not gateway.upstreams.addresses)


async def test_draining_instance_gets_no_new_calls(model_server: ModelServer) -> None:
    address = model_server.address
    echo = route("echo", [("echo-1", address), ("echo-2", address)], draining=["echo-1"])
    async with control_plane(echo) as plane:
        async with running_gateway(plane) as gateway, grpc.aio.insecure_channel(
            gateway.address
        ) as channel:
            stub = _stub(channel)
            pinned = (*AUTH, ("deploy-route-rule", "echo-1"))
            err = await failure(stub.ModelInfer(_echo(), metadata=pinned, timeout=10))
            assert err.code() == grpc.StatusCode.NOT_FOUND
            for _ in range(3):
                call = stub.ModelInfer(_echo(), metadata=AUTH, timeout=10)
                await call
                headers = dict(await call.initial_metadata())
                assert headers["deploy-route-target"] == "echo-2"


async def test_instance_killed_mid_stream_ends_the_stream_unavailable(tmp_path: Path) -> None:
    doomed = start_model_server(tmp_path, "--token-delay-ms", "50")
    try:
        tokens = route("tokens", [("tokens-1", doomed.address)])
        async with control_plane(tokens) as plane:
            async with running_gateway(plane) as gateway, grpc.aio.insecure_channel(
                gateway.address
            ) as channel:
                stream = open_stream(
                    _stub(channel).ModelStreamInfer,
                    pb.ModelStreamInferResponse,
                    metadata=AUTH,
                    timeout=30,
                )
                request = pb.ModelInferRequest(model_name="tokens", id="long")
                prompt = request.inputs.add(name="PROMPT", datatype="BYTES", shape=[1])
                prompt.contents.bytes_contents.append(b"word")
                limit = request.inputs.add(name="MAX_TOKENS", datatype="INT32", shape=[1])
                limit.contents.int_contents.append(1000)
                await stream.write(request)
                assert await read_message(stream) is not None
                doomed.kill()
                err = await failure(asyncio.wait_for(_drain(stream), 10))
                assert err.code() == grpc.StatusCode.UNAVAILABLE
                state = gateway.table.deployment("tokens")
                assert state is not None
                await wait_until(lambda: state.admission.in_flight == 0)
    finally:
        doomed.stop()



async def _drain(stream: grpc.aio.StreamStreamCall[Any, Any]) -> None:
    """Read to the end; a failed stream raises its AioRpcError from read()."""
    while await read_message(stream) is not None:
        pass
    raise AssertionError(f"the stream ended with {await stream.code()}, expected UNAVAILABLE")
