"""RoutingService against the real control plane: route snapshot then deltas (ready and
draining endpoints, token hash, removal), and ReportLoad driving scale from zero and the
status' queue depth / in-flight."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import grpc
import pytest

from gpufleet.v1 import (
    deployment_pb2,
    deployment_service_pb2 as pb,
    instance_pb2,
    routing_service_pb2 as rpb,
    routing_service_pb2_grpc,
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

State = instance_pb2.InstanceState
Phase = deployment_pb2.DeploymentPhase

pytestmark = pytest.mark.timeout(60)


class RouteWatch:
    """WatchRoutes read in the background, folded into a table."""

    def __init__(self, cp: Plane) -> None:
        stub = routing_service_pb2_grpc.RoutingServiceStub(cp.channel)
        self.call = stub.WatchRoutes(
            rpb.WatchRoutesRequest(gateway_id="gw-1"), metadata=cp.metadata
        )
        self.messages: list[rpb.WatchRoutesResponse] = []
        self.table: dict[str, rpb.DeploymentRoute] = {}
        self.changed = asyncio.Event()
        self.task = asyncio.ensure_future(self._pump())

    async def _pump(self) -> None:
        async for message in self.call:
            self.messages.append(message)
            if message.snapshot:
                self.table = {}
            for route in message.routes:
                self.table[route.deployment] = route
            for name in message.removed_deployments:
                self.table.pop(name, None)
            self.changed.set()

    async def until(self, check: object, timeout: float = 15.0) -> dict[str, rpb.DeploymentRoute]:
        async def wait() -> dict[str, rpb.DeploymentRoute]:
            while True:
                self.changed.clear()
                try:
                    if check(self.table):  # type: ignore[operator]
                        return self.table
                except KeyError:
                    pass
                await self.changed.wait()

        return await asyncio.wait_for(wait(), timeout)

    def close(self) -> None:
        self.call.cancel()
        self.task.cancel()


async def test_routes_snapshot_then_changes(tmp_path: Path) -> None:
    async with running_plane(node_config(tmp_path / "s")) as cp:
        created = await cp.create("echo", share_spec(min_instances=0, max_instances=2))
        watch = RouteWatch(cp)
        a = ScriptedAgent(cp.plane.address, cp.plane.join_token, "a")
        await a.register()
        try:
            table = await watch.until(lambda t: "echo" in t)
            assert watch.messages[0].snapshot
            route = table["echo"]
            assert list(route.endpoints) == []
            assert route.invoke_token_sha256 == hashlib.sha256(
                created.invoke_token.encode()
            ).hexdigest()
            assert route.scaling.max_instances == 2
            assert route.traffic.max_request_concurrency == 1

            await cp.admin.ScaleDeployment(
                pb.ScaleDeploymentRequest(name="echo", min_instances=1), metadata=cp.metadata
            )
            await a.connect()
            (instance_id,) = ids(await a.wait_desired(lambda d: len(d.instances) == 1))
            port = a.statuses[instance_id].port
            table = await watch.until(lambda t: len(t["echo"].endpoints) == 1)
            (endpoint,) = table["echo"].endpoints
            assert (endpoint.instance_id, endpoint.address) == (instance_id, f"127.0.0.1:{port}")
            assert (endpoint.node_id, endpoint.draining) == (a.node_id, False)
            assert not any(m.snapshot for m in watch.messages[1:])

            rotated = await cp.admin.RotateInvokeToken(
                pb.RotateInvokeTokenRequest(name="echo"), metadata=cp.metadata
            )
            digest = hashlib.sha256(rotated.invoke_token.encode()).hexdigest()
            await watch.until(lambda t: t["echo"].invoke_token_sha256 == digest)

            a.auto = False
            await cp.admin.DeleteDeployment(
                pb.DeleteDeploymentRequest(name="echo"), metadata=cp.metadata
            )
            table = await watch.until(lambda t: t["echo"].endpoints[0].draining)
            a.set(instance_id, State.INSTANCE_STATE_STOPPED)
            await a.heartbeat()
            await watch.until(lambda t: "echo" not in t)
            assert any("echo" in m.removed_deployments for m in watch.messages)
        finally:
            watch.close()
            await a.close()


async def test_report_load_scales_from_zero_and_shows_in_status(tmp_path: Path) -> None:
    async with running_plane(node_config(tmp_path / "s")) as cp:
        a = ScriptedAgent(cp.plane.address, cp.plane.join_token, "a")
        await a.register()
        stub = routing_service_pb2_grpc.RoutingServiceStub(cp.channel)
        try:
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await stub.ReportLoad(
                    rpb.ReportLoadRequest(gateway_id="gw"), metadata=a.credentials()
                )
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED

            await a.connect()
            await cp.create("tokens", share_spec(min_instances=0, max_instances=2))

            async def standby() -> None:
                d = await cp.get("tokens")
                assert d.status.phase == Phase.DEPLOYMENT_PHASE_STANDBY
                assert d.observed_generation == d.generation

            await eventually(standby)
            reply = await stub.ReportLoad(
                rpb.ReportLoadRequest(
                    gateway_id="gw",
                    loads=[rpb.DeploymentLoad(deployment="tokens", queue_depth=1, wakeups=1)],
                ),
                metadata=cp.metadata,
            )
            assert reply.report_interval_seconds == 1
            (started,) = ids(await a.wait_desired(lambda d: len(d.instances) == 1))

            async def loaded() -> None:
                # As a gateway does: one report per interval while calls wait or run.
                await stub.ReportLoad(
                    rpb.ReportLoadRequest(
                        gateway_id="gw",
                        loads=[rpb.DeploymentLoad(deployment="tokens", in_flight=1)],
                    ),
                    metadata=cp.metadata,
                )
                d = await cp.get("tokens")
                assert d.status.phase == Phase.DEPLOYMENT_PHASE_RUNNING, d.status
                assert (d.status.queue_depth, d.status.in_flight) == (0, 1), d.status
                assert d.status.desired_instances == 1

            await eventually(loaded)

            # scale-out asks for one more, up to max_instances.
            await stub.ReportLoad(
                rpb.ReportLoadRequest(
                    gateway_id="gw",
                    loads=[rpb.DeploymentLoad(deployment="tokens", in_flight=1,
                                              scale_out_requests=1)],
                ),
                metadata=cp.metadata,
            )
            both = await a.wait_desired(lambda d: len(d.instances) == 2)
            assert started in ids(both)
        finally:
            await a.close()
