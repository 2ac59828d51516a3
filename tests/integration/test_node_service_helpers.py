"""A scripted agent over the real NodeService stubs, and a control plane fixture factory
for the node-side tests (no tests here)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc

from gpufleet.server.app import ControlPlane, start_control_plane
from gpufleet.server.config import ServerConfig
from gpufleet.v1 import (
    deployment_pb2,
    deployment_service_pb2 as pb,
    deployment_service_pb2_grpc,
    instance_pb2,
    node_pb2,
    node_service_pb2 as npb,
    node_service_pb2_grpc,
)

State = instance_pb2.InstanceState
GPU_MIB = 81_559
HEARTBEAT_S = 0.2
T = TypeVar("T")


def node_config(state_dir: Path, node_ttl: float = 2.0) -> ServerConfig:
    return ServerConfig(
        state_dir=state_dir,
        listen="127.0.0.1:0",
        node_ttl=node_ttl,
        heartbeat_interval=1,
        reconcile_tick=0.1,
    )


@dataclass
class Plane:
    """A running control plane and an admin stub."""

    plane: ControlPlane
    channel: grpc.aio.Channel
    admin: deployment_service_pb2_grpc.DeploymentServiceAsyncStub

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.plane.admin_token}"),)

    async def create(
        self, name: str, spec: deployment_pb2.DeploymentSpec
    ) -> pb.CreateDeploymentResponse:
        return await self.admin.CreateDeployment(
            pb.CreateDeploymentRequest(deployment=deployment_pb2.Deployment(name=name, spec=spec)),
            metadata=self.metadata,
        )

    async def get(self, name: str) -> deployment_pb2.Deployment:
        got = await self.admin.GetDeployment(
            pb.GetDeploymentRequest(name=name), metadata=self.metadata
        )
        return got.deployment

    async def instances(self, deployment: str = "") -> list[instance_pb2.Instance]:
        got = await self.admin.ListInstances(
            pb.ListInstancesRequest(deployment=deployment), metadata=self.metadata
        )
        return list(got.instances)

    async def close(self) -> None:
        await self.channel.close(None)
        await self.plane.stop(grace=1.0)


@contextlib.asynccontextmanager
async def running_plane(config: ServerConfig) -> AsyncIterator[Plane]:
    plane = await start_control_plane(config)
    channel = grpc.aio.insecure_channel(plane.address)
    running = Plane(plane, channel, deployment_service_pb2_grpc.DeploymentServiceStub(channel))
    try:
        yield running
    finally:
        await running.close()


def share_spec(
    min_instances: int = 2, max_instances: int = 4, memory_mib: int = 2048, env: str = "1"
) -> deployment_pb2.DeploymentSpec:
    return deployment_pb2.DeploymentSpec(
        command="python -m examples.model_server --port $PORT",
        env={"VERSION": env},
        gpu=deployment_pb2.GpuRequest(memory_mib=memory_mib, core_percent=25),
        scaling=deployment_pb2.ScalingSpec(
            min_instances=min_instances, max_instances=max_instances
        ),
    )


async def eventually(check: Callable[[], Awaitable[T]], timeout: float = 15.0) -> T:
    """Retry an async check until it stops raising AssertionError (bounded in time)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.05)


