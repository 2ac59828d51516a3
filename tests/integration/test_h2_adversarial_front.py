"""Adversarial checks of the gateway's own HTTP/2 front (gateway/h2/) against the grpc.aio
data plane (`http2_front=False`) on the same scenario: flow control when calls end with
bytes still held, slow readers sharing one instance connection, and streams that end in
the middle of a message.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest
from google.rpc import error_details_pb2, status_pb2

from gpufleet.gateway.app import Gateway
from gpufleet.inference import grpc_service_pb2 as pb
from tests.integration.test_gateway_support import (
    AUTH,
    control_plane,
    route,
    running_gateway,
    wait_until,
)

pytestmark = pytest.mark.timeout(30)

DEPLOYMENT = ("gpufleet-deployment", "svc")
STREAM_INFER = "/inference.GRPCInferenceService/ModelStreamInfer"
FRONT_AND_GRPC = ["front", "grpc"]


# --- a generic instance -------------------------------------------------------------------


class Instance:
    """A grpc.aio server with raw-bytes methods of service `t.S`."""

    def __init__(self) -> None:
        self.server: grpc.aio.Server | None = None
        self.address = ""
        self.cancelled = 0
        self.started = 0

    async def start(self) -> None:
        async def big(request: bytes, context: Any) -> bytes:
            return b"x" * int(request)

        async def small(request: bytes, context: Any) -> bytes:
            return request

        async def sleep(request: bytes, context: Any) -> bytes:
            self.started += 1
            try:
                await asyncio.sleep(float(request))
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
            return request

        async def fail(request: bytes, context: Any) -> bytes:
            status = status_pb2.Status(code=9, message="no")
            status.details.add().Pack(error_details_pb2.ErrorInfo(reason="R", domain="d"))
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "fail: 100% \u00e9", (
                ("grpc-status-details-bin", status.SerializeToString()),
                ("x-custom-bin", b"\x00\xff"), ("x-custom", "v"),
            ))
            return b""

        async def reject(requests: AsyncIterator[bytes], context: Any) -> bytes:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "rejected unread")
            return b""

        async def stream_infer(requests: AsyncIterator[bytes], context: Any) -> Any:
            try:
                async for request in requests:
                    yield pb.ModelStreamInferResponse(
                        infer_response=pb.ModelInferResponse(
                            id=pb.ModelInferRequest.FromString(request).id
                        )
                    ).SerializeToString()
            except asyncio.CancelledError:
                self.cancelled += 1
                raise

        generic = grpc.method_handlers_generic_handler(
            "t.S",
            {
                "Big": grpc.unary_unary_rpc_method_handler(big),
                "Small": grpc.unary_unary_rpc_method_handler(small),
                "Sleep": grpc.unary_unary_rpc_method_handler(sleep),
                "Fail": grpc.unary_unary_rpc_method_handler(fail),
                "Reject": grpc.stream_unary_rpc_method_handler(reject),
            },
        )
        oip = grpc.method_handlers_generic_handler(
            "inference.GRPCInferenceService",
            {"ModelStreamInfer": grpc.stream_stream_rpc_method_handler(stream_infer)},
        )
        self.server = grpc.aio.server()
        self.server.add_generic_rpc_handlers((generic, oip))
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.address = f"127.0.0.1:{port}"
        await self.server.start()

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(None)


@pytest.fixture
async def instance() -> AsyncIterator[Instance]:
    server = Instance()
    await server.start()
    yield server
    await server.stop()


def _gateway(instance: Instance, data_plane: str, **traffic: Any) -> Any:
    traffic.setdefault("max_request_concurrency", 32)
    routes = (route("svc", [("svc-1", instance.address)], **traffic),)

    class _Both:
        async def __aenter__(self) -> Gateway:
            self._plane = control_plane(*routes)
            plane = await self._plane.__aenter__()
            self._gateway = running_gateway(plane, http2_front=data_plane == "front")
            return await self._gateway.__aenter__()

        async def __aexit__(self, *exc: Any) -> None:
            await self._gateway.__aexit__(*exc)
            await self._plane.__aexit__(*exc)

    return _Both()


def _message(body: bytes) -> bytes:
    return b"\x00" + len(body).to_bytes(4, "big") + body


# --- a raw HTTP/2 client ------------------------------------------------------------------


class Raw:
    """hyper-h2 over a socket; received data is acknowledged only when asked to."""

    def __init__(self, gateway: Gateway, window: int | None = None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=5)
        self.authority = gateway.address
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self.conn = h2.connection.H2Connection(config)
        self.conn.initiate_connection()
        if window is not None:
            self.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
        self.send()
        self.events: list[h2.events.Event] = []

    def send(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def start(self, path: str, metadata: tuple[tuple[str, str], ...] = ()) -> int:
        stream_id: int = self.conn.get_next_available_stream_id()
        headers = [
            (":method", "POST"), (":scheme", "http"), (":path", path),
            (":authority", self.authority), ("content-type", "application/grpc"),
            ("te", "trailers"), *AUTH, *metadata,
        ]
        self.conn.send_headers(stream_id, headers)
        self.send()
        return stream_id

    def data(self, stream_id: int, data: bytes, end: bool = False) -> None:
        """Send as much of `data` as the windows allow (waiting for WINDOW_UPDATEs)."""
        view = memoryview(data)
        while view:
            allowed = min(self.conn.local_flow_control_window(stream_id), len(view),
                          self.conn.max_outbound_frame_size)
            if allowed <= 0:
                self.read_once()
                continue
            self.conn.send_data(stream_id, bytes(view[:allowed]))
            view = view[allowed:]
            self.send()
        if end:
            self.conn.end_stream(stream_id)
            self.send()

    def fill(self, stream_id: int, limit: int) -> int:
        """Send up to `limit` bytes of the stream's body, as far as the windows allow now."""
        sent = 0
        while sent < limit:
            allowed = min(self.conn.local_flow_control_window(stream_id), limit - sent,
                          self.conn.max_outbound_frame_size)
            if allowed <= 0:
                break
            self.conn.send_data(stream_id, b"u" * allowed)
            self.send()
            sent += allowed
        return sent

    def drain(self, seconds: float) -> None:
        """Read what arrives within `seconds`."""
        self.sock.settimeout(seconds)
        try:
            while True:
                self.read_once(ack=True)
        except TimeoutError:
            pass
        finally:
            self.sock.settimeout(5)

    def read_once(self, ack: bool = False) -> list[h2.events.Event]:
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            raise ConnectionError("the gateway closed the connection")
        events = self.conn.receive_data(chunk)
        for event in events:
            if ack and isinstance(event, h2.events.DataReceived):
                self.conn.acknowledge_received_data(
                    event.flow_controlled_length, event.stream_id)
        self.send()
        self.events += events
        return events

    def until(self, kind: type, stream_id: int, ack: bool = True) -> None:
        while not any(isinstance(e, kind) and getattr(e, "stream_id", None) == stream_id
                      for e in self.events):
            self.read_once(ack)

    def trailers(self, stream_id: int) -> dict[bytes, bytes]:
        for event in self.events:
            if isinstance(event, h2.events.TrailersReceived) and event.stream_id == stream_id:
                return dict(event.headers)
            if isinstance(event, h2.events.ResponseReceived) and event.stream_id == stream_id:
                headers = dict(event.headers)
                if b"grpc-status" in headers:
                    return headers
        return {}

    def reset(self, stream_id: int) -> None:
        self.conn.reset_stream(stream_id, 8)  # CANCEL
        self.send()

    def close(self) -> None:
        self.sock.close()


