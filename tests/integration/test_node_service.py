"""NodeService and the reconciler against the real control plane (port 0, SQLite in
tmp_path) with scripted agents on real bidi streams: placement, reports, auth, node loss,
restart grace, deletion and rolling updates."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import grpc
import pytest

from gpufleet.v1 import (
    deployment_pb2,
    deployment_service_pb2 as pb,
    deployment_service_pb2_grpc,
    instance_pb2,
    node_pb2,
    node_service_pb2 as npb,
    node_service_pb2_grpc,
)
from tests.integration.test_node_service_helpers import (
    Plane,
    ScriptedAgent,
    eventually,
    ids,
    node_config,
    running_plane,
    share_spec,
)

Code = grpc.StatusCode
State = instance_pb2.InstanceState
Phase = deployment_pb2.DeploymentPhase

pytestmark = pytest.mark.timeout(90)


async def agent(cp: Plane, name: str, gpus: tuple[str, ...] = ("GPU-0",)) -> ScriptedAgent:
    scripted = ScriptedAgent(cp.plane.address, cp.plane.join_token, name, gpu_uuids=gpus)
    await scripted.register()
    return scripted


async def test_join_token_file_is_private_and_stable(tmp_path: Path) -> None:
    async with running_plane(node_config(tmp_path / "s")) as cp:
        token = cp.plane.join_token
    path = tmp_path / "s" / "join-token"
    assert path.read_text().strip() == token
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    async with running_plane(node_config(tmp_path / "s")) as again:
        assert again.plane.join_token == token


async def test_register_connect_place_report_ready(tmp_path: Path) -> None:
    async with running_plane(node_config(tmp_path / "s")) as cp:
        a = await agent(cp, "gpu-a")
        assert a.node_id.startswith("node-") and len(a.node_id) == 13
        try:
            await a.connect()
            first = await a.wait_desired(lambda d: True)
            assert list(first.instances) == []
            await cp.create("echo", share_spec(min_instances=2))
            desired = await a.wait_desired(lambda d: len(d.instances) == 2)
            for assignment in desired.instances:
                assert list(assignment.gpu_uuids) == ["GPU-0"]
                assert assignment.env["CUDA_VISIBLE_DEVICES"] == "GPU-0"
                assert assignment.env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "25"
                assert assignment.env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == "0=2048M"
                assert assignment.spec.command.startswith("python -m examples.model_server")
                assert not assignment.draining

            async def running() -> deployment_pb2.Deployment:
                d = await cp.get("echo")
                assert d.status.phase == Phase.DEPLOYMENT_PHASE_RUNNING, d.status
                assert (d.status.ready_instances, d.status.desired_instances) == (2, 2)
                assert d.observed_generation == d.generation
                return d

            await eventually(running)
            listed = await cp.instances("echo")
            assert {i.id for i in listed} == ids(desired)
            for instance in listed:
                assert instance.state == State.INSTANCE_STATE_READY
                assert instance.node_id == a.node_id
                port = a.statuses[instance.id].port
                assert instance.address == f"127.0.0.1:{port}"
                assert instance.HasField("ready_time")
                assert instance.gpu_memory_reserved_mib == 2048

            nodes = await cp.admin.ListNodes(pb.ListNodesRequest(), metadata=cp.metadata)
            (node,) = nodes.nodes
            assert (node.id, node.name) == (a.node_id, "gpu-a")
            assert node.state == node_pb2.NODE_STATE_READY
            (gpu,) = node.gpus
            assert gpu.memory_total_mib == 81_559
            assert gpu.memory_reserved_mib == 4096
            assert gpu.core_reserved_percent == 50
            assert gpu.memory_used_mib == 512 + 4096
            assert gpu.sm_utilization_percent == 7
            assert sorted(gpu.instance_ids) == sorted(ids(desired))
            assert node.advertise_host == "127.0.0.1" and node.agent_version == "scripted"
        finally:
            await a.close()


async def test_register_errors_and_reregistration(tmp_path: Path) -> None:
    async with running_plane(node_config(tmp_path / "s")) as cp:
        stub = node_service_pb2_grpc.NodeServiceStub(cp.channel)
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.Register(npb.RegisterRequest(node_name="n"))
        assert missing.value.code() == Code.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as wrong:
            await stub.Register(npb.RegisterRequest(join_token="nope", node_name="n"))
        assert wrong.value.code() == Code.PERMISSION_DENIED
        with pytest.raises(grpc.aio.AioRpcError) as admin:
            await stub.Register(npb.RegisterRequest(join_token=cp.plane.admin_token, node_name="n"))
        assert admin.value.code() == Code.PERMISSION_DENIED
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await stub.Register(
                npb.RegisterRequest(join_token=cp.plane.join_token, node_name="n",
                                    labels={"bad key": "x"})
            )
        assert bad.value.code() == Code.INVALID_ARGUMENT

        first = await stub.Register(
            npb.RegisterRequest(join_token=cp.plane.join_token, node_name="n", labels={"z": "a"})
        )
        assert first.heartbeat_interval_seconds == 1
        again = await stub.Register(
            npb.RegisterRequest(node_name="n2", node_id=first.node_id,
                                node_secret=first.node_secret, labels={"z": "b"})
        )
        assert (again.node_id, again.node_secret) == (first.node_id, first.node_secret)
        with pytest.raises(grpc.aio.AioRpcError) as stolen:
            await stub.Register(
                npb.RegisterRequest(join_token=cp.plane.join_token, node_name="n",
                                    node_id=first.node_id, node_secret="guess")
            )
        assert stolen.value.code() == Code.PERMISSION_DENIED
        nodes = await cp.admin.ListNodes(pb.ListNodesRequest(), metadata=cp.metadata)
        assert [(n.id, n.name, dict(n.labels)) for n in nodes.nodes] == [
            (first.node_id, "n2", {"z": "b"})
        ]


async def expect_denied(call: grpc.aio.StreamStreamCall[npb.ConnectRequest, npb.ConnectResponse],
                        code: grpc.StatusCode) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call.read()
    assert caught.value.code() == code


async def test_node_credentials_are_isolated(tmp_path: Path) -> None:
    async with running_plane(node_config(tmp_path / "s")) as cp:
        a = await agent(cp, "a", ("GPU-a",))
        b = await agent(cp, "b", ("GPU-b",))
        stub = node_service_pb2_grpc.NodeServiceStub(cp.channel)
        try:
            await expect_denied(stub.Connect(None, metadata=cp.metadata), Code.UNAUTHENTICATED)
            await expect_denied(
                stub.Connect(None, metadata=(*cp.metadata, ("gpufleet-node-id", a.node_id))),
                Code.PERMISSION_DENIED,
            )
            await expect_denied(
                stub.Connect(None, metadata=(("authorization", f"Bearer {a.secret}"),
                                       ("gpufleet-node-id", b.node_id))),
                Code.PERMISSION_DENIED,
            )
            admin = deployment_service_pb2_grpc.DeploymentServiceStub(cp.channel)
            with pytest.raises(grpc.aio.AioRpcError) as as_admin:
                await admin.ListNodes(pb.ListNodesRequest(), metadata=a.credentials())
            assert as_admin.value.code() == Code.PERMISSION_DENIED

            await a.connect()
            await b.connect()
            await cp.create("echo", share_spec(min_instances=2))
            got_a = await a.wait_desired(lambda d: len(d.instances) == 1)
            got_b = await b.wait_desired(lambda d: len(d.instances) == 1)
            listed = {i.id: i.node_id for i in await cp.instances("echo")}
            assert {listed[i] for i in ids(got_a)} == {a.node_id}
            assert {listed[i] for i in ids(got_b)} == {b.node_id}
        finally:
            await a.close()
            await b.close()


async def test_silent_node_is_replaced_exactly_once_and_told_to_stop_on_return(
    tmp_path: Path,
) -> None:
    async with running_plane(node_config(tmp_path / "s", node_ttl=2.0)) as cp:
        a = await agent(cp, "a", ("GPU-a",))
        b = await agent(cp, "b", ("GPU-b",))
        try:
            await a.connect()
            await cp.create("echo", share_spec(min_instances=2))
            on_a = ids(await a.wait_desired(lambda d: len(d.instances) == 2))

            async def running() -> None:
                assert (await cp.get("echo")).status.ready_instances == 2

            await eventually(running)
            await b.connect()
            await b.wait_desired(lambda d: True)
            await a.go_silent()
            on_b = ids(await b.wait_desired(lambda d: len(d.instances) == 2, timeout=20))
            assert not on_a & on_b

            async def replaced() -> list[instance_pb2.Instance]:
                listed = await cp.instances("echo")
                assert {i.id for i in listed} == on_a | on_b
                lost = [i for i in listed if i.id in on_a]
                assert all(i.state == State.INSTANCE_STATE_FAILED for i in lost)
                assert all("lost" in i.reason for i in lost)
                nodes = await cp.admin.ListNodes(pb.ListNodesRequest(), metadata=cp.metadata)
                assert {n.id: n.state for n in nodes.nodes}[a.node_id] == node_pb2.NODE_STATE_LOST
                return listed

            await eventually(replaced)
            # Another TTL later nothing else was created: each instance was replaced once.
            updates = b.updates
            await asyncio.sleep(2.5)
            await eventually(replaced)
            assert ids(b.desired) == on_b if b.desired else False
            assert b.updates == updates

            # The lost node comes back: it is told to run nothing, its old rows go.
            a.auto = False
            await a.connect()
            back = await a.wait_desired(lambda d: True)
            assert list(back.instances) == []

            async def settled() -> None:
                assert {i.id for i in await cp.instances("echo")} == on_b

            await eventually(settled)
        finally:
            await a.close()
            await b.close()


async def test_restarted_control_plane_gives_nodes_a_grace_period(tmp_path: Path) -> None:
    state_dir = tmp_path / "s"
    a: ScriptedAgent | None = None
    b: ScriptedAgent | None = None
    async with running_plane(node_config(state_dir, node_ttl=3.0)) as cp:
        a = await agent(cp, "a", ("GPU-a",))
        b = await agent(cp, "b", ("GPU-b",))
        await a.connect()
        await cp.create("echo", share_spec(min_instances=2))
        on_a = ids(await a.wait_desired(lambda d: len(d.instances) == 2))
        await b.connect()

        async def running() -> None:
            assert (await cp.get("echo")).status.ready_instances == 2

        await eventually(running)
        await a.go_silent()
        await b.go_silent()
    try:
        async with running_plane(node_config(state_dir, node_ttl=3.0)) as cp2:
            b.address = a.address = cp2.plane.address
            await b.close()
            await a.close()
            await b.connect()
            # a stays away for most of the TTL: within the grace period nothing moves.
            await asyncio.sleep(1.5)
            await a.connect()
            again = await a.wait_desired(lambda d: True)
            assert ids(again) == on_a
            await asyncio.sleep(1.0)
            listed = await cp2.instances("echo")
            assert {i.id for i in listed} == on_a
            assert all(i.state == State.INSTANCE_STATE_READY for i in listed)
            assert ids(b.desired) == set() if b.desired is not None else True
    finally:
        await a.close()
        await b.close()


async def test_delete_drains_then_purges(tmp_path: Path) -> None:
    async with running_plane(node_config(tmp_path / "s")) as cp:
        a = await agent(cp, "a")
        try:
            await a.connect()
            await cp.create("echo", share_spec(min_instances=1))
            (running,) = ids(await a.wait_desired(lambda d: len(d.instances) == 1))

            async def ready() -> None:
                assert (await cp.get("echo")).status.ready_instances == 1

            await eventually(ready)
            a.auto = False
            watch = cp.admin.WatchEvents(
                pb.WatchEventsRequest(since_revision=0), metadata=cp.metadata
            )
            deleted = await cp.admin.DeleteDeployment(
                pb.DeleteDeploymentRequest(name="echo"), metadata=cp.metadata
            )
            assert not deleted.removed
            assert deleted.deployment.status.phase == Phase.DEPLOYMENT_PHASE_DRAINING
            draining = await a.wait_desired(lambda d: all(x.draining for x in d.instances))
            assert ids(draining) == {running}
            a.set(running, State.INSTANCE_STATE_DRAINING)
            await a.heartbeat()

            async def shown_draining() -> None:
                (instance,) = await cp.instances("echo")
                assert instance.state == State.INSTANCE_STATE_DRAINING

            await eventually(shown_draining)
            a.set(running, State.INSTANCE_STATE_STOPPED)
            await a.heartbeat()
            await a.wait_desired(lambda d: not d.instances)
            async for event in watch:
                if event.type == pb.EventType.EVENT_TYPE_DELETED and event.HasField("deployment"):
                    assert event.deployment.name == "echo"
                    break
            watch.cancel()
            with pytest.raises(grpc.aio.AioRpcError) as gone:
                await cp.get("echo")
            assert gone.value.code() == Code.NOT_FOUND
        finally:
            await a.close()


async def test_rolling_update_with_a_failing_new_instance_keeps_the_old(tmp_path: Path) -> None:
    async with running_plane(node_config(tmp_path / "s")) as cp:
        a = await agent(cp, "a")
        try:
            await a.connect()
            created = await cp.create("echo", share_spec(min_instances=2))
            old = ids(await a.wait_desired(lambda d: len(d.instances) == 2))

            async def ready() -> deployment_pb2.Deployment:
                d = await cp.get("echo")
                assert d.status.ready_instances == 2
                return d

            current = await eventually(ready)
            a.fail_generation = current.generation + 1
            new_spec = share_spec(min_instances=2, env="2")
            updated = deployment_pb2.Deployment(name="echo", spec=new_spec)
            await cp.admin.UpdateDeployment(
                pb.UpdateDeploymentRequest(deployment=updated, revision=current.revision),
                metadata=cp.metadata,
            )
            with_new = await a.wait_desired(lambda d: len(d.instances) == 3)
            (new,) = ids(with_new) - old
            assert created.deployment.generation + 1 == a.fail_generation

            async def stopped() -> deployment_pb2.Deployment:
                d = await cp.get("echo")
                assert "rollout stopped" in d.status.message, d.status
                assert f"new instance {new} failed" in d.status.message
                assert d.status.phase == Phase.DEPLOYMENT_PHASE_RUNNING
                assert d.status.ready_instances == 2
                return d

            await eventually(stopped)
            await asyncio.sleep(0.5)
            desired = a.desired
            assert desired is not None and len(desired.instances) == 3
            assert not any(x.draining for x in desired.instances)
            states = {i.id: i.state for i in await cp.instances("echo")}
            assert {k for k, v in states.items() if v == State.INSTANCE_STATE_READY} == old

            # A scale change is no rollout: nothing restarts.
            scaled = await cp.admin.ScaleDeployment(
                pb.ScaleDeploymentRequest(name="echo", max_instances=5), metadata=cp.metadata
            )
            assert scaled.deployment.spec.scaling.max_instances == 5
        finally:
            await a.close()


async def test_rolling_update_replaces_instances_within_limits(tmp_path: Path) -> None:
    async with running_plane(node_config(tmp_path / "s")) as cp:
        a = await agent(cp, "a")
        try:
            await a.connect()
            await cp.create("echo", share_spec(min_instances=2))
            old = ids(await a.wait_desired(lambda d: len(d.instances) == 2))

            async def ready() -> deployment_pb2.Deployment:
                d = await cp.get("echo")
                assert d.status.ready_instances == 2
                return d

            current = await eventually(ready)
            new_spec = share_spec(min_instances=2, env="2")
            updated = deployment_pb2.Deployment(name="echo", spec=new_spec)
            await cp.admin.UpdateDeployment(
                pb.UpdateDeploymentRequest(deployment=updated, revision=current.revision),
                metadata=cp.metadata,
            )
            seen_max = 0

            def check(d: npb.DesiredInstances) -> bool:
                nonlocal seen_max
                live = [x for x in d.instances if not x.draining]
                seen_max = max(seen_max, len(live))
                return len(live) == 2 and not (ids(d) & old)

            final = await a.wait_desired(check)
            assert seen_max <= 3  # surge 25% of 2 -> 1
            assert {x.generation for x in final.instances} == {current.generation + 1}

            async def rolled() -> None:
                d = await cp.get("echo")
                assert d.status.ready_instances == 2 and d.status.message == "", d.status

            await eventually(rolled)
        finally:
            await a.close()
