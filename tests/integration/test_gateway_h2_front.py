"""The gateway's own HTTP/2 layer (gateway/h2/) on the wire, against a real gateway and a
real model server: what a gRPC library never sends but an HTTP/2 peer may (padding,
CONTINUATION frames, PINGs, garbage), flow control across both windows, and a client that
resets a call.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import hpack
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import given, settings
from hypothesis import strategies as st
from hyperframe.frame import ContinuationFrame, HeadersFrame

from gpufleet.gateway.app import Gateway
from gpufleet.gateway.main import build_parser, config_from_args
from gpufleet.inference import grpc_service_pb2 as pb
from gpufleet.inference import grpc_service_pb2_grpc as pb_grpc
from tests.integration.test_gateway_support import (
    AUTH,
    ROUTE_TARGET_KEY,
    ModelServer,
    control_plane,
    metadata_dict,
    open_stream,
    route,
    running_gateway,
    start_model_server,
    wait_until,
)

pytestmark = pytest.mark.timeout(60)

INFER_PATH = "/inference.GRPCInferenceService/ModelInfer"


@pytest.fixture(scope="module")
def model_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelServer]:
    server = start_model_server(tmp_path_factory.mktemp("h2front"))
    yield server
    server.stop()


@pytest.fixture
async def gateway(model_server: ModelServer) -> AsyncIterator[Gateway]:
    routes = (route("echo", [("echo-1", model_server.address)], max_request_concurrency=16),)
    async with control_plane(*routes) as plane:
        async with running_gateway(plane) as running:
            yield running


def _request(values: int = 2, request_id: str = "") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="echo", id=request_id)
    tensor = request.inputs.add(name="INPUT0", datatype="INT32", shape=[values])
    tensor.contents.int_contents.extend(range(values))
    return request


def _grpc_message(request: pb.ModelInferRequest) -> bytes:
    body = request.SerializeToString()
    return b"\x00" + len(body).to_bytes(4, "big") + body


def _request_headers(gateway: Gateway) -> list[tuple[str, str]]:
    return [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", INFER_PATH),
        (":authority", gateway.address),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        *AUTH,
    ]


class RawClient:
    """An HTTP/2 client driven frame by frame (hyper-h2) over a real socket."""

    def __init__(self, gateway: Gateway) -> None:
        self.sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=10)
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()
        self.send()

    def send(self) -> None:
        self.sock.sendall(self.conn.data_to_send())

    def events_until(self, done: type, stream_id: int | None = None) -> list[h2.events.Event]:
        """Read until an event of type `done` (for `stream_id`, if given)."""
        seen: list[h2.events.Event] = []
        while True:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError(f"the gateway closed the connection; events: {seen}")
            for event in self.conn.receive_data(data):
                seen.append(event)
                if isinstance(event, h2.events.DataReceived):
                    self.conn.acknowledge_received_data(
                        event.flow_controlled_length, event.stream_id
                    )
                if isinstance(event, done) and (
                    stream_id is None or getattr(event, "stream_id", None) == stream_id
                ):
                    self.send()
                    return seen
            self.send()

    def close(self) -> None:
        self.sock.close()


CallResult = tuple[dict[bytes, bytes], bytes, dict[bytes, bytes]]


def _call_result(events: list[h2.events.Event]) -> CallResult:
    headers: dict[bytes, bytes] = {}
    trailers: dict[bytes, bytes] = {}
    body = b""
    for event in events:
        if isinstance(event, h2.events.ResponseReceived):
            headers = dict(event.headers)
        elif isinstance(event, h2.events.DataReceived):
            body += event.data
        elif isinstance(event, h2.events.TrailersReceived):
            trailers = dict(event.headers)
    return headers, body, trailers


async def test_padded_data_and_pings_are_handled(gateway: Gateway) -> None:
    def run() -> tuple[list[h2.events.Event], list[h2.events.Event]]:
        client = RawClient(gateway)
        try:
            client.conn.ping(b"gpufleet")
            client.send()
            pings = client.events_until(h2.events.PingAckReceived)
            stream_id = client.conn.get_next_available_stream_id()
            client.conn.send_headers(stream_id, _request_headers(gateway))
            client.conn.send_data(stream_id, _grpc_message(_request(request_id="pad")),
                                  end_stream=True, pad_length=40)
            client.send()
            return pings, client.events_until(h2.events.StreamEnded, stream_id)
        finally:
            client.close()

    pings, events = await asyncio.to_thread(run)
    assert any(isinstance(e, h2.events.PingAckReceived) and e.ping_data == b"gpufleet"
               for e in pings)
    headers, body, trailers = _call_result(events)
    assert headers[b":status"] == b"200"
    assert headers[ROUTE_TARGET_KEY.encode()] == b"echo-1"
    assert trailers[b"grpc-status"] == b"0"
    response = pb.ModelInferResponse.FromString(body[5:])
    assert (response.id, list(response.outputs[0].contents.int_contents)) == ("pad", [0, 1])


async def test_headers_split_into_continuation_frames_are_joined(gateway: Gateway) -> None:
    def run() -> list[h2.events.Event]:
        client = RawClient(gateway)
        try:
            stream_id = 1
            block = hpack.Encoder().encode(
                [*_request_headers(gateway), ("x-padding-header", "p" * 3000)]
            )
            first = HeadersFrame(stream_id, block[:100])
            middle = ContinuationFrame(stream_id, block[100:1000])
            last = ContinuationFrame(stream_id, block[1000:], flags=["END_HEADERS"])
            client.sock.sendall(first.serialize() + middle.serialize() + last.serialize())
            # hyper-h2 must know of the stream to read its response: open it in its state
            # machine with the same headers, without sending them.
            client.conn.send_headers(stream_id, _request_headers(gateway))
            client.conn.data_to_send()
            client.conn.send_data(stream_id, _grpc_message(_request(request_id="cont")),
                                  end_stream=True)
            client.send()
            return client.events_until(h2.events.StreamEnded, stream_id)
        finally:
            client.close()

    headers, body, trailers = _call_result(await asyncio.to_thread(run))
    assert trailers[b"grpc-status"] == b"0", trailers
    assert pb.ModelInferResponse.FromString(body[5:]).id == "cont"


@pytest.mark.parametrize(
    "garbage",
    [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x00" * 64,
     b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\xff" * 40],
    ids=["http1", "zeros", "bad-frame"],
)
async def test_garbage_gets_the_connection_closed_and_the_gateway_keeps_serving(
    gateway: Gateway, garbage: bytes
) -> None:
    def run() -> bytes:
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
            sock.sendall(garbage)
            received = b""
            while chunk := sock.recv(65536):
                received += chunk
            return received

    received = await asyncio.to_thread(run)
    # The server's SETTINGS, then a GOAWAY (type 7) before the close.
    assert b"\x07\x00\x00\x00\x00\x00" in received
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        response = await pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            _request(request_id="after"), metadata=AUTH, timeout=10
        )
    assert response.id == "after"


async def test_large_concurrent_calls_cross_both_flow_control_windows(gateway: Gateway) -> None:
    # 8 calls of about 3.5 MiB each way: more than a stream's window (4 MiB) in total and
    # more than the connection's (16 MiB), so every window must be refilled as bytes move.
    values = 900_000
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        calls = [
            stub.ModelInfer(_request(values, request_id=str(i)), metadata=AUTH, timeout=30)
            for i in range(8)
        ]
        responses = await asyncio.gather(*calls)
    for i, response in enumerate(responses):
        assert response.id == str(i)
        contents = response.outputs[0].contents.int_contents
        assert len(contents) == values and contents[-1] == values - 1


async def test_a_client_reset_ends_the_call_and_frees_its_slot(gateway: Gateway) -> None:
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for _ in range(3):
            call = stub.ModelInfer(_request(request_id="x"), metadata=AUTH, timeout=10)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
        state = gateway.table.resolve("echo")
        assert state is not None
        for _ in range(100):
            if state.admission.in_flight == 0:
                break
            await asyncio.sleep(0.05)
        assert state.admission.in_flight == 0
        call = stub.ModelInfer(_request(request_id="ok"), metadata=AUTH, timeout=10)
        assert (await call).id == "ok"
        assert metadata_dict(await call.initial_metadata())[ROUTE_TARGET_KEY] == "echo-1"


async def test_health_is_relayed_to_the_grpc_server_behind_the_front(gateway: Gateway) -> None:
    assert gateway.front is not None
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


_frame_types = st.integers(min_value=0, max_value=12)
_frames = st.lists(
    st.tuples(
        _frame_types,
        st.integers(min_value=0, max_value=255),
        st.sampled_from([0, 1, 3, 5, 2, 2**31 - 1]),
        st.binary(max_size=64),
    ),
    min_size=1,
    max_size=8,
)


def _raw_frame(kind: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    return (
        len(payload).to_bytes(3, "big") + bytes((kind, flags)) + stream_id.to_bytes(4, "big")
        + payload
    )


async def test_random_frames_never_break_the_gateway(gateway: Gateway) -> None:
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _raw_frame(4, 0, 0, b"")
    block = hpack.Encoder().encode(_request_headers(gateway))
    request_start = _raw_frame(1, 4, 1, block)  # a valid HEADERS to reach stream handling
    answered: list[int] = []

    @settings(max_examples=150, deadline=None, database=None)
    @given(frames=_frames, with_request=st.booleans())
    def fuzz(frames: list[tuple[int, int, int, bytes]], with_request: bool) -> None:
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
            data = preface + (request_start if with_request else b"")
            data += b"".join(_raw_frame(*frame) for frame in frames)
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            received = 0
            while chunk := sock.recv(65536):
                received += len(chunk)
            answered.append(received)

    await asyncio.to_thread(fuzz)
    # Every connection got at least the server's SETTINGS (a 9-byte frame and more).
    assert len(answered) >= 150 and min(answered) > 9
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
        response = await pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            _request(request_id="after-fuzz"), metadata=AUTH, timeout=10
        )
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert response.id == "after-fuzz"
    state = gateway.table.resolve("echo")
    assert state is not None
    await wait_until(lambda: state.admission.in_flight == 0)


async def test_the_grpc_data_plane_still_serves_the_port(model_server: ModelServer) -> None:
    async with control_plane(route("echo", [("echo-1", model_server.address)])) as plane:
        async with running_gateway(plane, http2_front=False) as gateway:
            assert gateway.front is None
            async with grpc.aio.insecure_channel(gateway.address) as channel:
                call = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                    _request(request_id="grpc"), metadata=AUTH, timeout=10
                )
                assert (await call).id == "grpc"
                headers = metadata_dict(await call.initial_metadata())
    assert headers[ROUTE_TARGET_KEY] == "echo-1"


@pytest.mark.parametrize("flag, front", [([], True), (["--data-plane", "grpc"], False),
                                         (["--data-plane", "h2"], True)])
def test_data_plane_flag(tmp_path: Path, flag: list[str], front: bool) -> None:
    args = build_parser().parse_args(["--token", "t", *flag])
    assert config_from_args(args, {}, tmp_path).http2_front is front


@pytest.mark.parametrize("compression", [grpc.Compression.NoCompression, grpc.Compression.Gzip])
async def test_proxied_calls_are_forwarded_by_the_front_itself(
    compression: grpc.Compression,
) -> None:
    # The instance sees who called it: the front's own client, not grpc.aio's channel.
    seen: list[dict[str, Any]] = []

    async def unary(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        seen.append(metadata_dict(context.invocation_metadata()))
        return request[::-1]

    handler = grpc.method_handlers_generic_handler(
        "test.Echo", {"Unary": grpc.unary_unary_rpc_method_handler(unary)}
    )
    upstream = grpc.aio.server()
    upstream.add_generic_rpc_handlers((handler,))
    port = upstream.add_insecure_port("127.0.0.1:0")
    await upstream.start()
    try:
        routes = (route("echo-svc", [("svc-1", f"127.0.0.1:{port}")]),)
        async with control_plane(*routes) as plane:
            for front in (True, False):
                async with running_gateway(plane, http2_front=front) as gateway:
                    async with grpc.aio.insecure_channel(
                        gateway.address, compression=compression
                    ) as channel:
                        call = channel.unary_unary("/test.Echo/Unary", None, None)(
                            b"abc" * 100,
                            metadata=(*AUTH, ("gpufleet-deployment", "echo-svc"),
                                      ("x-user", "alice")),
                            timeout=10,
                        )
                        assert await call == b"cba" * 100
                        headers = metadata_dict(await call.initial_metadata())
                        assert headers[ROUTE_TARGET_KEY] == "svc-1"
    finally:
        await upstream.stop(None)
    through_front, through_grpc = seen
    assert through_front["user-agent"].startswith("gpufleet-gateway")
    assert not through_grpc["user-agent"].startswith("gpufleet-gateway")
    for metadata in seen:
        assert metadata["x-user"] == "alice"
        assert "authorization" not in metadata and "gpufleet-deployment" not in metadata


@pytest.mark.parametrize("compression", [grpc.Compression.Gzip, grpc.Compression.Deflate])
async def test_compressed_calls_are_served(
    gateway: Gateway, compression: grpc.Compression
) -> None:
    async with grpc.aio.insecure_channel(gateway.address, compression=compression) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        call = stub.ModelInfer(_request(1000, request_id="zip"), metadata=AUTH, timeout=10)
        response = await call
        assert response.id == "zip" and len(response.outputs[0].contents.int_contents) == 1000
        headers = metadata_dict(await call.initial_metadata())
        assert headers[ROUTE_TARGET_KEY] == "echo-1"
        stream = open_stream(
            stub.ModelStreamInfer, pb.ModelStreamInferResponse, metadata=AUTH, timeout=10
        )
        for index in range(3):
            await stream.write(_request(request_id=str(index)))
        await stream.done_writing()
        replies = [reply async for reply in stream]
    assert [r.infer_response.id for r in replies] == ["0", "1", "2"]
    assert all(not r.error_message for r in replies)