async def _small_call(gateway: Gateway, timeout: float = 3.0) -> bytes:
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        call = channel.unary_unary("/t.S/Small", None, None)(
            b"ping", metadata=(*AUTH, DEPLOYMENT), timeout=timeout
        )
        response: bytes = await call
        return response


async def _slots_free(gateway: Gateway) -> None:
    state = gateway.table.resolve("svc")
    assert state is not None
    await wait_until(lambda: state.admission.in_flight == 0 and state.admission.queue_depth == 0,
                     timeout=3)


# --- flow control -------------------------------------------------------------------------


@pytest.mark.parametrize("data_plane", FRONT_AND_GRPC)
async def test_resets_with_unread_responses_do_not_stall_the_instance_connection(
    instance: Instance, data_plane: str
) -> None:
    """Clients that reset a call whose large response they have not read: the ~4 MiB the
    front took from the shared instance connection's window for it must be given back,
    else after ~16 MiB every call to that instance hangs."""
    async with _gateway(instance, data_plane) as gateway:
        def run() -> None:
            for _ in range(6):
                client = Raw(gateway)
                try:
                    stream_id = client.start("/t.S/Big", (DEPLOYMENT,))
                    client.data(stream_id, _message(b"%d" % (4 * 1024 * 1024)), end=True)
                    client.until(h2.events.DataReceived, stream_id, ack=False)
                    time.sleep(0.2)  # the instance fills the stream's window meanwhile
                    client.reset(stream_id)
                finally:
                    client.close()

        await asyncio.to_thread(run)
        await _slots_free(gateway)
        assert await _small_call(gateway) == b"ping"


