"""The node agent: registers, holds the Connect stream, runs what the control plane assigns.

Lifecycle of `Agent.run(stop)`:

1. Lock the state dir, load the node identity (node.json), adopt the instances a previous
   agent left running (the Supervisor reads their state files), pick the GPU probe.
2. Loop until `stop` is set: open a channel, Register (once per agent process, or again
   when the control plane stops accepting the node's secret), then hold one Connect
   stream: a heartbeat at once, then every heartbeat interval and right after any instance
   changes state; every DesiredInstances received is applied through the Supervisor.
   When the stream fails, wait a jittered, capped backoff and try again. Instances keep
   running all the while: losing the control plane never stops them, and when it returns
   the same instance ids are simply adopted.
3. On stop: end the stream, then leave the instances running for the next agent to adopt
   (default), or stop them gracefully when configured to.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Mapping

import grpc

from gpufleet.agent.config import DEFAULT_HEARTBEAT_INTERVAL_S, AgentConfig
from gpufleet.agent.connection import AUTH_CODES, ConnectStream, ProtocolError, open_channel, register
from gpufleet.agent.gpu.attribution import InstanceUsage, attribute_to_instances
from gpufleet.agent.gpu.detect import detect_probe
from gpufleet.agent.gpu.readings import GpuProbe, GpuProbeResult
from gpufleet.agent.gpu.simulated import SimulatedGpus
from gpufleet.agent.heartbeat import (
    HostCapacity,
    build_heartbeat,
    declared_usage,
    overrun_restarts,
    with_gpu_usage,
)
from gpufleet.agent.host import agent_version, read_host_capacity
from gpufleet.agent.identity import (
    AgentLock,
    IdentityError,
    NodeIdentity,
    StateDirInUseError,
    load_identity,
    save_identity,
)
from gpufleet.agent.reconnect import ReconnectBackoff
from gpufleet.agent.runtime import statefile
from gpufleet.agent.runtime.paths import check_instance_id
from gpufleet.agent.runtime.spec import InstanceSpec, instance_spec_from_assignment
from gpufleet.agent.runtime.status import InstanceStatusSnapshot
from gpufleet.agent.runtime.supervisor import Supervisor, SupervisorConfig
from gpufleet.v1 import instance_pb2, node_service_pb2

log = logging.getLogger(__name__)

# At most one change-driven heartbeat per this many seconds: a burst of changes (several
# instances starting) goes out in one heartbeat.
_CHANGE_COALESCE_S = 0.05


@dataclasses.dataclass(frozen=True)
class HeartbeatReadings:
    """What the latest heartbeat reported (for the metrics endpoint)."""

    gpus: GpuProbeResult
    """The GPU probe's reading."""
    instances: tuple[InstanceStatusSnapshot, ...]
    """Every instance's status, with its measured GPU use."""


class AgentStartupError(Exception):
    """The agent cannot start as configured; the message says what to change."""


class RegistrationRefusedError(Exception):
    """The control plane refused to register this node for a reason retrying cannot fix."""


def _one_line(text: str) -> str:
    return " ".join(text.split())


def describe_rpc_error(err: grpc.aio.AioRpcError) -> str:
    """"UNAVAILABLE: failed to connect ..." on one line."""
    return f"{err.code().name}: {_one_line(err.details() or 'no details')}"


