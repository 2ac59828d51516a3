"""A RoutingService with a fixed table, for benchmarks of the gateway alone.

The gateway under test watches it like a control plane: it gets one snapshot, then
nothing changes. Load reports are accepted and dropped. It runs on the benchmark's own
event loop; after the snapshot it costs nothing but one ReportLoad a second.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc

from gpufleet.gateway.invoke_auth import token_sha256
from gpufleet.v1 import deployment_pb2, routing_service_pb2 as pb, routing_service_pb2_grpc

REPORT_INTERVAL_SECONDS = 1

_Context = grpc.aio.ServicerContext[Any, Any]


def single_instance_route(
    deployment: str, instance_id: str, address: str, invoke_token: str, concurrency: int
) -> pb.DeploymentRoute:
    """A deployment with one ready instance at `address` that takes `concurrency` calls at
    once, so that the benchmark's calls never queue in the gateway."""
    return pb.DeploymentRoute(
        deployment=deployment,
        endpoints=[pb.Endpoint(instance_id=instance_id, address=address, node_id="bench-node")],
        traffic=deployment_pb2.TrafficSpec(max_request_concurrency=concurrency),
        scaling=deployment_pb2.ScalingSpec(min_instances=1, max_instances=1),
        invoke_token_sha256=token_sha256(invoke_token),
    )


class StaticRoutes(routing_service_pb2_grpc.RoutingServiceServicer):
    """Answers WatchRoutes with one snapshot of `routes` and holds the stream open."""

    def __init__(self, routes: Sequence[pb.DeploymentRoute]) -> None:
        self._routes = list(routes)
        self.watchers = 0

    async def WatchRoutes(  # noqa: N802 - gRPC method name
        self, request: pb.WatchRoutesRequest, context: _Context
    ) -> AsyncIterator[pb.WatchRoutesResponse]:
        self.watchers += 1
        yield pb.WatchRoutesResponse(snapshot=True, routes=self._routes)
        # The table never changes: hold the stream until the gateway goes away.
        await asyncio.Event().wait()

    async def ReportLoad(  # noqa: N802 - gRPC method name
        self, request: pb.ReportLoadRequest, context: _Context
    ) -> pb.ReportLoadResponse:
        return pb.ReportLoadResponse(report_interval_seconds=REPORT_INTERVAL_SECONDS)


async def serve_static_routes(routes: Sequence[pb.DeploymentRoute]) -> tuple[grpc.aio.Server, str]:
    """Start a StaticRoutes server on 127.0.0.1:0; returns it and its "HOST:PORT"."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    routing_service_pb2_grpc.add_RoutingServiceServicer_to_server(StaticRoutes(routes), server)
    port = server.add_insecure_port("127.0.0.1:0")
    if port == 0:
        raise RuntimeError("cannot listen on 127.0.0.1:0 for the static RoutingService")
    await server.start()
    return server, f"127.0.0.1:{port}"