@pytest.mark.parametrize("data_plane", FRONT_AND_GRPC)
async def test_slow_readers_do_not_block_other_clients_of_the_instance(
    instance: Instance, data_plane: str
) -> None:
    """Five clients that do not read their 4 MiB responses yet: another client's call to
    the same instance must still be answered."""
    async with _gateway(instance, data_plane) as gateway:
        clients: list[Raw] = []

        def open_slow() -> None:
            for _ in range(5):
                client = Raw(gateway)
                clients.append(client)
                stream_id = client.start("/t.S/Big", (DEPLOYMENT,))
                client.data(stream_id, _message(b"%d" % (4 * 1024 * 1024)), end=True)

        try:
            await asyncio.to_thread(open_slow)
            await asyncio.sleep(0.5)  # the instance sends what the windows allow
            assert await _small_call(gateway) == b"ping"
        finally:
            for client in clients:
                client.close()


@pytest.mark.parametrize("data_plane", FRONT_AND_GRPC)
async def test_queued_uploads_do_not_block_other_calls_on_the_connection(
    instance: Instance, data_plane: str
) -> None:
    """A deployment with one slot, held by a slow call. One client connection (as a gRPC
    channel is) starts four client-streaming calls to it that queue while uploading 5 MiB
    each; a call on the same connection to another deployment must still go through."""
    routes = (
        route("svc", [("svc-1", instance.address)], max_request_concurrency=1,
              max_queue_size=8, queue_timeout_s=20),
        route("other", [("other-1", instance.address)], max_request_concurrency=8),
    )
    async with control_plane(*routes) as plane:
        async with running_gateway(plane, http2_front=data_plane == "front") as gateway:
            async with grpc.aio.insecure_channel(gateway.address) as channel:
                holder = channel.unary_unary("/t.S/Sleep", None, None)(
                    b"8", metadata=(*AUTH, DEPLOYMENT), timeout=10)
                state = gateway.table.resolve("svc")
                assert state is not None
                await wait_until(lambda: state.admission.in_flight == 1, timeout=3)

                def run() -> dict[bytes, bytes]:
                    client = Raw(gateway)
                    try:
                        for _ in range(4):
                            stream_id = client.start("/t.S/Reject", (DEPLOYMENT,))
                            for _ in range(3):  # what the windows let out, and updates
                                client.fill(stream_id, 5 * 1024 * 1024)
                                client.drain(0.15)
                            assert not client.trailers(stream_id), client.trailers(stream_id)
                        stream_id = client.start(
                            "/t.S/Small", (("gpufleet-deployment", "other"),))
                        client.sock.settimeout(2)
                        client.data(stream_id, _message(b"p" * (1024 * 1024)), end=True)
                        client.until(h2.events.StreamEnded, stream_id)
                        return client.trailers(stream_id)
                    finally:
                        client.close()

                try:
                    trailers = await asyncio.to_thread(run)
                finally:
                    holder.cancel()
                assert trailers[b"grpc-status"] == b"0"


@pytest.mark.parametrize("data_plane", FRONT_AND_GRPC)
async def test_stream_half_closed_inside_a_message_ends(
    instance: Instance, data_plane: str
) -> None:
    """ModelStreamInfer: one whole request, then 3 bytes of a second, then END_STREAM. The
    call must end rather than wait forever, and free its slot (grpc.aio ends it with the
    instance's OK: the instance saw the half-close)."""
    request = pb.ModelInferRequest(model_name="svc", id="one").SerializeToString()
    async with _gateway(instance, data_plane) as gateway:
        def run() -> dict[bytes, bytes]:
            client = Raw(gateway)
            try:
                stream_id = client.start(STREAM_INFER)
                client.data(stream_id, _message(request) + b"\x00\x00\x00", end=True)
                client.sock.settimeout(2)
                client.until(h2.events.StreamEnded, stream_id)
                return client.trailers(stream_id)
            finally:
                client.close()

        trailers = await asyncio.to_thread(run)
        assert b"grpc-status" in trailers
        await _slots_free(gateway)