@dataclass
class ScriptedAgent:
    """Plays an agent: registers, holds Connect, heartbeats, and by default runs every
    assignment at once (READY on a port) and stops drained ones (STOPPED)."""

    address: str
    join_token: str
    name: str
    gpu_uuids: tuple[str, ...] = ("GPU-0",)
    node_id: str = ""
    secret: str = ""
    auto: bool = True
    fail_generation: int | None = None
    """Assignments of this generation are reported FAILED in a crash loop."""
    statuses: dict[str, npb.InstanceStatus] = field(default_factory=dict)
    desired: npb.DesiredInstances | None = None
    updates: int = 0
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _channel: grpc.aio.Channel | None = None
    _call: grpc.aio.StreamStreamCall[npb.ConnectRequest, npb.ConnectResponse] | None = None
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _next_port: int = 20000

    @property
    def stub(self) -> node_service_pb2_grpc.NodeServiceAsyncStub:
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(self.address)
        return node_service_pb2_grpc.NodeServiceStub(self._channel)

    async def register(self) -> npb.RegisterResponse:
        resp = await self.stub.Register(
            npb.RegisterRequest(
                join_token=self.join_token,
                node_name=self.name,
                node_id=self.node_id,
                node_secret=self.secret,
            )
        )
        self.node_id, self.secret = resp.node_id, resp.node_secret
        return resp

    def credentials(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.secret}"), ("gpufleet-node-id", self.node_id))

    async def connect(self, heartbeats: bool = True) -> None:
        self.desired = None
        self._call = self.stub.Connect(None, metadata=self.credentials())
        self._tasks.append(asyncio.ensure_future(self._read()))
        await self.heartbeat()
        if heartbeats:
            self._tasks.append(asyncio.ensure_future(self._beat()))

    async def go_silent(self) -> None:
        """Stop heartbeating and drop the stream, like an agent whose machine died."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            # The stream may have ended on the server side first (control plane stopped).
            with contextlib.suppress(
                asyncio.CancelledError, asyncio.InvalidStateError, grpc.aio.AioRpcError
            ):
                await task
        self._tasks.clear()
        if self._call is not None:
            self._call.cancel()
            self._call = None

    async def close(self) -> None:
        await self.go_silent()
        if self._channel is not None:
            await self._channel.close(None)
            self._channel = None

    def gpus(self) -> list[node_pb2.Gpu]:
        used = 512 + sum(
            a.gpu_memory_mib for a in (self.desired.instances if self.desired else [])
        )
        return [
            node_pb2.Gpu(
                uuid=uuid, index=i, name="Simulated GPU 80GB", memory_total_mib=GPU_MIB,
                memory_used_mib=used if i == 0 else 512, sm_utilization_percent=7,
                health=node_pb2.GPU_HEALTH_SIMULATED,
            )
            for i, uuid in enumerate(self.gpu_uuids)
        ]

    async def heartbeat(self) -> None:
        if self._call is None:
            raise AssertionError("connect first")
        await self._call.write(
            npb.ConnectRequest(
                heartbeat=npb.Heartbeat(
                    gpus=self.gpus(),
                    instances=list(self.statuses.values()),
                    cpu_millis=16_000,
                    memory_mib=64_000,
                    agent_version="scripted",
                    advertise_host="127.0.0.1",
                )
            )
        )

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            await self.heartbeat()

    async def _read(self) -> None:
        if self._call is None:
            return
        async for response in self._call:
            self.desired = response.desired
            self.updates += 1
            if self.auto:
                self._run(response.desired)
            self._changed.set()

    def _run(self, desired: npb.DesiredInstances) -> None:
        wanted = {a.instance_id: a for a in desired.instances}
        for instance_id in list(self.statuses):
            if instance_id not in wanted:
                del self.statuses[instance_id]
        for a in desired.instances:
            if a.draining:
                self.set(a.instance_id, State.INSTANCE_STATE_STOPPED, generation=a.generation)
            elif a.instance_id not in self.statuses:
                if a.generation == self.fail_generation:
                    self.set(a.instance_id, State.INSTANCE_STATE_FAILED, reason="exit code 1",
                             crash_loop=True, generation=a.generation)
                else:
                    self.set(a.instance_id, State.INSTANCE_STATE_READY, generation=a.generation)

    def set(
        self,
        instance_id: str,
        state: instance_pb2.InstanceState.ValueType,
        reason: str = "",
        crash_loop: bool = False,
        generation: int = 1,
    ) -> None:
        old = self.statuses.get(instance_id)
        port = old.port if old is not None else self._take_port()
        self.statuses[instance_id] = npb.InstanceStatus(
            instance_id=instance_id, state=state, reason=reason, port=port,
            pid=4000 + port % 1000 if state != State.INSTANCE_STATE_STOPPED else 0,
            crash_loop=crash_loop, generation=generation, gpu_memory_used_mib=1500,
            sm_utilization_percent=20,
        )

    def _take_port(self) -> int:
        self._next_port += 1
        return self._next_port

    async def wait_desired(
        self, check: Callable[[npb.DesiredInstances], bool], timeout: float = 15.0
    ) -> npb.DesiredInstances:
        """Wait until a desired set the server sent satisfies `check`."""
        async def satisfied() -> npb.DesiredInstances:
            while self.desired is None or not check(self.desired):
                self._changed.clear()
                await self._changed.wait()
            return self.desired

        return await asyncio.wait_for(satisfied(), timeout)


def ids(desired: npb.DesiredInstances) -> set[str]:
    return {a.instance_id for a in desired.instances}
