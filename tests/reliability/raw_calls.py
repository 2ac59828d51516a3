"""Raw gRPC calls for the fault suite: any method by its descriptor, requests sent as bytes
(identity serializers), and the way each call ended, as an `Outcome`.

Server-streaming calls (watches) never end by themselves: their first answer, a message or
a status, decides. Client-streaming calls write their messages, half-close and read to the
end; see `client_stream` for the one ending that is the client's own doing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from google.protobuf.descriptor import MethodDescriptor

from tests.reliability.conftest import ROUTE_TARGET_KEY, metadata_value

Metadata = tuple[tuple[str, str], ...]

# grpc's own answer when a typed deserializer raises, before any handler runs.
GRPC_DECODE_FAILURE = "Unexpected <class 'google.protobuf.message.DecodeError'>"
# grpc's client-side status for a message it could not send (the call had ended).
CLIENT_SEND_FAILURE = "Internal error from Core"
EOF_MARK: object = getattr(grpc.aio, "EOF")  # noqa: B009 - missing from the type stubs


def path_of(method: MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


@dataclass(frozen=True)
class Outcome:
    """How one call ended."""

    code: grpc.StatusCode
    details: str = ""
    from_instance: bool = False
    """A gateway passed an instance's own status through (`deploy-route-target` is set)."""
    client_send_failure: bool = False
    """The client's write raced the server's end of the stream; the server's status is lost."""

    @property
    def hung(self) -> bool:
        return self.code == grpc.StatusCode.DEADLINE_EXCEEDED

    @property
    def grpc_decode_failure(self) -> bool:
        return self.code == grpc.StatusCode.UNKNOWN and self.details.startswith(GRPC_DECODE_FAILURE)


def _ended(err: grpc.aio.AioRpcError) -> Outcome:
    # The stubs type this as grpc's sync metadata; at run time it is aio Metadata.
    routed = metadata_value(err.initial_metadata(), ROUTE_TARGET_KEY) is not None
    return Outcome(err.code(), err.details() or "", routed)


async def unary(
    channel: grpc.aio.Channel, path: str, payload: bytes, metadata: Metadata | None, timeout: float
) -> Outcome:
    try:
        await channel.unary_unary(path, None, None)(payload, metadata=metadata, timeout=timeout)
    except grpc.aio.AioRpcError as err:
        return _ended(err)
    return Outcome(grpc.StatusCode.OK)


async def server_stream(
    channel: grpc.aio.Channel,
    path: str,
    payload: bytes,
    metadata: Metadata | None,
    timeout: float,
    first_answer_s: float,
) -> Outcome:
    """The first answer decides; a watch that has nothing to send within `first_answer_s`
    (it waits for changes that have not happened) ends OK, cancelled by the client."""
    call = channel.unary_stream(path, None, None)(payload, metadata=metadata, timeout=timeout)
    try:
        first = await asyncio.wait_for(call.read(), first_answer_s)
    except grpc.aio.AioRpcError as err:
        return _ended(err)
    except TimeoutError:
        call.cancel()
        return Outcome(grpc.StatusCode.OK, "waiting quietly")
    if first is EOF_MARK:
        return Outcome(await call.code(), await call.details() or "")
    call.cancel()
    return Outcome(grpc.StatusCode.OK)


async def client_stream(
    channel: grpc.aio.Channel,
    path: str,
    payloads: Sequence[bytes],
    metadata: Metadata | None,
    timeout: float,
) -> Outcome:
    """Write the payloads (until the server ends the call), half-close, read to the end.

    A write that races the server's end of the call fails in the client, which then
    replaces the server's status by its own INTERNAL "Internal error from Core": that
    ending is the client's, marked `client_send_failure` (check the server's log instead).
    """
    # No request iterator: the messages are written one by one (the stubs want one).
    call = channel.stream_stream(path, None, None)(None, metadata=metadata, timeout=timeout)
    try:
        for payload in payloads:
            await asyncio.sleep(0)  # a status that already arrived ends the loop
            if call.done():
                break
            try:
                await call.write(payload)
            except grpc.aio.AioRpcError as err:
                if err.details() == CLIENT_SEND_FAILURE:
                    return Outcome(grpc.StatusCode.OK, CLIENT_SEND_FAILURE, client_send_failure=True)
                raise
        if not call.done():
            await call.done_writing()
        async for _ in call:
            pass
    except grpc.aio.AioRpcError as err:
        return _ended(err)
    except asyncio.InvalidStateError:
        pass  # written after the server ended the call: its status is read below
    code = await call.code()
    if code == grpc.StatusCode.OK:
        return Outcome(code)
    routed = metadata_value(await call.initial_metadata(), ROUTE_TARGET_KEY) is not None
    return Outcome(code, await call.details() or "", routed)


async def call(
    channel: grpc.aio.Channel,
    method: MethodDescriptor,
    payloads: Sequence[bytes],
    metadata: Metadata | None,
    *,
    timeout: float = 10.0,
    first_answer_s: float = 2.0,
) -> Outcome:
    """One call of `method`: a stream of `payloads` for a client-streaming method, else a
    call with the single payload given."""
    path = path_of(method)
    if method.client_streaming:
        return await client_stream(channel, path, payloads, metadata, timeout)
    [payload] = payloads
    if method.server_streaming:
        return await server_stream(channel, path, payload, metadata, timeout, first_answer_s)
    return await unary(channel, path, payload, metadata, timeout)
