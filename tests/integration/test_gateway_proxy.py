"""The transparent proxy: any method, raw bytes, all four call kinds, metadata, trailers,
statuses, deadlines and cancellation, against a generic-handler echo service on port 0."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from gpufleet.gateway.app import Gateway
from tests.integration.test_gateway_support import (
    AUTH,
    ROUTE_TARGET_KEY,
    ScriptedControlPlane,
    control_plane,
    error_info,
    failure,
    metadata_dict,
    open_stream,
    read_message,
    route,
    running_gateway,
    wait_until,
)

pytestmark = pytest.mark.timeout(60)

SERVICE = "test.Echo"
TARGET = (("gpufleet-deployment", "echo-svc"),)
CALL_METADATA = (*AUTH, *TARGET, ("x-user", "alice"), ("x-blob-bin", b"\x00\x01\xff"))
_Context = grpc.aio.ServicerContext[Any, Any]


@dataclass
class EchoService:
    """What the upstream saw."""

    metadata: list[dict[str, Any]] = field(default_factory=list)
    deadlines: list[float | None] = field(default_factory=list)
    hang_started: asyncio.Event = field(default_factory=asyncio.Event)
    hang_cancelled: asyncio.Event = field(default_factory=asyncio.Event)

    def _record(self, context: _Context) -> None:
        self.metadata.append(metadata_dict(context.invocation_metadata()))
        remaining: float | None = context.time_remaining()
        self.deadlines.append(remaining)

    async def _headers(self, context: _Context) -> None:
        await context.send_initial_metadata((("x-upstream-header", "h1"),))
        context.set_trailing_metadata(
            (("x-upstream-trailer", "t1"), ("x-upstream-trailer-bin", b"\x00\xfe"))
        )

    async def unary(self, request: bytes, context: _Context) -> bytes:
        self._record(context)
        await self._headers(context)
        return b"unary:" + request

    async def server_stream(self, request: bytes, context: _Context) -> AsyncIterator[bytes]:
        self._record(context)
        await self._headers(context)
        for index in range(3):
            yield request + b"#" + str(index).encode()

    async def client_stream(self, requests: AsyncIterator[bytes], context: _Context) -> bytes:
        self._record(context)
        await self._headers(context)
        return b",".join([request async for request in requests])

    async def bidi(self, requests: AsyncIterator[bytes], context: _Context) -> AsyncIterator[bytes]:
        self._record(context)
        await self._headers(context)
        async for request in requests:
            yield request.upper()

    async def fail(self, request: bytes, context: _Context) -> bytes:
        await context.abort(
            grpc.StatusCode.FAILED_PRECONDITION,
            "custom failure from the instance",
            (("x-why", "because"), ("grpc-status-details-bin", b"opaque-details")),
        )

    async def hang(self, requests: AsyncIterator[bytes], context: _Context) -> AsyncIterator[bytes]:
        self.hang_started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.hang_cancelled.set()
            raise
        yield b""  # pragma: no cover - makes this an async generator

    def handler(self) -> grpc.GenericRpcHandler[Any, Any]:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Unary": grpc.unary_unary_rpc_method_handler(self.unary),
                "ServerStream": grpc.unary_stream_rpc_method_handler(self.server_stream),
                "ClientStream": grpc.stream_unary_rpc_method_handler(self.client_stream),
                "Bidi": grpc.stream_stream_rpc_method_handler(self.bidi),
                "Fail": grpc.unary_unary_rpc_method_handler(self.fail),
                "Hang": grpc.stream_stream_rpc_method_handler(self.hang),
            },
        )


@dataclass
class Setup:
    echo: EchoService
    plane: ScriptedControlPlane
    gateway: Gateway
    channel: grpc.aio.Channel

    def method(self, name: str) -> str:
        return f"/{SERVICE}/{name}"

    def unary_unary(self, name: str) -> grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]:
        return self.channel.unary_unary(self.method(name), None, None)

    def unary_stream(self, name: str) -> grpc.aio.UnaryStreamMultiCallable[bytes, bytes]:
        return self.channel.unary_stream(self.method(name), None, None)

    def stream_unary(self, name: str) -> grpc.aio.StreamUnaryMultiCallable[bytes, bytes]:
        return self.channel.stream_unary(self.method(name), None, None)

    def stream_stream(self, name: str, **kwargs: Any) -> grpc.aio.StreamStreamCall[Any, bytes]:
        return open_stream(
            self.channel.stream_stream(self.method(name), None, None), bytes, **kwargs
        )


@pytest.fixture
async def setup() -> AsyncIterator[Setup]:
    echo = EchoService()
    upstream = grpc.aio.server()
    upstream.add_generic_rpc_handlers((echo.handler(),))
    port = upstream.add_insecure_port("127.0.0.1:0")
    await upstream.start()
    try:
        endpoints = [("echo-svc-1", f"127.0.0.1:{port}")]
        async with control_plane(route("echo-svc", endpoints, max_request_concurrency=4)) as plane:
            async with running_gateway(plane) as gateway:
                async with grpc.aio.insecure_channel(gateway.address) as channel:
                    yield Setup(echo, plane, gateway, channel)
    finally:
        await upstream.stop(None)


def _requests(*items: bytes) -> Iterator[bytes]:
    return iter(items)


async def test_unary_call_round_trips_with_metadata_and_trailers(setup: Setup) -> None:
    call = setup.unary_unary("Unary")(
        b"hello", metadata=CALL_METADATA, timeout=5
    )
    assert await call == b"unary:hello"
    headers = metadata_dict(await call.initial_metadata())
    assert headers["x-upstream-header"] == "h1"
    assert headers[ROUTE_TARGET_KEY] == "echo-svc-1"
    trailers = metadata_dict(await call.trailing_metadata())
    assert trailers["x-upstream-trailer"] == "t1"
    assert trailers["x-upstream-trailer-bin"] == b"\x00\xfe"
    assert await call.code() == grpc.StatusCode.OK

    seen = setup.echo.metadata[-1]
    assert seen["x-user"] == "alice" and seen["x-blob-bin"] == b"\x00\x01\xff"
    # The invoke token and the gateway's own keys stay at the gateway.
    assert "authorization" not in seen and "gpufleet-deployment" not in seen


async def test_deadline_reaches_the_instance_as_time_left(setup: Setup) -> None:
    await setup.unary_unary("Unary")(
        b"x", metadata=CALL_METADATA, timeout=5
    )
    await setup.unary_unary("Unary")(b"x", metadata=CALL_METADATA)
    with_deadline, without = setup.echo.deadlines[-2:]
    # grpc rounds the deadline up when it encodes grpc-timeout, hence the slack above 5 s.
    assert with_deadline is not None and 0 < with_deadline < 5.5
    assert without is None


async def test_server_streaming_call(setup: Setup) -> None:
    call = setup.unary_stream("ServerStream")(
        b"s", metadata=CALL_METADATA, timeout=5
    )
    assert [message async for message in call] == [b"s#0", b"s#1", b"s#2"]
    assert metadata_dict(await call.initial_metadata())[ROUTE_TARGET_KEY] == "echo-svc-1"
    assert metadata_dict(await call.trailing_metadata())["x-upstream-trailer"] == "t1"


async def test_client_streaming_call(setup: Setup) -> None:
    call = setup.stream_unary("ClientStream")(
        _requests(b"a", b"b", b"c"), metadata=CALL_METADATA, timeout=5
    )
    assert await call == b"a,b,c"
    assert metadata_dict(await call.trailing_metadata())["x-upstream-trailer-bin"] == b"\x00\xfe"


async def test_bidi_streaming_call_interleaves(setup: Setup) -> None:
    call = setup.stream_stream("Bidi", metadata=CALL_METADATA, timeout=5)
    answers: list[bytes | None] = []
    for word in (b"one", b"two"):
        await call.write(word)
        answer = await read_message(call)
        answers.append(answer)
    await call.done_writing()
    assert answers == [b"ONE", b"TWO"]
    assert await read_message(call) is None
    assert await call.code() == grpc.StatusCode.OK


async def test_instance_status_and_trailers_come_back_unchanged(setup: Setup) -> None:
    err = await failure(
        setup.unary_unary("Fail")(b"x", metadata=CALL_METADATA, timeout=5)
    )
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert err.details() == "custom failure from the instance"
    trailers = metadata_dict(err.trailing_metadata())
    assert trailers["x-why"] == "because"
    assert trailers["grpc-status-details-bin"] == b"opaque-details"


async def test_unknown_method_on_the_instance_is_its_unimplemented(setup: Setup) -> None:
    err = await failure(
        setup.unary_unary("Nope")(b"x", metadata=CALL_METADATA, timeout=5)
    )
    assert err.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_client_cancel_cancels_the_instance_call(setup: Setup) -> None:
    call = setup.stream_stream("Hang", metadata=CALL_METADATA)
    await call.write(b"x")
    await asyncio.wait_for(setup.echo.hang_started.wait(), 10)
    admission = setup.gateway.table.deployment("echo-svc")
    assert admission is not None and admission.admission.in_flight == 1
    call.cancel()
    await asyncio.wait_for(setup.echo.hang_cancelled.wait(), 10)
    await wait_until(lambda: admission.admission.in_flight == 0)


async def test_client_deadline_ends_the_instance_call(setup: Setup) -> None:
    call = setup.stream_stream("Hang", metadata=CALL_METADATA, timeout=0.5)
    await call.write(b"x")
    err = await failure(read_message(call))
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await asyncio.wait_for(setup.echo.hang_cancelled.wait(), 10)


async def test_missing_deployment_metadata_is_invalid_argument(setup: Setup) -> None:
    err = await failure(
        setup.unary_unary("Unary")(b"x", metadata=AUTH, timeout=5)
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "gpufleet-deployment" in (err.details() or "")


async def test_grpc_infrastructure_methods_without_deployment_are_unimplemented(
    setup: Setup,
) -> None:
    # grpcurl asks for reflection v1 first and falls back to v1alpha on UNIMPLEMENTED.
    reflection_v1 = setup.channel.stream_stream(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", None, None
    )
    call = open_stream(reflection_v1, bytes, metadata=AUTH, timeout=5)
    await call.write(b"")
    err = await failure(read_message(call))
    assert err.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_unknown_deployment_is_not_found(setup: Setup) -> None:
    metadata = (*AUTH, ("gpufleet-deployment", "nope"))
    err = await failure(
        setup.unary_unary("Unary")(b"x", metadata=metadata, timeout=5)
    )
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert error_info(err).reason == "ROUTE_TARGET_NOT_FOUND"


async def test_invoke_token_is_required(setup: Setup) -> None:
    unary = setup.unary_unary("Unary")
    missing = await failure(unary(b"x", metadata=TARGET, timeout=5))
    assert missing.code() == grpc.StatusCode.UNAUTHENTICATED
    wrong = (("authorization", "Bearer not-the-token"), *TARGET)
    denied = await failure(unary(b"x", metadata=wrong, timeout=5))
    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
    assert setup.echo.metadata == []  # neither reached the instance
