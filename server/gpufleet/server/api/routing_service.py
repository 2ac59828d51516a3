"""gpufleet.v1.RoutingService: route table for gateways, load reports from them.

WatchRoutes subscribes to the store before it reads (as WatchEvents does), sends the whole
table, then, for each burst of store events, the routes of the deployments they touched
that actually changed, and the deployments that are gone. A watcher that falls behind gets
a fresh snapshot. The admin token is checked by auth.BearerAuthInterceptor.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from gpufleet.server.api.node_session import peer_host
from gpufleet.server.api.routes import deployment_route
from gpufleet.server.errors import NotFound
from gpufleet.server.load_reports import LoadBoard
from gpufleet.server.store import (
    InstanceRecord,
    ObjectKind,
    Store,
    StoredEvent,
    Subscription,
    SubscriptionLagged,
)
from gpufleet.v1 import routing_service_pb2 as pb, routing_service_pb2_grpc

if TYPE_CHECKING:
    import grpc

    _Context = grpc.aio.ServicerContext[Any, Any]

DEFAULT_REPORT_INTERVAL_S = 1


class RoutingService(routing_service_pb2_grpc.RoutingServiceServicer):
    """The gateways' API."""

    def __init__(
        self,
        store: Store,
        loads: LoadBoard,
        wake_reconciler: Callable[[], None],
        report_interval_seconds: int = DEFAULT_REPORT_INTERVAL_S,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._loads = loads
        self._wake = wake_reconciler
        self._report_interval = report_interval_seconds
        self._monotonic = monotonic

    async def WatchRoutes(
        self, request: pb.WatchRoutesRequest, context: _Context
    ) -> AsyncIterator[pb.WatchRoutesResponse]:
        subscription = self._store.subscribe()
        try:
            while True:
                table = await self._table()
                yield pb.WatchRoutesResponse(
                    snapshot=True, routes=[table[name] for name in sorted(table)]
                )
                try:
                    async for response in self._changes(subscription, table):
                        yield response
                except SubscriptionLagged:
                    subscription.close()
                    subscription = self._store.subscribe()
        finally:
            subscription.close()

    async def ReportLoad(
        self, request: pb.ReportLoadRequest, context: _Context
    ) -> pb.ReportLoadResponse:
        gateway = request.gateway_id or f"peer:{peer_host(context.peer())}"
        asks = self._loads.report(gateway, request.loads, self._monotonic(), time.time())
        if asks:
            self._wake()
        return pb.ReportLoadResponse(report_interval_seconds=self._report_interval)

    async def _table(self) -> dict[str, pb.DeploymentRoute]:
        records = await self._store.cluster_records()
        by_deployment: dict[str, list[InstanceRecord]] = defaultdict(list)
        for instance in records.instances:
            by_deployment[instance.instance.deployment].append(instance)
        return {
            d.deployment.name: deployment_route(d, by_deployment[d.deployment.name])
            for d in records.deployments
        }

    async def _route(self, name: str) -> pb.DeploymentRoute | None:
        try:
            record = await self._store.get_deployment(name)
        except NotFound:
            return None
        return deployment_route(record, await self._store.list_instance_records(deployment=name))

    async def _changes(
        self, subscription: Subscription, table: dict[str, pb.DeploymentRoute]
    ) -> AsyncIterator[pb.WatchRoutesResponse]:
        while True:
            events = [await subscription.next(), *subscription.take_pending()]
            changed: list[pb.DeploymentRoute] = []
            removed: list[str] = []
            for name in sorted({_deployment_of(event) for event in events}):
                route = await self._route(name)
                if route is None:
                    if table.pop(name, None) is not None:
                        removed.append(name)
                elif table.get(name) != route:
                    table[name] = route
                    changed.append(route)
            if changed or removed:
                yield pb.WatchRoutesResponse(routes=changed, removed_deployments=removed)


def _deployment_of(event: StoredEvent) -> str:
    if event.kind == ObjectKind.DEPLOYMENT:
        return event.name
    return event.instance().deployment
