"""Client: the synchronous SDK for the gpufleet admin API (DeploymentService)."""

from __future__ import annotations

import abc
import time
from collections.abc import Generator, Mapping
from types import TracebackType
from typing import Self, TypeVar

import grpc

from gpufleet.client.config import DEFAULT_TIMEOUT_S, ClientConfig
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
from gpufleet.v1 import (
    deployment_pb2,
    deployment_service_pb2 as pb,
    deployment_service_pb2_grpc,
    instance_pb2,
    node_pb2,
)

_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")


class BaseClient(abc.ABC):
    """Configuration and construction common to Client and AsyncClient."""

    def __init__(
        self,
        target: str,
        token: str | None = None,
        *,
        tls: bool = False,
        tls_root_cert: bytes | None = None,
        tls_client_cert: bytes | None = None,
        tls_client_key: bytes | None = None,
        tls_server_name: str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT_S,
    ) -> None:
        """Connect to the control plane at ``target`` (``host:port``); ClientConfig documents
        every argument. The channel connects lazily, on the first call."""
        self._setup(
            ClientConfig(
                target=target,
                token=token,
                tls=tls,
                tls_root_cert=tls_root_cert,
                tls_client_cert=tls_client_cert,
                tls_client_key=tls_client_key,
                tls_server_name=tls_server_name,
                timeout=timeout,
            )
        )

    @classmethod
    def from_config(cls, config: ClientConfig) -> Self:
        """Build a client from a ClientConfig."""
        client = cls.__new__(cls)
        client._setup(config)
        return client

    def _setup(self, config: ClientConfig) -> None:
        self._config = config
        self._metadata = config.call_metadata()
        self._open()

    @abc.abstractmethod
    def _open(self) -> None:
        """Open the channel and stub of this client's kind (sync or asyncio)."""

    @property
    def config(self) -> ClientConfig:
        """The settings this client was built with."""
        return self._config

    @staticmethod
    def _remaining(deadline: float | None) -> float | None:
        if deadline is None:
            return None
        return max(deadline - time.monotonic(), 0.001)