@pytest.mark.parametrize("data_plane", FRONT_AND_GRPC)
async def test_data_after_end_stream_answers_or_ends_the_call(
    instance: Instance, data_plane: str
) -> None:
    """A client sends one more DATA frame after END_STREAM on a call the instance takes
    1.5 s to answer. grpc.aio ignores it and answers; a gateway that resets the stream
    instead must end the call there: cancel the instance call and free the slot."""
    async with _gateway(instance, data_plane) as gateway:
        state = gateway.table.resolve("svc")
        assert state is not None

        client = Raw(gateway)

        def run() -> str:
            stream_id = client.start("/t.S/Sleep", (DEPLOYMENT,))
            client.data(stream_id, _message(b"1.5"), end=True)
            # Once the instance runs the call (else the gateway may end the call before
            # it reached the instance, and there is nothing to cancel there).
            deadline = time.monotonic() + 5
            while instance.started == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            client.sock.sendall(  # DATA, 3 bytes, no flags, on the half-closed stream
                b"\x00\x00\x03\x00\x00" + stream_id.to_bytes(4, "big") + b"abc")
            while True:
                for event in client.read_once(ack=True):
                    if getattr(event, "stream_id", None) != stream_id:
                        continue
                    if isinstance(event, h2.events.StreamReset):
                        return "reset"
                    if isinstance(event, h2.events.StreamEnded):
                        return "answered"

        try:
            outcome = await asyncio.to_thread(run)
            if outcome == "reset":
                # Ended by the gateway: nothing of the call may go on.
                await wait_until(lambda: state.admission.in_flight == 0, timeout=0.5)
                await wait_until(lambda: instance.cancelled == 1, timeout=0.5)
        finally:
            client.close()


@pytest.mark.parametrize("data_plane", FRONT_AND_GRPC)
async def test_messages_in_one_byte_data_frames(instance: Instance, data_plane: str) -> None:
    """A unary request and a stream's requests (one naming another model) sent one byte per
    DATA frame: answered as if sent whole, the other model's request in-stream."""
    def request(model: str, request_id: str) -> bytes:
        return _message(pb.ModelInferRequest(model_name=model, id=request_id).SerializeToString())

    async with _gateway(instance, data_plane) as gateway:
        def run() -> tuple[bytes, dict[bytes, bytes], list[pb.ModelStreamInferResponse]]:
            client = Raw(gateway)
            try:
                unary = client.start("/t.S/Small", (DEPLOYMENT,))
                body = _message(b"z" * 1500)
                stream = client.start(STREAM_INFER)
                requests = request("svc", "1") + request("other", "2") + request("svc", "3")
                for stream_id, data in ((unary, body), (stream, requests)):
                    for index in range(len(data)):
                        client.conn.send_data(stream_id, data[index : index + 1])
                    client.conn.end_stream(stream_id)
                client.send()
                client.until(h2.events.StreamEnded, unary)
                client.until(h2.events.StreamEnded, stream)
                received = {unary: b"", stream: b""}
                for event in client.events:
                    if isinstance(event, h2.events.DataReceived):
                        received[event.stream_id] += event.data
                responses = []
                data = received[stream]
                while data:
                    length = int.from_bytes(data[1:5], "big")
                    responses.append(pb.ModelStreamInferResponse.FromString(data[5:5 + length]))
                    data = data[5 + length:]
                assert client.trailers(stream)[b"grpc-status"] == b"0"
                return received[unary], client.trailers(unary), responses
            finally:
                client.close()

        unary_body, unary_trailers, responses = await asyncio.to_thread(run)
    assert unary_trailers[b"grpc-status"] == b"0" and unary_body == _message(b"z" * 1500)
    by_id = {r.infer_response.id: r.error_message for r in responses}
    assert by_id.keys() == {"1", "2", "3"}
    assert not by_id["1"] and not by_id["3"] and "other" in by_id["2"]