class Agent:
    """One node agent; see the module docstring."""

    def __init__(
        self,
        config: AgentConfig,
        probe: GpuProbe | None = None,
        supervisor_config: SupervisorConfig | None = None,
    ) -> None:
        """probe replaces the detected GPU probe (tests, `gpufleet up`); supervisor_config
        holds the runtime's tunables (a cwd left None becomes config.workdir)."""
        self._config = config
        self._probe_override = probe
        runtime = supervisor_config or SupervisorConfig()
        if runtime.cwd is None:
            runtime = dataclasses.replace(runtime, cwd=config.workdir)
        self._supervisor_config = runtime
        self._identity: NodeIdentity | None = None
        self._must_register = True
        self._heartbeat_interval = config.heartbeat_interval or DEFAULT_HEARTBEAT_INTERVAL_S
        self._specs: dict[str, InstanceSpec] = {}
        self._rejected: dict[str, InstanceStatusSnapshot] = {}
        self._overrun_restarted: dict[str, int] = {}
        self._capacity = HostCapacity(cpu_millis=0, memory_mib=0)
        self._version = agent_version()
        self._supervisor: Supervisor | None = None
        self._probe: GpuProbe | None = None
        self._card_memory: dict[str, int] = {}
        self._declared: set[str] = set()
        self.connected = asyncio.Event()
        """Set while a Connect stream is open and the control plane has answered on it."""
        # Read by the metrics endpoint from its own thread: only replaced, never mutated.
        self.last_readings: HeartbeatReadings | None = None
        """What the latest heartbeat reported; None before the first one."""
        self.heartbeats_sent = 0
        """Heartbeats written to a Connect stream."""
        self.heartbeat_send_failures = 0
        """Heartbeats whose write failed (the stream broke; the agent reconnects)."""
        self.connection_failures = 0
        """Connection attempts (register or Connect) that ended in an error."""

    @property
    def identity(self) -> NodeIdentity | None:
        """The node's identity once known (stored or just registered)."""
        return self._identity

    @property
    def supervisor(self) -> Supervisor:
        """The instance supervisor; only while run() is running."""
        if self._supervisor is None:
            raise RuntimeError("the agent is not running: call run() first")
        return self._supervisor

    async def run(self, stop: asyncio.Event) -> None:
        """Run until `stop` is set; see the module docstring.

        Raises AgentStartupError for local problems (state dir in use, damaged identity, no
        join token, bad --simulate-gpus) and RegistrationRefusedError when the control
        plane rejects the registration itself (bad join token for a new node, bad labels).
        """
        config = self._config
        try:
            lock = AgentLock.acquire(config.state_dir)
        except StateDirInUseError as err:
            raise AgentStartupError(str(err)) from None
        except OSError as err:
            raise AgentStartupError(
                f"cannot use the state dir {config.state_dir}: {err.strerror or err}; pick another --state-dir"
            ) from None
        try:
            try:
                self._identity = load_identity(config.state_dir)
            except IdentityError as err:
                raise AgentStartupError(str(err)) from None
            if self._identity is None and not config.join_token:
                raise AgentStartupError(
                    f"this node has not registered yet ({config.state_dir / 'node.json'} does not "
                    "exist): pass --join-token (printed by the control plane on its first start and "
                    "kept in its state dir as join-token)"
                )
            self._probe = self._probe_override or self._detect_probe()
            try:
                await self._serve(stop)
            finally:
                self._probe.shutdown()
        finally:
            lock.release()

    def _detect_probe(self) -> GpuProbe:
        config = self._config
        try:
            return detect_probe(config.simulate_gpus, config.node_name, config.fallback_simulate_gpus)
        except ValueError as err:
            raise AgentStartupError(str(err)) from None

    async def _serve(self, stop: asyncio.Event) -> None:
        self._capacity = read_host_capacity()
        if isinstance(self._probe, SimulatedGpus):
            self._card_memory = {gpu.uuid: gpu.memory_total_mib for gpu in self._probe.read().gpus}
        supervisor = Supervisor(self._config.state_dir, self._supervisor_config)
        self._supervisor = supervisor
        records, _ = statefile.load_records(self._config.state_dir)
        # Specs of adopted instances, until the control plane sends its own.
        self._specs = {record.spec.instance_id: record.spec for record in records}
        await supervisor.start()
        adopted = supervisor.statuses()
        if adopted:
            log.info("adopted %d instance(s) recorded by a previous agent", len(adopted))
        try:
            await self._connect_loop(stop)
        finally:
            if self._config.stop_instances_on_exit:
                log.info("stopping %d instance(s) before exit", len(supervisor.statuses()))
                await supervisor.stop_all()
            else:
                running = len(supervisor.pids())
                if running:
                    log.info("leaving %d instance(s) running; the next agent on this state dir adopts them", running)
            await supervisor.close()
            self._supervisor = None

    # --- connection --------------------------------------------------------------------

    async def _connect_loop(self, stop: asyncio.Event) -> None:
        backoff = ReconnectBackoff(cap=self._config.reconnect_cap)
        while not stop.is_set():
            attempt = asyncio.create_task(self._attempt(), name="agent connection")
            stopper = asyncio.create_task(stop.wait(), name="agent stop")
            done, _ = await asyncio.wait((attempt, stopper), return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            if attempt not in done:
                # Stop at once, even in the middle of a call to an unresponsive control plane.
                attempt.cancel()
                await asyncio.gather(attempt, return_exceptions=True)
                return
            problem = attempt.result()
            if self.connected.is_set():
                # The control plane had accepted this node: start again from a short delay.
                backoff.reset()
                self.connected.clear()
            if stop.is_set():
                return
            if problem is None:
                problem = "the control plane closed the stream"
            else:
                self.connection_failures += 1
            delay = backoff.next_delay()
            log.warning(
                "control plane %s: %s; instances keep running; retrying in %.1fs",
                self._config.server,
                problem,
                delay,
            )
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await stop.wait()

    async def _attempt(self) -> str | None:
        """One connection: register if needed, then hold the stream.

        Returns None when the stream ended cleanly, else what went wrong.
        """
        channel = open_channel(self._config.server, self._config.tls)
        try:
            if self._must_register:
                await self._register(channel)
            identity = self._identity
            if identity is None:
                return "the node is not registered"
            stream = ConnectStream(channel, identity)
            try:
                await self._hold(stream)
            finally:
                stream.cancel()
            return None
        except grpc.aio.AioRpcError as err:
            if err.code() in AUTH_CODES:
                self._must_register = True
            return describe_rpc_error(err)
        except ProtocolError as err:
            return str(err)
        finally:
            await channel.close(None)

    async def _register(self, channel: grpc.aio.Channel) -> None:
        config = self._config
        previous = self._identity
        try:
            registration = await register(
                channel,
                server=config.server,
                join_token=config.join_token or "",
                node_name=config.node_name,
                labels=config.labels,
                previous=previous,
            )
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise RegistrationRefusedError(
                    f"the control plane at {config.server} refused to register node "
                    f"{config.node_name!r}: {describe_rpc_error(err)}; fix --name or --labels"
                ) from None
            if err.code() in AUTH_CODES:
                if previous is None:
                    raise RegistrationRefusedError(
                        f"the control plane at {config.server} refused the join token "
                        f"({describe_rpc_error(err)}): pass the token it printed on first start "
                        "(also in its state dir, file join-token)"
                    ) from None
                # Known node: its secret may still open Connect even if re-registering fails.
                log.warning(
                    "control plane %s refused to re-register node %s (%s); connecting with the stored secret",
                    config.server,
                    previous.node_id,
                    describe_rpc_error(err),
                )
                self._must_register = False
                return
            raise
        identity = registration.identity
        if identity != previous:
            try:
                save_identity(config.state_dir, identity)
            except OSError as err:
                # Running beats remembering: the next agent re-registers as a new node.
                log.error("cannot save the node identity in %s: %s", config.state_dir, err)
        if previous is not None and previous.node_id != identity.node_id:
            log.warning(
                "the control plane gave this node a new id %s (was %s); instances of the old id will stop",
                identity.node_id,
                previous.node_id,
            )
        self._identity = identity
        self._must_register = False
        if config.heartbeat_interval is None and registration.heartbeat_interval is not None:
            self._heartbeat_interval = registration.heartbeat_interval
        log.info(
            "registered with the control plane %s as node %s (%s); heartbeat every %gs",
            config.server,
            identity.node_id,
            identity.node_name,
            self._heartbeat_interval,
        )

    async def _hold(self, stream: ConnectStream) -> None:
        """Run the stream until it ends or fails."""
        reader = asyncio.create_task(self._read_loop(stream), name="agent connect reader")
        writer = asyncio.create_task(self._write_loop(stream), name="agent heartbeats")
        tasks = (reader, writer)
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stream.cancel()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in (reader, writer):
            if task in done and not task.cancelled():
                error = task.exception()
                if error is not None:
                    raise error

    async def _read_loop(self, stream: ConnectStream) -> None:
        while True:
            desired = await stream.receive()
            if desired is None:
                return
            if not self.connected.is_set():
                identity = self._identity
                log.info(
                    "connected to the control plane %s as node %s",
                    self._config.server,
                    identity.node_id if identity is not None else "?",
                )
                self.connected.set()
            await self.apply_desired(desired)

    async def _write_loop(self, stream: ConnectStream) -> None:
        changed = self.supervisor.changed
        while True:
            changed.clear()
            heartbeat = await self.heartbeat()
            try:
                await stream.send(heartbeat)
            except Exception:
                self.heartbeat_send_failures += 1
                raise
            self.heartbeats_sent += 1
            sent_at = time.monotonic()
            try:
                async with asyncio.timeout(self._heartbeat_interval):
                    await changed.wait()
            except TimeoutError:
                continue
            # The first change after a quiet spell goes out at once (a call may be waiting
            # for this instance to turn READY); a burst right behind it waits out the rest
            # of the coalescing window and goes out as one heartbeat.
            await asyncio.sleep(max(0.0, sent_at + _CHANGE_COALESCE_S - time.monotonic()))

    # --- desired instances --------------------------------------------------------------

    async def apply_desired(self, desired: node_service_pb2.DesiredInstances) -> None:
        """Converge the node on `desired`; assignments it cannot run are reported FAILED."""
        specs: dict[str, InstanceSpec] = {}
        rejected: dict[str, InstanceStatusSnapshot] = {}
        for assignment in desired.instances:
            instance_id = assignment.instance_id
            if instance_id in specs or instance_id in rejected:
                log.warning("instance %s is assigned twice; running it once", instance_id)
                continue
            try:
                check_instance_id(instance_id)
                specs[instance_id] = instance_spec_from_assignment(assignment)
            except ValueError as err:
                log.error("cannot run assigned instance %s: %s", instance_id, err)
                rejected[instance_id] = InstanceStatusSnapshot(
                    instance_id=instance_id,
                    deployment=assignment.deployment,
                    generation=assignment.generation,
                    state=instance_pb2.INSTANCE_STATE_FAILED,
                    reason=str(err),
                    pid=0,
                    port=0,
                    restart_count=0,
                    crash_loop=False,
                )
        supervisor = self.supervisor
        await supervisor.apply(list(specs.values()))
        self._rejected = rejected
        managed = {status.instance_id for status in supervisor.statuses()}
        # Instances that are still stopping keep their spec until they are gone.
        self._specs = {
            key: spec for key, spec in self._specs.items() if key in managed and key not in specs
        } | specs
        supervisor.changed.set()

    # --- heartbeats ---------------------------------------------------------------------

    async def heartbeat(self) -> node_service_pb2.Heartbeat:
        """A heartbeat with fresh GPU readings and every instance's status."""
        supervisor = self.supervisor
        pids = supervisor.pids()
        probe = self._probe
        if probe is None:
            raise RuntimeError("the agent is not running: call run() first")
        if isinstance(probe, SimulatedGpus):
            self._declare_simulated_usage(probe, pids)
            result = probe.read()
            usage = attribute_to_instances(result, pids)
        else:
            # NVML calls and /proc walks block; keep them off the event loop.
            result, usage = await asyncio.to_thread(_measure, probe, pids)
        statuses = with_gpu_usage(supervisor.statuses(), usage, self._specs)
        self._restart_overruns(statuses)
        managed = {status.instance_id for status in statuses}
        statuses += [status for key, status in self._rejected.items() if key not in managed]
        self.last_readings = HeartbeatReadings(result, tuple(statuses))
        return build_heartbeat(
            result, statuses, self._capacity, self._version, self._config.advertise_host
        )

    def _declare_simulated_usage(self, probe: SimulatedGpus, pids: Mapping[str, int]) -> None:
        """Simulated cards show as used what their running instances requested."""
        for instance_id in self._declared:
            probe.clear(instance_id)
        self._declared.clear()
        for instance_id, pid in pids.items():
            spec = self._specs.get(instance_id)
            if spec is None:
                continue
            for usage in declared_usage(spec, self._card_memory):
                probe.set_declared_usage(usage.gpu_uuid, instance_id, usage.memory_mib, usage.core_percent, pid)
                self._declared.add(instance_id)

    def _restart_overruns(self, statuses: list[InstanceStatusSnapshot]) -> None:
        supervisor = self.supervisor
        for instance_id, reason in overrun_restarts(statuses, self._specs, self._overrun_restarted):
            pid = next(status.pid for status in statuses if status.instance_id == instance_id)
            log.warning("instance %s: %s; restarting it", instance_id, reason)
            try:
                supervisor.restart(instance_id, reason)
            except KeyError:
                continue
            self._overrun_restarted[instance_id] = pid
        live = {status.instance_id for status in statuses}
        for instance_id in list(self._overrun_restarted):
            if instance_id not in live:
                del self._overrun_restarted[instance_id]


def _measure(probe: GpuProbe, pids: Mapping[str, int]) -> tuple[GpuProbeResult, dict[str, InstanceUsage]]:
    result = probe.read()
    return result, attribute_to_instances(result, pids)