class Client(BaseClient):
    """Synchronous client of the admin API. Use as a context manager, or call close().

    Every method raises only RPCError when a call fails.
    """

    _channel: grpc.Channel
    _stub: deployment_service_pb2_grpc.DeploymentServiceStub

    def _open(self) -> None:
        config = self._config
        if config.uses_tls:
            self._channel = grpc.secure_channel(
                config.target, config.channel_credentials(), options=config.channel_options()
            )
        else:
            self._channel = grpc.insecure_channel(config.target, options=config.channel_options())
        self._stub = deployment_service_pb2_grpc.DeploymentServiceStub(self._channel)

    def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _call(self, method: grpc.UnaryUnaryMultiCallable[_Req, _Resp], request: _Req) -> _Resp:
        # The one place where gRPC errors become RPCError for unary calls.
        try:
            return method(request, timeout=self._config.timeout, metadata=self._metadata)
        except grpc.RpcError as error:
            raise RPCError.from_grpc(error) from error

    def create_deployment(
        self, deployment: deployment_pb2.Deployment
    ) -> pb.CreateDeploymentResponse:
        """Create a deployment; the response carries its invoke token, shown only once."""
        return self._call(
            self._stub.CreateDeployment, pb.CreateDeploymentRequest(deployment=deployment)
        )

    def get_deployment(self, name: str) -> deployment_pb2.Deployment:
        """Return one deployment; NOT_FOUND if there is none by that name."""
        return self._call(self._stub.GetDeployment, pb.GetDeploymentRequest(name=name)).deployment

    def list_deployments(
        self, labels: str | Mapping[str, str] | None = None, *, page_size: int = 0
    ) -> list[deployment_pb2.Deployment]:
        """Every deployment (all pages) carrying all of ``labels``, ordered by name.

        ``labels`` is a mapping or a selector string "k1=v1,k2=v2"."""
        selector = label_selector(labels)
        deployments: list[deployment_pb2.Deployment] = []
        page_token = ""
        while True:
            page = self._call(
                self._stub.ListDeployments,
                pb.ListDeploymentsRequest(
                    page_size=page_size, page_token=page_token, label_selector=selector
                ),
            )
            deployments.extend(page.deployments)
            if not page.next_page_token:
                return deployments
            page_token = page.next_page_token

    def update_deployment(
        self, deployment: deployment_pb2.Deployment, revision: int
    ) -> deployment_pb2.Deployment:
        """Replace labels and spec; ABORTED if ``revision`` is not the stored one."""
        return self._call(
            self._stub.UpdateDeployment,
            pb.UpdateDeploymentRequest(deployment=deployment, revision=revision),
        ).deployment

    def apply(self, deployment: deployment_pb2.Deployment) -> ApplyResult:
        """Create the deployment, or update it from the revision just read."""
        try:
            stored = self.get_deployment(deployment.name)
        except RPCError as error:
            if error.code != grpc.StatusCode.NOT_FOUND:
                raise
            created = self.create_deployment(desired_for_update(deployment))
            return ApplyResult(ApplyAction.CREATED, created.deployment, created.invoke_token)
        if same_desired_state(stored, deployment):
            return ApplyResult(ApplyAction.UNCHANGED, stored)
        updated = self.update_deployment(desired_for_update(deployment), stored.revision)
        return ApplyResult(update_action(stored, updated), updated)

    def delete_deployment(self, name: str, *, revision: int = 0) -> pb.DeleteDeploymentResponse:
        """Start deleting a deployment (its instances drain first). With ``revision`` > 0,
        only if that is still the stored revision (else ABORTED)."""
        return self._call(
            self._stub.DeleteDeployment, pb.DeleteDeploymentRequest(name=name, revision=revision)
        )

    def wait_deleted(
        self, name: str, *, since_revision: int = 0, timeout: float | None = None
    ) -> None:
        """Block until the deployment is gone; DEADLINE_EXCEEDED after ``timeout`` seconds.

        Pass the revision returned by delete_deployment as ``since_revision``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            self._wait_deleted_from(name, since_revision, deadline)
        except RPCError as error:
            if error.code != grpc.StatusCode.OUT_OF_RANGE or since_revision == 0:
                raise
            # The server no longer keeps history that old; a fresh snapshot still answers.
            self._wait_deleted_from(name, 0, deadline)

    def _wait_deleted_from(self, name: str, since_revision: int, deadline: float | None) -> None:
        tracker = DeletionTracker(name)
        events = self.watch_events(since_revision, timeout=self._remaining(deadline))
        try:
            for event in events:
                if tracker.done(event):
                    return
        finally:
            events.close()
        raise RPCError(
            grpc.StatusCode.UNAVAILABLE,
            f"the watch stream ended before deployment {name!r} was deleted; retry",
        )

    def scale_deployment(
        self,
        name: str,
        *,
        min_instances: int | None = None,
        max_instances: int | None = None,
        revision: int = 0,
    ) -> deployment_pb2.Deployment:
        """Change instance bounds; a bound left None keeps its value."""
        return self._call(
            self._stub.ScaleDeployment,
            pb.ScaleDeploymentRequest(
                name=name,
                min_instances=min_instances,
                max_instances=max_instances,
                revision=revision,
            ),
        ).deployment

    def rotate_invoke_token(self, name: str) -> str:
        """Replace the deployment's invoke token and return the new one (shown only once)."""
        return self._call(
            self._stub.RotateInvokeToken, pb.RotateInvokeTokenRequest(name=name)
        ).invoke_token

    def list_nodes(self) -> list[node_pb2.Node]:
        """Every registered node with its GPUs."""
        return list(self._call(self._stub.ListNodes, pb.ListNodesRequest()).nodes)

    def list_instances(self, deployment: str = "") -> list[instance_pb2.Instance]:
        """Instances of one deployment, or of all when ``deployment`` is empty."""
        return list(
            self._call(
                self._stub.ListInstances, pb.ListInstancesRequest(deployment=deployment)
            ).instances
        )

    def watch_events(
        self, since_revision: int = 0, *, timeout: float | None = None
    ) -> Generator[pb.WatchEventsResponse, None, None]:
        """Stream changes: from 0 a snapshot, SNAPSHOT_END, then live changes; from R every
        change after R. Close the iterator (or let it go) to end the stream."""
        call = self._stub.WatchEvents(
            pb.WatchEventsRequest(since_revision=since_revision),
            timeout=timeout,
            metadata=self._metadata,
        )
        return _translated_stream(call)


def _translated_stream(
    call: grpc.CallIterator[pb.WatchEventsResponse],
) -> Generator[pb.WatchEventsResponse, None, None]:
    # The one place where gRPC errors become RPCError for streams.
    try:
        yield from call
    except grpc.RpcError as error:
        raise RPCError.from_grpc(error) from error
    finally:
        call.cancel()  # type: ignore[no-untyped-call]  # untyped in grpc-stubs
