"""The synchronous SDK against a real control plane on 127.0.0.1, port 0.

The control plane runs in a background thread with its own event loop, since the sync
client blocks the thread that calls it.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest

from gpufleet.client import ApplyAction, Client, RPCError
from gpufleet.server.app import ControlPlane, start_control_plane
from gpufleet.server.config import ServerConfig
from gpufleet.v1 import deployment_pb2, deployment_service_pb2 as pb, instance_pb2, node_pb2

pytestmark = pytest.mark.timeout(60)

_T = TypeVar("_T")
_STARTUP_TIMEOUT_S = 30.0


class ThreadedControlPlane:
    """A real control plane served from a daemon thread's event loop."""

    def __init__(
        self,
        state_dir: Path,
        *,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
        tls_client_ca: Path | None = None,
    ) -> None:
        self.state_dir = state_dir
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        config = ServerConfig(
            state_dir=state_dir,
            listen="127.0.0.1:0",
            tls_cert=tls_cert,
            tls_key=tls_key,
            tls_client_ca=tls_client_ca,
            # These tests play the reconciler themselves (add_instance, drain), so the real one
            # must not race them by changing phases or placing instances.
            reconcile=False,
        )
        self.plane: ControlPlane = self.run(start_control_plane(config))
        self.address = self.plane.address
        self.admin_token = self.plane.admin_token

    def run(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        """Run a coroutine on the server's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(_STARTUP_TIMEOUT_S)

    def add_instance(self, deployment: str, instance_id: str) -> None:
        """Place a ready instance directly in the store (no agent runs in these tests)."""
        store = self.plane.store
        spec = deployment_pb2.DeploymentSpec(command="run", port=8000)
        self.run(store.put_node(node_pb2.Node(id="node-1", name="n1"), "0" * 64))
        self.run(
            store.put_instance(
                instance_pb2.Instance(
                    id=instance_id,
                    deployment=deployment,
                    node_id="node-1",
                    state=instance_pb2.INSTANCE_STATE_READY,
                ),
                spec,
            )
        )

    def finish_draining(self, deployment: str, instance_id: str) -> None:
        """What the reconciler does once the last instance stopped."""
        self.run(self.plane.store.delete_instance(instance_id))
        if not self.run(self.plane.store.purge_deployment(deployment)):
            raise RuntimeError(f"deployment {deployment!r} could not be purged")

    def stop(self) -> None:
        try:
            self.run(self.plane.stop(grace=1.0))
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(_STARTUP_TIMEOUT_S)
            self._loop.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedControlPlane]:
    plane = ThreadedControlPlane(tmp_path_factory.mktemp("sdk") / "state")
    yield plane
    plane.stop()


@pytest.fixture
def client(server: ThreadedControlPlane) -> Iterator[Client]:
    with Client(server.address, server.admin_token, timeout=10) as sdk:
        yield sdk


def _deployment(name: str, **labels: str) -> deployment_pb2.Deployment:
    return deployment_pb2.Deployment(
        name=name,
        labels=labels,
        spec=deployment_pb2.DeploymentSpec(
            command="python -m examples.model_server --port $PORT",
            gpu=deployment_pb2.GpuRequest(memory_mib=1024, core_percent=25),
            scaling=deployment_pb2.ScalingSpec(min_instances=0, max_instances=2),
        ),
    )


def test_create_get_and_invoke_token(client: Client) -> None:
    created = client.create_deployment(_deployment("sdk-create", team="a"))
    assert created.invoke_token
    assert created.deployment.revision > 0
    got = client.get_deployment("sdk-create")
    assert got.name == "sdk-create" and dict(got.labels) == {"team": "a"}
    assert got.spec.gpu.core_percent == 25


def test_list_reads_every_page_and_filters_by_labels(client: Client) -> None:
    for index in range(5):
        client.create_deployment(
            _deployment(f"sdk-page-{index}", group="paged", parity=str(index % 2))
        )
    paged = client.list_deployments({"group": "paged"}, page_size=2)
    assert [d.name for d in paged] == [f"sdk-page-{i}" for i in range(5)]
    odd = client.list_deployments("group=paged,parity=1")
    assert [d.name for d in odd] == ["sdk-page-1", "sdk-page-3"]


def test_apply_creates_then_reports_unchanged_then_updates(client: Client) -> None:
    desired = _deployment("sdk-apply", team="a")
    first = client.apply(desired)
    assert first.action == ApplyAction.CREATED and first.invoke_token
    again = client.apply(desired)
    assert again.action == ApplyAction.UNCHANGED and again.invoke_token is None
    assert again.deployment.revision == first.deployment.revision
    # The server stores defaults: the stored spec, applied back, changes nothing either.
    assert client.apply(client.get_deployment("sdk-apply")).action == ApplyAction.UNCHANGED
    desired.spec.scaling.max_instances = 3
    updated = client.apply(desired)
    assert updated.action == ApplyAction.UPDATED
    assert updated.deployment.spec.scaling.max_instances == 3
    assert updated.deployment.generation == first.deployment.generation + 1
    desired.labels["team"] = "b"
    relabelled = client.apply(desired)
    assert relabelled.action == ApplyAction.UPDATED
    assert dict(relabelled.deployment.labels) == {"team": "b"}


def test_update_with_a_stale_revision_is_aborted(client: Client) -> None:
    stored = client.create_deployment(_deployment("sdk-stale")).deployment
    changed = _deployment("sdk-stale")
    changed.spec.scaling.max_instances = 2
    changed.spec.port = 9000
    client.update_deployment(changed, stored.revision)
    with pytest.raises(RPCError) as caught:
        client.update_deployment(changed, stored.revision)
    assert caught.value.code == grpc.StatusCode.ABORTED
    assert caught.value.reason


def test_invalid_spec_lists_every_field_violation(client: Client) -> None:
    bad = _deployment("sdk-bad")
    bad.spec.gpu.core_percent = 150
    bad.spec.port = 70000
    with pytest.raises(RPCError) as caught:
        client.create_deployment(bad)
    error = caught.value
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    fields = {field for field, _ in error.field_violations}
    assert any(f.endswith("spec.gpu.core_percent") for f in fields)
    assert any(f.endswith("spec.port") for f in fields)
    assert all(description for _, description in error.field_violations)


def test_missing_deployment_is_not_found(client: Client) -> None:
    with pytest.raises(RPCError) as caught:
        client.get_deployment("sdk-nothing-here")
    assert caught.value.code == grpc.StatusCode.NOT_FOUND


def test_a_wrong_or_missing_token_is_refused(server: ThreadedControlPlane) -> None:
    for token in (None, "not-the-token"):
        with (
            Client(server.address, token, timeout=10) as anonymous,
            pytest.raises(RPCError) as caught,
        ):
            anonymous.list_deployments()
        assert caught.value.code in (
            grpc.StatusCode.UNAUTHENTICATED,
            grpc.StatusCode.PERMISSION_DENIED,
        )


def test_scale_and_rotate_token(client: Client) -> None:
    created = client.create_deployment(_deployment("sdk-scale"))
    scaled = client.scale_deployment("sdk-scale", min_instances=1, max_instances=4)
    assert (scaled.spec.scaling.min_instances, scaled.spec.scaling.max_instances) == (1, 4)
    only_max = client.scale_deployment("sdk-scale", max_instances=5)
    assert (only_max.spec.scaling.min_instances, only_max.spec.scaling.max_instances) == (1, 5)
    token = client.rotate_invoke_token("sdk-scale")
    assert token and token != created.invoke_token


def test_nodes_and_instances(client: Client, server: ThreadedControlPlane) -> None:
    client.create_deployment(_deployment("sdk-instances"))
    server.add_instance("sdk-instances", "sdk-instances-1")
    assert "node-1" in [node.id for node in client.list_nodes()]
    assert [i.id for i in client.list_instances("sdk-instances")] == ["sdk-instances-1"]
    assert "sdk-instances-1" in [i.id for i in client.list_instances()]


def test_watch_snapshot_then_live_changes(client: Client) -> None:
    client.create_deployment(_deployment("sdk-watch-a"))
    events = client.watch_events(timeout=20)
    try:
        snapshot = []
        for event in events:
            if event.type == pb.EVENT_TYPE_SNAPSHOT_END:
                break
            assert event.type == pb.EVENT_TYPE_SNAPSHOT
            snapshot.append(event.deployment.name)
        assert "sdk-watch-a" in snapshot
        client.create_deployment(_deployment("sdk-watch-b"))
        live = next(e for e in events if e.WhichOneof("object") == "deployment")
        assert (live.type, live.deployment.name) == (pb.EVENT_TYPE_CREATED, "sdk-watch-b")
    finally:
        events.close()
    # Resuming from a revision replays what came after it.
    replay = client.watch_events(live.revision - 1, timeout=20)
    try:
        first = next(replay)
    finally:
        replay.close()
    assert (first.revision, first.deployment.name) == (live.revision, "sdk-watch-b")


def test_delete_removes_at_once_without_instances(client: Client) -> None:
    client.create_deployment(_deployment("sdk-delete"))
    response = client.delete_deployment("sdk-delete")
    assert response.removed
    client.wait_deleted("sdk-delete", timeout=10)  # already gone: returns at once
    with pytest.raises(RPCError) as caught:
        client.get_deployment("sdk-delete")
    assert caught.value.code == grpc.StatusCode.NOT_FOUND


def test_wait_deleted_returns_once_the_instances_drained(
    client: Client, server: ThreadedControlPlane
) -> None:
    client.create_deployment(_deployment("sdk-drain"))
    server.add_instance("sdk-drain", "sdk-drain-1")
    response = client.delete_deployment("sdk-drain")
    assert not response.removed
    with pytest.raises(RPCError) as caught:
        client.wait_deleted("sdk-drain", since_revision=response.deployment.revision, timeout=0.5)
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    server.finish_draining("sdk-drain", "sdk-drain-1")
    client.wait_deleted("sdk-drain", since_revision=response.deployment.revision, timeout=10)


def test_connection_refused_is_unavailable() -> None:
    # A bound but not listening socket holds a port that refuses connections.
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        with Client(f"127.0.0.1:{port}", "t", timeout=10) as sdk:
            with pytest.raises(RPCError) as caught:
                sdk.list_deployments()
            assert caught.value.code == grpc.StatusCode.UNAVAILABLE
            with pytest.raises(RPCError) as stream_error:
                next(sdk.watch_events())
            assert stream_error.value.code == grpc.StatusCode.UNAVAILABLE
