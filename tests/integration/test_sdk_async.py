"""The asyncio SDK against a real control plane (the shared control_plane fixture)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from gpufleet.client import ApplyAction, AsyncClient, ClientConfig, RPCError
from gpufleet.v1 import deployment_pb2, deployment_service_pb2 as pb, instance_pb2, node_pb2
from tests.integration.conftest import RunningControlPlane

pytestmark = pytest.mark.timeout(60)


def _deployment(name: str, **labels: str) -> deployment_pb2.Deployment:
    return deployment_pb2.Deployment(
        name=name,
        labels=labels,
        spec=deployment_pb2.DeploymentSpec(
            command="python -m examples.model_server --port $PORT",
            scaling=deployment_pb2.ScalingSpec(min_instances=0, max_instances=2),
        ),
    )


async def test_every_method(control_plane: RunningControlPlane) -> None:
    config = ClientConfig(control_plane.address, control_plane.admin_token, timeout=10)
    async with AsyncClient.from_config(config) as client:
        first = await client.apply(_deployment("echo", team="vision"))
        assert first.action == ApplyAction.CREATED and first.invoke_token
        assert (
            await client.apply(_deployment("echo", team="vision"))
        ).action == ApplyAction.UNCHANGED
        changed = _deployment("echo", team="vision")
        changed.spec.scaling.max_instances = 3
        assert (await client.apply(changed)).action == ApplyAction.UPDATED

        for index in range(3):
            await client.create_deployment(_deployment(f"other-{index}", team="other"))
        names = [d.name for d in await client.list_deployments(page_size=1)]
        assert names == ["echo", "other-0", "other-1", "other-2"]
        assert [d.name for d in await client.list_deployments({"team": "vision"})] == ["echo"]

        stored = await client.get_deployment("echo")
        with pytest.raises(RPCError) as stale:
            await client.update_deployment(changed, stored.revision - 1)
        assert stale.value.code == grpc.StatusCode.ABORTED

        scaled = await client.scale_deployment("echo", min_instances=1)
        assert (scaled.spec.scaling.min_instances, scaled.spec.scaling.max_instances) == (1, 3)
        assert await client.rotate_invoke_token("echo") not in ("", first.invoke_token)
        assert await client.list_nodes() == []
        assert await client.list_instances() == []

        bad = _deployment("bad")
        bad.spec.gpu.core_percent = 150
        with pytest.raises(RPCError) as invalid:
            await client.create_deployment(bad)
        assert invalid.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert any(f.endswith("spec.gpu.core_percent") for f, _ in invalid.value.field_violations)

        removed = await client.delete_deployment("other-0")
        assert removed.removed
        with pytest.raises(RPCError) as missing:
            await client.get_deployment("other-0")
        assert missing.value.code == grpc.StatusCode.NOT_FOUND


async def test_watch_snapshot_then_live(control_plane: RunningControlPlane) -> None:
    async with AsyncClient(control_plane.address, control_plane.admin_token) as client:
        await client.create_deployment(_deployment("before"))
        events = client.watch_events(timeout=20)
        kinds = []
        async for event in events:
            kinds.append((event.type, event.deployment.name))
            if event.type == pb.EVENT_TYPE_SNAPSHOT_END:
                break
        assert kinds[0] == (pb.EVENT_TYPE_SNAPSHOT, "before")
        await client.create_deployment(_deployment("after"))
        live = await anext(events)
        assert (live.type, live.deployment.name) == (pb.EVENT_TYPE_CREATED, "after")
        await events.aclose()


async def test_wait_deleted_follows_draining(control_plane: RunningControlPlane) -> None:
    store = control_plane.plane.store
    async with AsyncClient(control_plane.address, control_plane.admin_token) as client:
        await client.create_deployment(_deployment("drain"))
        await store.put_node(node_pb2.Node(id="node-1", name="n1"), "0" * 64)
        await store.put_instance(
            instance_pb2.Instance(
                id="drain-1",
                deployment="drain",
                node_id="node-1",
                state=instance_pb2.INSTANCE_STATE_READY,
            ),
            deployment_pb2.DeploymentSpec(command="run", port=8000),
        )
        response = await client.delete_deployment("drain")
        assert not response.removed
        waiter = asyncio.create_task(
            client.wait_deleted("drain", since_revision=response.deployment.revision, timeout=20)
        )
        await store.delete_instance("drain-1")
        assert await store.purge_deployment("drain")
        await asyncio.wait_for(waiter, 20)
        # From revision 0 the snapshot alone shows it is gone.
        await client.wait_deleted("drain", timeout=20)


async def test_refused_connection_and_bad_token(control_plane: RunningControlPlane) -> None:
    async with AsyncClient(control_plane.address, "wrong-token", timeout=10) as client:
        with pytest.raises(RPCError) as refused_token:
            await client.list_deployments()
        assert refused_token.value.code in (
            grpc.StatusCode.UNAUTHENTICATED,
            grpc.StatusCode.PERMISSION_DENIED,
        )
    await control_plane.plane.stop(grace=0)
    async with AsyncClient(control_plane.address, control_plane.admin_token, timeout=10) as client:
        with pytest.raises(RPCError) as unreachable:
            await client.get_deployment("echo")
        assert unreachable.value.code == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(RPCError) as stream_unreachable:
            await anext(client.watch_events())
        assert stream_unreachable.value.code == grpc.StatusCode.UNAVAILABLE
