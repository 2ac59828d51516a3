"""gpufleet.v1.DeploymentService: a thin servicer over deployment_handlers and watch.

Errors raised below are turned into statuses by api.error_mapping's interceptor; the admin
token is checked by auth.BearerAuthInterceptor before a call gets here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from gpufleet.server.api import deployment_handlers as handlers
from gpufleet.server.api.watch import watch_events
from gpufleet.server.store import Store
from gpufleet.v1 import deployment_service_pb2 as pb, deployment_service_pb2_grpc

if TYPE_CHECKING:
    import grpc

    _Context = grpc.aio.ServicerContext[Any, Any]


class DeploymentService(deployment_service_pb2_grpc.DeploymentServiceServicer):
    """Admin API over one Store."""

    def __init__(self, store: Store) -> None:
        self._store = store

    async def CreateDeployment(
        self, request: pb.CreateDeploymentRequest, context: _Context
    ) -> pb.CreateDeploymentResponse:
        return await handlers.create_deployment(self._store, request)

    async def GetDeployment(
        self, request: pb.GetDeploymentRequest, context: _Context
    ) -> pb.GetDeploymentResponse:
        return await handlers.get_deployment(self._store, request)

    async def ListDeployments(
        self, request: pb.ListDeploymentsRequest, context: _Context
    ) -> pb.ListDeploymentsResponse:
        return await handlers.list_deployments(self._store, request)

    async def UpdateDeployment(
        self, request: pb.UpdateDeploymentRequest, context: _Context
    ) -> pb.UpdateDeploymentResponse:
        return await handlers.update_deployment(self._store, request)

    async def DeleteDeployment(
        self, request: pb.DeleteDeploymentRequest, context: _Context
    ) -> pb.DeleteDeploymentResponse:
        return await handlers.delete_deployment(self._store, request)

    async def ScaleDeployment(
        self, request: pb.ScaleDeploymentRequest, context: _Context
    ) -> pb.ScaleDeploymentResponse:
        return await handlers.scale_deployment(self._store, request)

    async def RotateInvokeToken(
        self, request: pb.RotateInvokeTokenRequest, context: _Context
    ) -> pb.RotateInvokeTokenResponse:
        return await handlers.rotate_invoke_token(self._store, request)

    async def ListNodes(
        self, request: pb.ListNodesRequest, context: _Context
    ) -> pb.ListNodesResponse:
        return await handlers.list_nodes(self._store, request)

    async def ListInstances(
        self, request: pb.ListInstancesRequest, context: _Context
    ) -> pb.ListInstancesResponse:
        return await handlers.list_instances(self._store, request)

    async def WatchEvents(
        self, request: pb.WatchEventsRequest, context: _Context
    ) -> AsyncIterator[pb.WatchEventsResponse]:
        async for event in watch_events(self._store, request):
            yield event
