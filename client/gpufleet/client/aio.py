"""AsyncClient: the asyncio SDK for the gpufleet admin API, same methods as Client."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Mapping
from types import TracebackType
from typing import TypeVar

import grpc
from grpc import aio

from gpufleet.client.errors import RPCError
from gpufleet.client.operations import (
    ApplyAction,
    ApplyResult,
    DeletionTracker,
    desired_for_update,
    label_selector,
    same_desired_state,
    update_action,
)
from gpufleet.client.sdk import BaseClient
from gpufleet.v1 import (
    deployment_pb2,
    deployment_service_pb2 as pb,
    deployment_service_pb2_grpc,
    instance_pb2,
    node_pb2,
)

_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")


class AsyncClient(BaseClient):
    """Asyncio client of the admin API. Use with ``async with``, or await close().

    Create it inside the event loop that uses it. Every method raises only RPCError when a
    call fails.
    """

    _channel: aio.Channel
    _stub: deployment_service_pb2_grpc.DeploymentServiceAsyncStub

    def _open(self) -> None:
        config = self._config
        if config.uses_tls:
            self._channel = aio.secure_channel(
                config.target, config.channel_credentials(), options=config.channel_options()
            )
        else:
            self._channel = aio.insecure_channel(config.target, options=config.channel_options())
        self._stub = deployment_service_pb2_grpc.DeploymentServiceStub(self._channel)

    async def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        await self._channel.close(None)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _call(self, method: aio.UnaryUnaryMultiCallable[_Req, _Resp], request: _Req) -> _Resp:
        # The one place where gRPC errors become RPCError for unary calls.
        try:
            return await method(request, timeout=self._config.timeout, metadata=self._metadata)
        except grpc.RpcError as error:
            raise RPCError.from_grpc(error) from error

    async def create_deployment(
        self, deployment: deployment_pb2.Deployment
    ) -> pb.CreateDeploymentResponse:
        """Create a deployment; the response carries its invoke token, shown only once."""
        return await self._call(
            self._stub.CreateDeployment, pb.CreateDeploymentRequest(deployment=deployment)
        )

    async def get_deployment(self, name: str) -> deployment_pb2.Deployment:
        """Return one deployment; NOT_FOUND if there is none by that name."""
        response = await self._call(self._stub.GetDeployment, pb.GetDeploymentRequest(name=name))
        return response.deployment

    async def list_deployments(
        self, labels: str | Mapping[str, str] | None = None, *, page_size: int = 0
    ) -> list[deployment_pb2.Deployment]:
        """Every deployment (all pages) carrying all of ``labels``, ordered by name.

        ``labels`` is a mapping or a selector string "k1=v1,k2=v2"."""
        selector = label_selector(labels)
        deployments: list[deployment_pb2.Deployment] = []
        page_token = ""
        while True:
            page = await self._call(
                self._stub.ListDeployments,
                pb.ListDeploymentsRequest(
                    page_size=page_size, page_token=page_token, label_selector=selector
                ),
            )
            deployments.extend(page.deployments)
            if not page.next_page_token:
                return deployments
            page_token = page.next_page_token

    async def update_deployment(
        self, deployment: deployment_pb2.Deployment, revision: int
    ) -> deployment_pb2.Deployment:
        """Replace labels and spec; ABORTED if ``revision`` is not the stored one."""
        response = await self._call(
            self._stub.UpdateDeployment,
            pb.UpdateDeploymentRequest(deployment=deployment, revision=revision),
        )
        return response.deployment

    async def apply(self, deployment: deployment_pb2.Deployment) -> ApplyResult:
        """Create the deployment, or update it from the revision just read."""
        try:
            stored = await self.get_deployment(deployment.name)
        except RPCError as error:
            if error.code != grpc.StatusCode.NOT_FOUND:
                raise
            created = await self.create_deployment(desired_for_update(deployment))
            return ApplyResult(ApplyAction.CREATED, created.deployment, created.invoke_token)
        if same_desired_state(stored, deployment):
            return ApplyResult(ApplyAction.UNCHANGED, stored)
        updated = await self.update_deployment(desired_for_update(deployment), stored.revision)
        return ApplyResult(update_action(stored, updated), updated)

    async def delete_deployment(
        self, name: str, *, revision: int = 0
    ) -> pb.DeleteDeploymentResponse:
        """Start deleting a deployment (its instances drain first). With ``revision`` > 0,
        only if that is still the stored revision (else ABORTED)."""
        return await self._call(
            self._stub.DeleteDeployment, pb.DeleteDeploymentRequest(name=name, revision=revision)
        )

    async def wait_deleted(
        self, name: str, *, since_revision: int = 0, timeout: float | None = None
    ) -> None:
        """Wait until the deployment is gone; DEADLINE_EXCEEDED after ``timeout`` seconds.

        Pass the revision returned by delete_deployment as ``since_revision``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            await self._wait_deleted_from(name, since_revision, deadline)
        except RPCError as error:
            if error.code != grpc.StatusCode.OUT_OF_RANGE or since_revision == 0:
                raise
            # The server no longer keeps history that old; a fresh snapshot still answers.
            await self._wait_deleted_from(name, 0, deadline)

    async def _wait_deleted_from(
        self, name: str, since_revision: int, deadline: float | None
    ) -> None:
        tracker = DeletionTracker(name)
        events = self.watch_events(since_revision, timeout=self._remaining(deadline))
        try:
            async for event in events:
                if tracker.done(event):
                    return
        finally:
            await events.aclose()
        raise RPCError(
            grpc.StatusCode.UNAVAILABLE,
            f"the watch stream ended before deployment {name!r} was deleted; retry",
        )

    async def scale_deployment(
        self,
        name: str,
        *,
        min_instances: int | None = None,
        max_instances: int | None = None,
        revision: int = 0,
    ) -> deployment_pb2.Deployment:
        """Change instance bounds; a bound left None keeps its value."""
        response = await self._call(
            self._stub.ScaleDeployment,
            pb.ScaleDeploymentRequest(
                name=name,
                min_instances=min_instances,
                max_instances=max_instances,
                revision=revision,
            ),
        )
        return response.deployment

    async def rotate_invoke_token(self, name: str) -> str:
        """Replace the deployment's invoke token and return the new one (shown only once)."""
        response = await self._call(
            self._stub.RotateInvokeToken, pb.RotateInvokeTokenRequest(name=name)
        )
        return response.invoke_token

    async def list_nodes(self) -> list[node_pb2.Node]:
        """Every registered node with its GPUs."""
        return list((await self._call(self._stub.ListNodes, pb.ListNodesRequest())).nodes)

    async def list_instances(self, deployment: str = "") -> list[instance_pb2.Instance]:
        """Instances of one deployment, or of all when ``deployment`` is empty."""
        response = await self._call(
            self._stub.ListInstances, pb.ListInstancesRequest(deployment=deployment)
        )
        return list(response.instances)

    async def watch_events(
        self, since_revision: int = 0, *, timeout: float | None = None
    ) -> AsyncGenerator[pb.WatchEventsResponse, None]:
        """Stream changes: from 0 a snapshot, SNAPSHOT_END, then live changes; from R every
        change after R. Leave the ``async for`` (or aclose()) to end the stream."""
        call = self._stub.WatchEvents(
            pb.WatchEventsRequest(since_revision=since_revision),
            timeout=timeout,
            metadata=self._metadata,
        )
        # The one place where gRPC errors become RPCError for streams.
        try:
            async for event in call:
                yield event
        except grpc.RpcError as error:
            raise RPCError.from_grpc(error) from error
        finally:
            call.cancel()
