"""gpufleet.v1.NodeService: agents register, then hold one Connect stream each.

Connect sends the node's desired instances at once, then whenever the reconciler changed
them (it wakes the stream through the NodeHub), and only when they differ from what this
stream sent last. Heartbeats are handled by api.node_session. A newer stream of the same
node ends the older one. Node credentials are checked by auth.BearerAuthInterceptor
before a call gets here.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gpufleet.server.api import node_handlers
from gpufleet.server.api.node_session import NodeSession, peer_host
from gpufleet.server.assignments import desired_instances
from gpufleet.server.auth import NODE_ID_METADATA, NodeCredentials, metadata_value
from gpufleet.server.errors import Unauthenticated
from gpufleet.server.node_hub import NodeHub
from gpufleet.server.nodes import NodeTracker
from gpufleet.server.store import Store
from gpufleet.v1 import node_service_pb2 as pb, node_service_pb2_grpc

if TYPE_CHECKING:
    import grpc

    _Context = grpc.aio.ServicerContext[Any, Any]


@dataclass(frozen=True)
class NodeServiceDeps:
    """What the NodeService works with."""

    store: Store
    credentials: NodeCredentials
    hub: NodeHub
    tracker: NodeTracker
    wake_reconciler: Callable[[], None]
    heartbeat_interval_seconds: int


class NodeService(node_service_pb2_grpc.NodeServiceServicer):
    """The agents' API."""

    def __init__(self, deps: NodeServiceDeps) -> None:
        self._deps = deps

    async def Register(self, request: pb.RegisterRequest, context: _Context) -> pb.RegisterResponse:
        return await node_handlers.register(
            self._deps.store,
            self._deps.credentials,
            request,
            heartbeat_interval_seconds=self._deps.heartbeat_interval_seconds,
            now_us=int(time.time() * 1_000_000),
        )

    async def Connect(
        self, request_iterator: AsyncIterator[pb.ConnectRequest], context: _Context
    ) -> AsyncIterator[pb.ConnectResponse]:
        deps = self._deps
        node_id = metadata_value(context.invocation_metadata(), NODE_ID_METADATA)
        if node_id is None:
            raise Unauthenticated(f"NodeService.Connect needs metadata '{NODE_ID_METADATA}'")
        connection = deps.tracker.connect(node_id)
        channel = deps.hub.attach(node_id)
        session = NodeSession(
            node_id,
            connection,
            deps.store,
            deps.tracker,
            deps.wake_reconciler,
            peer_host(context.peer()),
        )
        reader = asyncio.ensure_future(_read(request_iterator, session))
        sent: pb.DesiredInstances | None = None
        try:
            while not channel.replaced:
                channel.changed.clear()
                desired = desired_instances(
                    await deps.store.list_instance_records(node_id=node_id)
                )
                if desired != sent:
                    yield pb.ConnectResponse(desired=desired)
                    sent = desired
                waiter = asyncio.ensure_future(channel.changed.wait())
                try:
                    done, _ = await asyncio.wait(
                        {reader, waiter}, return_when=asyncio.FIRST_COMPLETED
                    )
                finally:
                    waiter.cancel()
                if reader in done:
                    reader.result()
                    return
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            deps.hub.detach(channel)
            deps.tracker.disconnect(node_id, connection)


async def _read(requests: AsyncIterator[pb.ConnectRequest], session: NodeSession) -> None:
    async for request in requests:
        if request.HasField("heartbeat"):
            await session.on_heartbeat(request.heartbeat)
