"""The agent against a scripted NodeService: registration, heartbeats, assignments, reconnects.

The NodeService here is a small real gRPC server written in this file (127.0.0.1, port 0)
that records what the agent sends and sends the desired instances the test scripts. The
agent runs in this process with simulated GPUs; its instances are real processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import logging
import stat
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from gpufleet.agent.agent import Agent, AgentStartupError, RegistrationRefusedError
from gpufleet.agent.config import AgentConfig
from gpufleet.agent.gpu.readings import GpuHealth, GpuProbeResult, GpuReading, ProcessReading
from gpufleet.agent.gpu.simulated import SimulatedGpus, simulated_gpu_uuid
from gpufleet.agent.identity import load_identity
from gpufleet.agent.runtime import statefile
from gpufleet.agent.runtime.backoff import RestartPolicy
from gpufleet.agent.runtime.supervisor import SupervisorConfig
from gpufleet.v1 import deployment_pb2, instance_pb2, node_pb2, node_service_pb2, node_service_pb2_grpc

pytestmark = pytest.mark.timeout(60)

JOIN_TOKEN = "join-secret-1"
READY = instance_pb2.INSTANCE_STATE_READY
STOPPED = instance_pb2.INSTANCE_STATE_STOPPED
FAILED = instance_pb2.INSTANCE_STATE_FAILED
WAIT_S = 20.0


@dataclass
class Session:
    node_id: str
    outbox: asyncio.Queue[node_service_pb2.DesiredInstances | None] = field(default_factory=asyncio.Queue)


class ScriptedNodeService(node_service_pb2_grpc.NodeServiceServicer):
    """Issues ids "node-<n>" and secrets "secret-<n>"; sends `desired` on every connect."""

    def __init__(self) -> None:
        self.registrations: list[node_service_pb2.RegisterRequest] = []
        self.heartbeats: list[node_service_pb2.Heartbeat] = []
        self.connects = 0
        self.desired = node_service_pb2.DesiredInstances()
        self.sessions: list[Session] = []
        self.secrets: dict[str, str] = {}
        self.reject_connect = False
        self.heartbeat_interval = 1
        self.changed = asyncio.Condition()

    async def Register(  # noqa: N802 - gRPC method name
        self, request: node_service_pb2.RegisterRequest, context: Any
    ) -> node_service_pb2.RegisterResponse:
        self.registrations.append(request)
        if request.join_token != JOIN_TOKEN:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "join token not accepted")
        if request.node_id and self.secrets.get(request.node_id) == request.node_secret:
            node_id = request.node_id
        else:
            node_id = f"node-{len(self.secrets) + 1}"
            self.secrets[node_id] = f"secret-{len(self.secrets) + 1}"
        return node_service_pb2.RegisterResponse(
            node_id=node_id,
            node_secret=self.secrets[node_id],
            heartbeat_interval_seconds=self.heartbeat_interval,
        )

    async def Connect(  # noqa: N802 - gRPC method name
        self, request_iterator: Any, context: Any
    ) -> AsyncIterator[node_service_pb2.ConnectResponse]:
        metadata = dict(context.invocation_metadata())
        node_id = metadata.get("gpufleet-node-id", "")
        if self.reject_connect or metadata.get("authorization") != f"Bearer {self.secrets.get(node_id)}":
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown node credentials")
        self.connects += 1
        session = Session(node_id)
        self.sessions.append(session)

        async def pump_heartbeats() -> None:
            async for request in request_iterator:
                async with self.changed:
                    self.heartbeats.append(request.heartbeat)
                    self.changed.notify_all()

        reader = asyncio.create_task(pump_heartbeats())
        try:
            yield node_service_pb2.ConnectResponse(desired=self.desired)
            while True:
                getter = asyncio.create_task(session.outbox.get())
                done, _ = await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    return
                desired = getter.result()
                if desired is None:
                    return
                yield node_service_pb2.ConnectResponse(desired=desired)
        finally:
            reader.cancel()
            self.sessions.remove(session)

    async def push(self, desired: node_service_pb2.DesiredInstances) -> None:
        self.desired = desired
        for session in self.sessions:
            await session.outbox.put(desired)

    async def wait_heartbeat(
        self, predicate: Callable[[node_service_pb2.Heartbeat], bool], timeout: float = WAIT_S
    ) -> node_service_pb2.Heartbeat:
        """The first heartbeat from now on (or the latest one) that satisfies predicate."""
        async with self.changed:
            try:
                await asyncio.wait_for(
                    self.changed.wait_for(lambda: bool(self.heartbeats) and predicate(self.heartbeats[-1])),
                    timeout,
                )
            except TimeoutError:
                last = self.heartbeats[-1] if self.heartbeats else None
                raise AssertionError(f"no matching heartbeat within {timeout}s; last: {last}") from None
            return self.heartbeats[-1]


@dataclass
class ScriptedServer:
    service: ScriptedNodeService
    server: grpc.aio.Server
    port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


async def start_scripted(service: ScriptedNodeService, port: int = 0) -> ScriptedServer:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    node_service_pb2_grpc.add_NodeServiceServicer_to_server(service, server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return ScriptedServer(service, server, bound)


def kill_instance_groups(state_dir: Path) -> None:
    """SIGKILL the process group of every instance recorded under state_dir."""
    records, _ = statefile.load_records(state_dir)
    for record in records:
        if record.pid > 0:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(record.pid, signal.SIGKILL)


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "agent"
    yield directory
    kill_instance_groups(directory)


@pytest.fixture
async def scripted() -> AsyncIterator[ScriptedServer]:
    running = await start_scripted(ScriptedNodeService())
    yield running
    await running.server.stop(None)


def make_config(server: str, state_dir: Path, **overrides: Any) -> AgentConfig:
    values: dict[str, Any] = {
        "server": server,
        "state_dir": state_dir,
        "node_name": "n1",
        "join_token": JOIN_TOKEN,
        "labels": {"zone": "a"},
        "advertise_host": "127.0.0.1",
        "reconnect_cap": 0.5,
    }
    values.update(overrides)
    return AgentConfig(**values)


@dataclass
class RunningAgent:
    agent: Agent
    stop: asyncio.Event
    task: asyncio.Task[None]

    async def shutdown(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, WAIT_S)


FAST_SUPERVISOR = SupervisorConfig(
    restart_policy=RestartPolicy(backoff_base=0.1, backoff_cap=0.5), exit_poll_interval=0.05
)


def start_agent(config: AgentConfig, cards: tuple[int, ...] = (81559, 81559)) -> RunningAgent:
    agent = Agent(config, probe=SimulatedGpus(cards, config.node_name), supervisor_config=FAST_SUPERVISOR)
    stop = asyncio.Event()
    return RunningAgent(agent, stop, asyncio.create_task(agent.run(stop)))


@pytest.fixture
async def agents() -> AsyncIterator[list[RunningAgent]]:
    started: list[RunningAgent] = []
    yield started
    for running in started:
        if not running.task.done():
            await running.shutdown()


def assignment(
    instance_id: str,
    *,
    command: str = "exec sleep 300",
    generation: int = 1,
    draining: bool = False,
    gpu_uuids: tuple[str, ...] = (),
    memory_mib: int = 0,
    core_percent: int = 0,
    image: str = "",
    restart_on_overrun: bool = False,
) -> node_service_pb2.InstanceAssignment:
    spec = deployment_pb2.DeploymentSpec(
        command="" if image else command,
        image=image,
        gpu=deployment_pb2.GpuRequest(memory_mib=memory_mib, core_percent=core_percent),
        readiness_probe=deployment_pb2.Probe(
            exec=deployment_pb2.ExecProbeAction(command=["true"]),
            period=_duration(0.1),
        ),
    )
    spec.termination_grace_period.FromSeconds(2)
    spec.restart_on_gpu_memory_overrun = restart_on_overrun
    return node_service_pb2.InstanceAssignment(
        instance_id=instance_id,
        deployment="echo",
        generation=generation,
        command="" if image else command,
        gpu_uuids=list(gpu_uuids),
        gpu_memory_mib=memory_mib,
        spec=spec,
        draining=draining,
    )


def _duration(seconds: float) -> Any:
    from google.protobuf.duration_pb2 import Duration

    value = Duration()
    value.FromNanoseconds(int(seconds * 1e9))
    return value


def instance_of(heartbeat: node_service_pb2.Heartbeat, instance_id: str) -> node_service_pb2.InstanceStatus | None:
    for status in heartbeat.instances:
        if status.instance_id == instance_id:
            return status
    return None


def is_ready(instance_id: str) -> Callable[[node_service_pb2.Heartbeat], bool]:
    def check(heartbeat: node_service_pb2.Heartbeat) -> bool:
        status = instance_of(heartbeat, instance_id)
        return status is not None and status.state == READY and status.pid > 0

    return check


async def test_registers_saves_identity_and_heartbeats(
    scripted: ScriptedServer, state_dir: Path, agents: list[RunningAgent]
) -> None:
    agents.append(start_agent(make_config(scripted.address, state_dir)))
    heartbeat = await scripted.service.wait_heartbeat(lambda hb: len(hb.gpus) == 2)

    [registration] = scripted.service.registrations
    assert (registration.join_token, registration.node_name) == (JOIN_TOKEN, "n1")
    assert dict(registration.labels) == {"zone": "a"}
    assert registration.node_id == ""
    identity = load_identity(state_dir)
    assert identity is not None and (identity.node_id, identity.node_secret) == ("node-1", "secret-1")
    assert stat.S_IMODE((state_dir / "node.json").stat().st_mode) == 0o600

    assert [gpu.uuid for gpu in heartbeat.gpus] == [simulated_gpu_uuid("n1", 0), simulated_gpu_uuid("n1", 1)]
    assert all(gpu.memory_total_mib == 81559 for gpu in heartbeat.gpus)
    assert heartbeat.advertise_host == "127.0.0.1"
    assert heartbeat.cpu_millis >= 1000 and heartbeat.memory_mib > 0
    assert heartbeat.agent_version
    await agents[0].agent.connected.wait()


async def test_runs_assignments_and_reports_declared_gpu_usage(
    scripted: ScriptedServer, state_dir: Path, agents: list[RunningAgent]
) -> None:
    gpu0 = simulated_gpu_uuid("n1", 0)
    await scripted.service.push(
        node_service_pb2.DesiredInstances(
            instances=[
                assignment("echo-a", gpu_uuids=(gpu0,), memory_mib=2048, core_percent=25),
                assignment("echo-b", gpu_uuids=(gpu0,), memory_mib=2048, core_percent=25),
            ]
        )
    )
    agents.append(start_agent(make_config(scripted.address, state_dir)))
    heartbeat = await scripted.service.wait_heartbeat(
        lambda hb: is_ready("echo-a")(hb) and is_ready("echo-b")(hb) and hb.gpus[0].memory_used_mib == 4096
    )
    for instance_id in ("echo-a", "echo-b"):
        status = instance_of(heartbeat, instance_id)
        assert status is not None
        assert status.gpu_memory_used_mib == 2048 and status.sm_utilization_percent == 25
        assert not status.gpu_memory_overrun and status.port > 0 and status.generation == 1
    assert heartbeat.gpus[0].sm_utilization_percent == 50
    assert heartbeat.gpus[1].memory_used_mib == 0

    # Removed from the desired set: stopped and no longer reported; its GPU share is freed.
    await scripted.service.push(
        node_service_pb2.DesiredInstances(
            instances=[assignment("echo-a", gpu_uuids=(gpu0,), memory_mib=2048, core_percent=25)]
        )
    )
    heartbeat = await scripted.service.wait_heartbeat(
        lambda hb: instance_of(hb, "echo-b") is None and hb.gpus[0].memory_used_mib == 2048
    )
    assert is_ready("echo-a")(heartbeat)


async def test_draining_stops_and_keeps_reporting(
    scripted: ScriptedServer, state_dir: Path, agents: list[RunningAgent]
) -> None:
    await scripted.service.push(node_service_pb2.DesiredInstances(instances=[assignment("echo-a")]))
    agents.append(start_agent(make_config(scripted.address, state_dir)))
    heartbeat = await scripted.service.wait_heartbeat(is_ready("echo-a"))
    pid = instance_of(heartbeat, "echo-a").pid  # type: ignore[union-attr]

    await scripted.service.push(node_service_pb2.DesiredInstances(instances=[assignment("echo-a", draining=True)]))
    heartbeat = await scripted.service.wait_heartbeat(
        lambda hb: (status := instance_of(hb, "echo-a")) is not None and status.state == STOPPED
    )
    assert instance_of(heartbeat, "echo-a").pid == 0  # type: ignore[union-attr]
    assert not _alive(pid)


async def test_assignment_it_cannot_run_is_reported_failed(
    scripted: ScriptedServer, state_dir: Path, agents: list[RunningAgent]
) -> None:
    await scripted.service.push(
        node_service_pb2.DesiredInstances(instances=[assignment("img-1", image="registry/model:1")])
    )
    agents.append(start_agent(make_config(scripted.address, state_dir)))
    heartbeat = await scripted.service.wait_heartbeat(lambda hb: instance_of(hb, "img-1") is not None)
    status = instance_of(heartbeat, "img-1")
    assert status is not None and status.state == FAILED
    assert "image" in status.reason and "command" in status.reason


async def test_instances_survive_control_plane_outage_and_are_adopted(
    scripted: ScriptedServer, state_dir: Path, agents: list[RunningAgent]
) -> None:
    await scripted.service.push(node_service_pb2.DesiredInstances(instances=[assignment("echo-a")]))
    agents.append(start_agent(make_config(scripted.address, state_dir)))
    heartbeat = await scripted.service.wait_heartbeat(is_ready("echo-a"))
    pid = instance_of(heartbeat, "echo-a").pid  # type: ignore[union-attr]
    agent = agents[0].agent

    await scripted.server.stop(None)
    await _wait_until(lambda: not agent.connected.is_set())
    assert _alive(pid)

    # The control plane comes back on the same port with what it had persisted.
    service = scripted.service
    service.heartbeats.clear()
    restarted = await start_scripted(service, scripted.port)
    try:
        heartbeat = await service.wait_heartbeat(is_ready("echo-a"))
        assert instance_of(heartbeat, "echo-a").pid == pid  # type: ignore[union-attr]
        assert instance_of(heartbeat, "echo-a").restart_count == 0  # type: ignore[union-attr]
        # Reconnecting needs no new registration.
        assert len(service.registrations) == 1
        assert service.connects == 2
    finally:
        await restarted.server.stop(None)


async def test_restarted_agent_keeps_identity_and_adopts_instances(
    scripted: ScriptedServer, state_dir: Path, agents: list[RunningAgent]
) -> None:
    await scripted.service.push(node_service_pb2.DesiredInstances(instances=[assignment("echo-a")]))
    first = start_agent(make_config(scripted.address, state_dir))
    agents.append(first)
    heartbeat = await scripted.service.wait_heartbeat(is_ready("echo-a"))
    pid = instance_of(heartbeat, "echo-a").pid  # type: ignore[union-attr]
    await first.shutdown()
    assert _alive(pid), "an agent that exits must leave its instances running"

    scripted.service.heartbeats.clear()
    # No join token needed any more: the identity is on disk.
    second = start_agent(make_config(scripted.address, state_dir, join_token=None))
    agents.append(second)
    heartbeat = await scripted.service.wait_heartbeat(is_ready("echo-a"))
    status = instance_of(heartbeat, "echo-a")
    assert status is not None and status.pid == pid and status.restart_count == 0
    again = scripted.service.registrations[-1]
    assert (again.node_id, again.node_secret) == ("node-1", "secret-1")
    assert second.agent.identity is not None and second.agent.identity.node_id == "node-1"


async def test_stop_instances_on_exit(scripted: ScriptedServer, state_dir: Path, agents: list[RunningAgent]) -> None:
    await scripted.service.push(node_service_pb2.DesiredInstances(instances=[assignment("echo-a")]))
    running = start_agent(make_config(scripted.address, state_dir, stop_instances_on_exit=True))
    agents.append(running)
    heartbeat = await scripted.service.wait_heartbeat(is_ready("echo-a"))
    pid = instance_of(heartbeat, "echo-a").pid  # type: ignore[union-attr]
    await running.shutdown()
    assert not _alive(pid)
    assert statefile.load_records(state_dir) == ([], [])


async def test_refused_join_token_is_fatal_for_a_new_node(scripted: ScriptedServer, state_dir: Path) -> None:
    agent = Agent(make_config(scripted.address, state_dir, join_token="wrong"), probe=SimulatedGpus((), "n1"))
    with pytest.raises(RegistrationRefusedError, match="join token"):
        await asyncio.wait_for(agent.run(asyncio.Event()), WAIT_S)


async def test_no_identity_and_no_join_token(scripted: ScriptedServer, state_dir: Path) -> None:
    agent = Agent(make_config(scripted.address, state_dir, join_token=None), probe=SimulatedGpus((), "n1"))
    with pytest.raises(AgentStartupError, match="--join-token"):
        await agent.run(asyncio.Event())


async def test_second_agent_on_the_same_state_dir_is_refused(
    scripted: ScriptedServer, state_dir: Path, agents: list[RunningAgent]
) -> None:
    agents.append(start_agent(make_config(scripted.address, state_dir)))
    await scripted.service.wait_heartbeat(lambda hb: True)
    other = Agent(make_config(scripted.address, state_dir), probe=SimulatedGpus((), "n1"))
    with pytest.raises(AgentStartupError, match="another gpufleet agent"):
        await other.run(asyncio.Event())


async def test_rejected_node_secret_leads_to_re_registration(
    scripted: ScriptedServer, state_dir: Path, agents: list[RunningAgent]
) -> None:
    agents.append(start_agent(make_config(scripted.address, state_dir)))
    await scripted.service.wait_heartbeat(lambda hb: True)
    # The control plane forgets the node (e.g. a wiped database) and drops the stream.
    scripted.service.secrets.clear()
    for session in list(scripted.service.sessions):
        await session.outbox.put(None)
    await _wait_until(lambda: len(scripted.service.registrations) >= 2)
    scripted.service.heartbeats.clear()
    await scripted.service.wait_heartbeat(lambda hb: True)
    identity = load_identity(state_dir)
    assert identity is not None and identity.node_id == "node-1"
    assert scripted.service.registrations[1].node_id == "node-1"


async def test_unreachable_control_plane_is_retried(
    state_dir: Path, agents: list[RunningAgent], caplog: pytest.LogCaptureFixture
) -> None:
    # Find a free port, then start the control plane on it only after the agent began trying.
    probe_server = await start_scripted(ScriptedNodeService())
    port = probe_server.port
    await probe_server.server.stop(None)
    caplog.set_level(logging.WARNING, logger="gpufleet.agent.agent")
    agents.append(start_agent(make_config(f"127.0.0.1:{port}", state_dir)))

    def retries() -> list[str]:
        return [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]

    await _wait_until(lambda: len(retries()) >= 2)
    assert not agents[0].task.done()
    # One line per attempt, naming the address and the gRPC code, no traceback.
    assert all(f"127.0.0.1:{port}" in line and "UNAVAILABLE" in line for line in retries())
    assert all(r.exc_info is None for r in caplog.records)
    service = ScriptedNodeService()
    late = await start_scripted(service, port)
    try:
        await service.wait_heartbeat(lambda hb: True)
    finally:
        await late.server.stop(None)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is not alive.
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


async def _wait_until(condition: Callable[[], bool], timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.02)


class ScriptedNvml:
    """A GpuProbe standing in for NVML: one real-looking GPU whose processes the test sets."""

    uuid = "GPU-5d3a0000-0000-0000-0000-000000000000"

    def __init__(self) -> None:
        self.processes: tuple[ProcessReading, ...] = ()

    def read(self) -> GpuProbeResult:
        used = sum(process.memory_used_mib for process in self.processes)
        reading = GpuReading(self.uuid, 0, "NVIDIA H100 80GB HBM3", 81559, used, 10, GpuHealth.OK, "", self.processes)
        return GpuProbeResult((reading,), "550.54.15", None)

    def shutdown(self) -> None:
        pass


async def test_measured_gpu_overrun_is_flagged_and_restarted(
    scripted: ScriptedServer, state_dir: Path, agents: list[RunningAgent]
) -> None:
    nvml = ScriptedNvml()
    await scripted.service.push(
        node_service_pb2.DesiredInstances(
            instances=[
                assignment("big-1", gpu_uuids=(nvml.uuid,), memory_mib=1024, core_percent=50, restart_on_overrun=True)
            ]
        )
    )
    config = make_config(scripted.address, state_dir)
    agent = Agent(config, probe=nvml, supervisor_config=FAST_SUPERVISOR)
    stop = asyncio.Event()
    agents.append(RunningAgent(agent, stop, asyncio.create_task(agent.run(stop))))
    heartbeat = await scripted.service.wait_heartbeat(is_ready("big-1"))
    pid = instance_of(heartbeat, "big-1").pid  # type: ignore[union-attr]

    # A child of the instance grabs more GPU memory than the deployment asked for.
    nvml.processes = (ProcessReading(pid, 1500, 40),)
    flagged = await scripted.service.wait_heartbeat(
        lambda hb: (status := instance_of(hb, "big-1")) is not None and status.gpu_memory_overrun
    )
    status = instance_of(flagged, "big-1")
    assert status is not None and status.gpu_memory_used_mib == 1500 and status.sm_utilization_percent == 40
    assert flagged.gpus[0].health == node_pb2.GPU_HEALTH_OK and flagged.gpus[0].memory_used_mib == 1500

    # The deployment asks for a restart on overrun: a new process, counted as a restart.
    restarted = await scripted.service.wait_heartbeat(
        lambda hb: is_ready("big-1")(hb) and instance_of(hb, "big-1").pid != pid  # type: ignore[union-attr]
    )
    status = instance_of(restarted, "big-1")
    assert status is not None and status.restart_count == 1 and not status.gpu_memory_overrun
    assert not _alive(pid)
