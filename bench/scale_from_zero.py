"""Benchmark 5: scale from zero, i.e. what the platform adds to a cold call.

`gpufleet up` (control plane, embedded gateway, one agent with a simulated GPU) runs as a
subprocess. One deployment of the example model server has min_instances 0 and a short
idle_retention, so after each call it goes back to zero instances (Standby). Each
"gpufleet" round waits for Standby, then makes one ModelInfer call through the gateway
(generated stubs over grpc.aio, on a channel opened once): the call starts an instance and
waits for it. The instance measures its own start-to-ready time (the example server writes
{"ready_seconds": X} to $GPUFLEET_READY_FILE, a file per instance here), and

    platform overhead = call latency - the instance's ready_seconds.

Baseline ("bare process"): the same model server started directly as a process (`python -m
examples.model_server --port 0`) and called as soon as it prints its port and reports
SERVING on a gRPC health watch, on a new channel: what a cold start costs with no platform.
Its overhead is computed the same way. Both sides always start with the deployment at zero,
and which side goes first flips every round.

The readiness probe is left at gpufleet's default (gRPC health every 1 s) unless
--probe-period sets it: how often the agent probes is the user's setting, and the largest
part of the overhead (see bench/RESULTS.md).

Where the platform's time goes comes from what the processes already record, with no
product changes: the instance's WatchEvents records (create_time when the reconciler placed
it, ready_time when the control plane recorded READY, and when this process saw STARTING);
the ready file (its mtime is when the instance became ready, so mtime - ready_seconds is
when its process started); the agent's state file of the instance (rewritten with
"ready": true when its readiness probe passed, so its mtime tells when); and a WatchRoutes
stream of our own (when the route to the instance was published, as the gateway gets it).
Times are wall-clock times of the one machine; a process start time comes from /proc in
10 ms ticks, so the segments next to it are good to about 10 ms.

    python -m bench scale_from_zero [--rounds 10] [--warmup 1] [--idle-retention 1]
        [--probe-period SECONDS] [--payload-bytes 16] [--dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from google.protobuf import duration_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gpufleet.agent.config import AGENT_SUBDIR
from gpufleet.agent.runtime import procfs, statefile
from gpufleet.agent.runtime.paths import state_file
from gpufleet.inference import grpc_service_pb2 as pb, grpc_service_pb2_grpc
from gpufleet.server.spec_defaults import DEFAULT_PROBE_PERIOD_S
from gpufleet.v1 import (
    deployment_pb2,
    deployment_service_pb2,
    deployment_service_pb2_grpc,
    instance_pb2,
    routing_service_pb2,
    routing_service_pb2_grpc,
)

from bench.gateway_targets import GATEWAY_LISTENING, MODEL_SERVER_LISTENING
from bench.oip_load import check_echo, infer_request
from bench.processes import REPO_ROOT, ServerProcess
from bench.report import goal_line, median, percentile, print_table, ratio, ratio_line

if TYPE_CHECKING:
    from gpufleet.inference.grpc_service_pb2_grpc import (
        GRPCInferenceServiceAsyncStub as InferenceStub,
    )

DEPLOYMENT = "coldstart"
"""Deployment name, and the model name (the example server answers any name as echo)."""
PLATFORM = "gpufleet"
BARE = "bare process"
GOAL_SECONDS = 0.3
"""Issue 5: platform overhead of a cold call <= 300 ms median."""
UP_LISTENING = "gpufleet control plane listening on "
COLD_CALL_TIMEOUT_SECONDS = 60.0
ZERO_TIMEOUT_SECONDS = 60.0
"""Longest wait for the deployment to be back at zero instances."""
TERMINATION_GRACE_SECONDS = 5
LOG_TAIL_CHARS = 4000
ROUTE_TARGET = "deploy-route-target"
READY = instance_pb2.INSTANCE_STATE_READY
STARTING = instance_pb2.INSTANCE_STATE_STARTING
STANDBY = deployment_pb2.DEPLOYMENT_PHASE_STANDBY

# Milestones, in the order they happen; each is seconds after the call started.
PLACED = "placed"
STARTING_SEEN = "STARTING seen"
PROCESS_START = "process start"
INSTANCE_READY = "instance ready"
PROBE_PASSED = "probe passed"
READY_RECORDED = "READY recorded"
ROUTE_SEEN = "route seen"
SERVING_SEEN = "SERVING seen"
RESPONSE = "response"
CALL = "call"

PLATFORM_MILESTONES = (
    PLACED,
    STARTING_SEEN,
    PROCESS_START,
    INSTANCE_READY,
    PROBE_PASSED,
    READY_RECORDED,
    ROUTE_SEEN,
    RESPONSE,
)


@dataclass(frozen=True)
class Segment:
    """One stretch of a cold call between two milestones."""

    start: str
    end: str
    what: str
    """What the time is spent on, and the setting that governs it."""

    @property
    def name(self) -> str:
        return f"{self.start} -> {self.end}"


# Each chain runs from the call to the response without gaps, so its segments add up to the
# latency; the one from process start to instance ready is the instance's own time.
PLATFORM_SEGMENTS = (
    Segment(
        CALL,
        PLACED,
        "the gateway queues the call and reports a wake-up at once (ReportLoad), which "
        "wakes the reconciler (10 ms coalescing); its pass places the instance and commits",
    ),
    Segment(
        PLACED,
        PROCESS_START,
        "the agent's Connect stream gets the desired instance; the agent spawns /bin/sh -c "
        "and the interpreter",
    ),
    Segment(PROCESS_START, INSTANCE_READY, "the instance's own start-to-ready (excluded)"),
    Segment(
        INSTANCE_READY,
        PROBE_PASSED,
        "the agent's next readiness probe (every readiness_probe.period) passes",
    ),
    Segment(
        PROBE_PASSED,
        READY_RECORDED,
        "the agent persists its state file, waits 50 ms to coalesce changes "
        "(_CHANGE_COALESCE_S), heartbeats; the control plane queues the READY write",
    ),
    Segment(READY_RECORDED, ROUTE_SEEN, "WatchRoutes pushes the new endpoint"),
    Segment(
        ROUTE_SEEN,
        RESPONSE,
        "the gateway hands the queued call to the instance over a new HTTP/2 connection; the echo",
    ),
)
BARE_SEGMENTS = (
    Segment(CALL, PROCESS_START, "fork and exec of the interpreter"),
    Segment(PROCESS_START, INSTANCE_READY, "the instance's own start-to-ready (excluded)"),
    Segment(INSTANCE_READY, SERVING_SEEN, "the port line is read; a health watch sees SERVING"),
    Segment(SERVING_SEEN, RESPONSE, "the call on the new channel; the echo"),
)
OWN_SEGMENT = f"{PROCESS_START} -> {INSTANCE_READY}"


@dataclass(frozen=True)
class Options:
    rounds: int = 10
    """Measured rounds; each has one cold call per side."""
    warmup: int = 1
    """Unmeasured rounds first (the first instance start pays for cold file caches)."""
    idle_retention: float = 1.0
    """The deployment's idle_retention, seconds: how soon it goes back to zero."""
    probe_period: float | None = None
    """The deployment's readiness_probe.period, seconds (0.1-3600); None leaves the probe
    unset, i.e. gpufleet's default: gRPC health every 1 s."""
    payload_bytes: int = 16
    """Size of the echoed FP32 tensor."""
    directory: Path | None = None
    """Where the state dir, ready files and logs go (default: a temporary directory)."""


@dataclass(frozen=True)
class ColdCall:
    """One cold call on one side."""

    side: str
    index: int
    """Round number; 0 and below are warm-up rounds."""
    latency: float
    """Seconds from sending the call to its response."""
    ready_seconds: float
    """The instance's own start-to-ready, as it measured it."""
    milestones: Mapping[str, float]
    """Seconds after the call started at which each milestone happened."""
    instance: str
    """Instance id (gpufleet) or pid (bare process)."""

    @property
    def overhead(self) -> float:
        """What the call took beyond the instance's own start-to-ready."""
        return self.latency - self.ready_seconds

    def segment(self, segment: Segment) -> float | None:
        """Seconds spent in `segment`, or None when one of its milestones is missing."""
        start = 0.0 if segment.start == CALL else self.milestones.get(segment.start)
        end = self.milestones.get(segment.end)
        return None if start is None or end is None else end - start


@dataclass(frozen=True)
class Seen:
    """An instance event of the deployment, with when this process received it."""

    at: float
    """time.time() on receipt."""
    instance: instance_pb2.Instance


@dataclass
class ClusterView:
    """The deployment as this process sees it through WatchEvents and WatchRoutes."""

    deployment: str
    instances: dict[str, instance_pb2.Instance] = field(default_factory=dict)
    """Instances of the deployment that exist now (not DELETED)."""
    phase: deployment_pb2.DeploymentPhase.ValueType = deployment_pb2.DEPLOYMENT_PHASE_UNSPECIFIED
    endpoints: frozenset[str] = frozenset()
    """Instance ids with a non-draining endpoint in the latest route."""
    events: list[Seen] = field(default_factory=list)
    route_seen: dict[str, float] = field(default_factory=dict)
    """Instance id -> time.time() when its endpoint first appeared in a route."""
    error: BaseException | None = None
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    def at_zero(self) -> bool:
        """Standby: no instance, no endpoint, phase STANDBY."""
        return not self.instances and not self.endpoints and self.phase == STANDBY

    async def wait_until(self, what: str, predicate: Callable[[], bool], timeout: float) -> None:
        """Until `predicate()` holds; RuntimeError after `timeout` or if a watch fails."""

        def done() -> bool:
            return self.error is not None or predicate()

        try:
            async with asyncio.timeout(timeout), self.changed:
                await self.changed.wait_for(done)
        except TimeoutError:
            raise RuntimeError(
                f"timed out after {timeout:g} s waiting for {what}; deployment phase "
                f"{deployment_pb2.DeploymentPhase.Name(self.phase)}, instances "
                f"{sorted(self.instances)}, routed {sorted(self.endpoints)}"
            ) from None
        if self.error is not None:
            raise RuntimeError(f"a watch of the control plane failed: {self.error!r}")

    async def _notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    async def follow_events(
        self,
        stub: deployment_service_pb2_grpc.DeploymentServiceAsyncStub,
        metadata: Sequence[tuple[str, str]],
    ) -> None:
        """Apply WatchEvents (snapshot, then live) until cancelled."""
        try:
            stream = stub.WatchEvents(
                deployment_service_pb2.WatchEventsRequest(since_revision=0), metadata=metadata
            )
            async for event in stream:
                at = time.time()
                if event.HasField("instance") and event.instance.deployment == self.deployment:
                    self.events.append(Seen(at, event.instance))
                    if event.type == deployment_service_pb2.EVENT_TYPE_DELETED:
                        self.instances.pop(event.instance.id, None)
                    else:
                        self.instances[event.instance.id] = event.instance
                elif event.HasField("deployment") and event.deployment.name == self.deployment:
                    self.phase = event.deployment.status.phase
                await self._notify()
        except asyncio.CancelledError:
            raise
        except Exception as err:  # noqa: BLE001 - handed to the waiters, which raise it
            self.error = err
            await self._notify()

    async def follow_routes(
        self,
        stub: routing_service_pb2_grpc.RoutingServiceAsyncStub,
        metadata: Sequence[tuple[str, str]],
    ) -> None:
        """Apply WatchRoutes (snapshot, then changes) until cancelled."""
        try:
            request = routing_service_pb2.WatchRoutesRequest(gateway_id="bench-route-watch")
            async for update in stub.WatchRoutes(request, metadata=metadata):
                at = time.time()
                if self.deployment in update.removed_deployments:
                    self.endpoints = frozenset()
                for route in update.routes:
                    if route.deployment != self.deployment:
                        continue
                    self.endpoints = frozenset(
                        e.instance_id for e in route.endpoints if not e.draining
                    )
                    for instance_id in self.endpoints:
                        self.route_seen.setdefault(instance_id, at)
                await self._notify()
        except asyncio.CancelledError:
            raise
        except Exception as err:  # noqa: BLE001 - handed to the waiters, which raise it
            self.error = err
            await self._notify()


@dataclass
class Platform:
    """A running `gpufleet up` with the deployment created and watched."""

    up: ServerProcess
    state_dir: Path
    ready_dir: Path
    view: ClusterView
    stub: InferenceStub
    invoke_metadata: tuple[tuple[str, str], ...]


def bench_env(state_dir: Path) -> dict[str, str]:
    """This environment with the venv first on PATH (instances run `python`) and no stray
    GPUFLEET_* settings."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("GPUFLEET_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["GPUFLEET_STATE_DIR"] = str(state_dir)
    return env


def _seconds(value: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(round(value * 1e9))
    return duration


def deployment(options: Options, ready_dir: Path) -> deployment_pb2.Deployment:
    """The benchmark's deployment: scale to zero, one instance at most, ready file per
    instance (the shell expands $GPUFLEET_INSTANCE_ID, which the agent sets)."""
    ready_file = f'{shlex.quote(str(ready_dir))}/"$GPUFLEET_INSTANCE_ID".json'
    spec = deployment_pb2.DeploymentSpec(
        command=f"GPUFLEET_READY_FILE={ready_file} python -m examples.model_server --port $PORT",
        port=0,
        gpu=deployment_pb2.GpuRequest(memory_mib=1024, core_percent=10),
        scaling=deployment_pb2.ScalingSpec(
            min_instances=0, max_instances=1, idle_retention=_seconds(options.idle_retention)
        ),
        termination_grace_period=_seconds(TERMINATION_GRACE_SECONDS),
    )
    if options.probe_period is not None:
        spec.readiness_probe.grpc.SetInParent()
        spec.readiness_probe.period.CopyFrom(_seconds(options.probe_period))
    return deployment_pb2.Deployment(name=DEPLOYMENT, spec=spec)


@contextlib.asynccontextmanager
async def running_platform(options: Options, work_dir: Path) -> AsyncIterator[Platform]:
    """`gpufleet up` on ports 0 with a simulated GPU, the deployment created, and the
    watches following it; everything stopped on exit."""
    state_dir = work_dir / "state"
    ready_dir = work_dir / "ready"
    ready_dir.mkdir()
    up = ServerProcess(
        "gpufleet-up",
        [
            "gpufleet.client.cli",
            "up",
            "--state-dir",
            str(state_dir),
            "--listen",
            "127.0.0.1:0",
            "--gateway-listen",
            "127.0.0.1:0",
            "--simulate-gpus",
            "1x81559",
            "--name",
            "bench",
            "--workdir",
            str(REPO_ROOT),
        ],
        UP_LISTENING,
        work_dir,
        env=bench_env(state_dir),
    )
    await asyncio.to_thread(up.start)
    tasks: list[asyncio.Task[None]] = []
    try:
        gateway_line = await asyncio.to_thread(up.read_line, 30.0)
        if not gateway_line.startswith(GATEWAY_LISTENING):
            raise RuntimeError(
                f"gpufleet up printed {gateway_line!r} where the gateway's listening line "
                f"was expected; its stderr:\n{up.stderr()}"
            )
        gateway_address = gateway_line[len(GATEWAY_LISTENING) :].strip()
        admin = (("authorization", f"Bearer {(state_dir / 'admin-token').read_text().strip()}"),)
        async with (
            grpc.aio.insecure_channel(up.address) as control,
            grpc.aio.insecure_channel(gateway_address) as data,
        ):
            deployments = deployment_service_pb2_grpc.DeploymentServiceStub(control)
            created = await deployments.CreateDeployment(
                deployment_service_pb2.CreateDeploymentRequest(
                    deployment=deployment(options, ready_dir)
                ),
                metadata=admin,
                timeout=30.0,
            )
            view = ClusterView(DEPLOYMENT)
            tasks.append(asyncio.create_task(view.follow_events(deployments, admin)))
            routes = routing_service_pb2_grpc.RoutingServiceStub(control)
            tasks.append(asyncio.create_task(view.follow_routes(routes, admin)))
            stub: InferenceStub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(data)
            # The client's connection to the gateway is not part of a cold start: open it now.
            await stub.ServerLive(pb.ServerLiveRequest(), timeout=30.0)
            yield Platform(
                up,
                state_dir,
                ready_dir,
                view,
                stub,
                (("authorization", f"Bearer {created.invoke_token}"),),
            )
    except Exception:
        # The temporary directory with its log goes away: show why the platform failed.
        print(f"--- gpufleet up stderr (last {LOG_TAIL_CHARS} characters) ---", file=sys.stderr)
        print(up.stderr()[-LOG_TAIL_CHARS:], file=sys.stderr, flush=True)
        raise
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.to_thread(up.stop)
        _kill_leftover_instances(state_dir / AGENT_SUBDIR)


def _kill_leftover_instances(agent_state_dir: Path) -> None:
    """SIGKILL instances the agent left running (it stops them itself on a clean exit)."""
    if not agent_state_dir.is_dir():
        return
    records, _ = statefile.load_records(agent_state_dir)
    for record in records:
        if record.pid > 0 and procfs.is_running(record.pid, record.start_ticks):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(record.pid, signal.SIGKILL)


def _probe_passed(agent_state_dir: Path, instance_id: str) -> float | None:
    """When the agent saw the instance pass readiness: the agent rewrites the instance's
    state file then (ready: true), so its mtime tells; None if it says otherwise."""
    path = state_file(agent_state_dir, instance_id)
    try:
        record = statefile.read_record(path)
        written = path.stat().st_mtime_ns / 1e9
    except (OSError, ValueError):
        return None
    return written if record.ready else None


def read_ready_file(path: Path) -> tuple[float, float]:
    """(ready_seconds, when it was written as a time.time() value) of a ready file."""
    try:
        ready_seconds = float(json.loads(path.read_text(encoding="utf-8"))["ready_seconds"])
        written = path.stat().st_mtime_ns / 1e9
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise RuntimeError(
            f"cannot read the instance's ready file {path} ({err!r}); the example model server "
            "writes it once SERVING when GPUFLEET_READY_FILE names it"
        ) from None
    return ready_seconds, written


async def platform_call(platform: Platform, request: pb.ModelInferRequest, index: int) -> ColdCall:
    """One cold call through the gateway, starting from zero instances."""
    view = platform.view
    await view.wait_until("the deployment to be back at zero", view.at_zero, ZERO_TIMEOUT_SECONDS)
    first_event = len(view.events)
    started_wall = time.time()
    started = time.perf_counter()
    call = platform.stub.ModelInfer(
        request, metadata=platform.invoke_metadata, timeout=COLD_CALL_TIMEOUT_SECONDS
    )
    response = await call
    latency = time.perf_counter() - started
    check_echo(request, response)
    instance_id = str(dict(await call.initial_metadata() or ()).get(ROUTE_TARGET, ""))
    if not instance_id:
        raise RuntimeError(f"the gateway's response has no {ROUTE_TARGET} metadata")
    ready_seconds, ready_wall = read_ready_file(platform.ready_dir / f"{instance_id}.json")
    moments: dict[str, float] = {
        PROCESS_START: ready_wall - ready_seconds,
        INSTANCE_READY: ready_wall,
        RESPONSE: started_wall + latency,
    }
    probe_passed = _probe_passed(platform.state_dir / AGENT_SUBDIR, instance_id)
    if probe_passed is not None:
        moments[PROBE_PASSED] = probe_passed
    for seen in view.events[first_event:]:
        instance = seen.instance
        if instance.id != instance_id:
            continue
        if PLACED not in moments and instance.HasField("create_time"):
            moments[PLACED] = instance.create_time.ToNanoseconds() / 1e9
        if instance.state == STARTING:
            moments.setdefault(STARTING_SEEN, seen.at)
        if instance.state == READY and instance.HasField("ready_time"):
            moments.setdefault(READY_RECORDED, instance.ready_time.ToNanoseconds() / 1e9)
    if instance_id in view.route_seen:
        moments[ROUTE_SEEN] = view.route_seen[instance_id]
    return ColdCall(
        PLATFORM,
        index,
        latency,
        ready_seconds,
        {name: at - started_wall for name, at in moments.items()},
        instance_id,
    )


async def bare_call(
    work_dir: Path, request: pb.ModelInferRequest, index: int, sequence: int
) -> ColdCall:
    """One cold call on a model server started directly: spawn, port line, SERVING, call."""
    ready_file = work_dir / "ready" / f"bare-{sequence}.json"
    env = dict(os.environ)
    env["GPUFLEET_READY_FILE"] = str(ready_file)
    server = ServerProcess(
        f"bare-{sequence}",
        ["examples.model_server", "--port", "0"],
        MODEL_SERVER_LISTENING,
        work_dir,
        env=env,
    )
    started_wall = time.time()
    started = time.perf_counter()
    try:
        # ServerProcess reads its stdout with blocking calls: off the event loop.
        address = await asyncio.to_thread(server.start)
        async with grpc.aio.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            async with asyncio.timeout(COLD_CALL_TIMEOUT_SECONDS):
                async for reply in health.Watch(health_pb2.HealthCheckRequest(service="")):
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        break
            serving = time.time()
            stub: InferenceStub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
            response = await stub.ModelInfer(request, timeout=COLD_CALL_TIMEOUT_SECONDS)
            latency = time.perf_counter() - started
        check_echo(request, response)
        pid = server.pid
    finally:
        await asyncio.to_thread(server.stop)
    ready_seconds, ready_wall = read_ready_file(ready_file)
    moments = {
        PROCESS_START: ready_wall - ready_seconds,
        INSTANCE_READY: ready_wall,
        SERVING_SEEN: serving,
        RESPONSE: started_wall + latency,
    }
    return ColdCall(
        BARE,
        index,
        latency,
        ready_seconds,
        {name: at - started_wall for name, at in moments.items()},
        str(pid),
    )


async def run(options: Options) -> list[ColdCall]:
    """Warm-up rounds, then the measured ones; returns every cold call (warm-up included,
    with index <= 0)."""
    request = infer_request(DEPLOYMENT, options.payload_bytes)
    with tempfile.TemporaryDirectory(prefix="gpufleet-bench-s0-", dir=options.directory) as tmp:
        work_dir = Path(tmp)
        async with running_platform(options, work_dir) as platform:
            calls: list[ColdCall] = []
            for index in range(1 - options.warmup, options.rounds + 1):
                order = (PLATFORM, BARE) if index % 2 else (BARE, PLATFORM)
                for side in order:
                    if side == PLATFORM:
                        calls.append(await platform_call(platform, request, index))
                    else:
                        # The bare side also starts with the deployment at zero, so both run
                        # on the same quiet background.
                        await platform.view.wait_until(
                            "the deployment to be back at zero",
                            platform.view.at_zero,
                            ZERO_TIMEOUT_SECONDS,
                        )
                        calls.append(await bare_call(work_dir, request, index, len(calls)))
                print(_progress(calls[-2:]), flush=True)
    return calls


def _progress(calls: Sequence[ColdCall]) -> str:
    parts = [f"{c.side} {c.latency * 1e3:.0f} ms (overhead {c.overhead * 1e3:.0f})" for c in calls]
    index = calls[0].index
    label = f"round {index}" if index > 0 else "warm-up"
    return f"  {label}: " + ", ".join(parts)


def _probe_period_text(options: Options) -> str:
    if options.probe_period is None:
        return f"{DEFAULT_PROBE_PERIOD_S:g} s (gpufleet's default)"
    return f"{options.probe_period:g} s"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1e3:.0f}"


def print_report(calls: Sequence[ColdCall], options: Options) -> None:
    measured = [c for c in calls if c.index > 0]
    platform = [c for c in measured if c.side == PLATFORM]
    bare = [c for c in measured if c.side == BARE]
    print(
        f"\nscale from zero: one ModelInfer ({options.payload_bytes} B echo) starting from zero "
        f"instances; gpufleet = `gpufleet up` (simulated GPU), deployment min_instances 0, "
        f"idle_retention {options.idle_retention:g} s, readiness gRPC health every "
        f"{_probe_period_text(options)}; bare process = `python -m examples.model_server --port "
        f"0` called once its port line and health SERVING appear; {options.rounds} rounds "
        f"(+{options.warmup} warm-up), order flips every round"
    )
    print_table(
        ["round", "side", "latency ms", "instance ready ms", "overhead ms"],
        [
            [str(c.index), c.side, _ms(c.latency), _ms(c.ready_seconds), _ms(c.overhead)]
            for c in measured
        ],
    )
    print("\ngpufleet milestones, ms after the call was sent:")
    print_table(
        ["round", "instance", *PLATFORM_MILESTONES],
        [
            [str(c.index), c.instance, *(_ms(c.milestones.get(m)) for m in PLATFORM_MILESTONES)]
            for c in platform
        ],
    )
    sides = ((PLATFORM, platform, PLATFORM_SEGMENTS), (BARE, bare, BARE_SEGMENTS))
    for side, group, segments in sides:
        print(f"\n{side}: where a cold call's time goes (over rounds, ms):")
        print_table(["segment", "median ms", "p90 ms", "what"], _segment_rows(group, segments))
    print()
    print_table(
        [
            "side (over rounds)",
            "latency p50 ms",
            "instance ready p50 ms",
            "overhead p50 ms",
            "overhead p90 ms",
        ],
        [
            [
                side,
                _ms(median([c.latency for c in group])),
                _ms(median([c.ready_seconds for c in group])),
                _ms(median([c.overhead for c in group])),
                _ms(percentile([c.overhead for c in group], 0.9)),
            ]
            for side, group in ((PLATFORM, platform), (BARE, bare))
        ],
    )
    pairs = [(p, b) for p in platform for b in bare if p.index == b.index]
    overhead = median([c.overhead for c in platform])
    largest = max(
        (s for s in PLATFORM_SEGMENTS if s.name != OWN_SEGMENT),
        key=lambda s: median([v for c in platform if (v := c.segment(s)) is not None] or [0.0]),
    )
    print(f"largest platform segment: {largest.name} ({largest.what})")
    # No ratio of overheads: the bare side's is within the 10 ms resolution of the process
    # start time (/proc), so it would divide by noise.
    print(
        ratio_line(
            "gpufleet/bare process cold-call latency (median of per-round ratios)",
            median([ratio(p.latency, b.latency) for p, b in pairs]),
        )
    )
    print(
        goal_line(
            f"platform overhead of a cold call <= {GOAL_SECONDS * 1e3:.0f} ms median",
            overhead <= GOAL_SECONDS,
            f"median {overhead * 1e3:.0f} ms, p90 "
            f"{percentile([c.overhead for c in platform], 0.9) * 1e3:.0f} ms",
        )
    )


def _segment_rows(group: Sequence[ColdCall], segments: Sequence[Segment]) -> list[list[str]]:
    rows = []
    for segment in segments:
        values = [v for c in group if (v := c.segment(segment)) is not None]
        if not values:
            rows.append([segment.name, "-", "-", segment.what])
            continue
        rows.append(
            [segment.name, _ms(median(values)), _ms(percentile(values, 0.9)), segment.what]
        )
    overheads = [c.overhead for c in group]
    rows.append(
        [
            "overhead (all but the instance's own)",
            _ms(median(overheads)),
            _ms(percentile(overheads, 0.9)),
            "latency - ready_seconds",
        ]
    )
    return rows


def parse_args(argv: Sequence[str] | None) -> Options:
    defaults = Options()
    parser = argparse.ArgumentParser(
        prog="python -m bench scale_from_zero",
        description="Cold-call latency through `gpufleet up` minus the instance's own "
        "start-to-ready time, next to a model server started directly.",
    )
    parser.add_argument("--rounds", type=int, default=defaults.rounds)
    parser.add_argument("--warmup", type=int, default=defaults.warmup)
    parser.add_argument(
        "--idle-retention",
        type=float,
        default=defaults.idle_retention,
        help="the deployment's idle_retention in seconds (default: %(default)s)",
    )
    parser.add_argument(
        "--probe-period",
        type=float,
        default=defaults.probe_period,
        help="the deployment's readiness_probe (gRPC health) period in seconds, 0.1-3600 "
        "(default: unset, i.e. gpufleet's default of 1 s)",
    )
    parser.add_argument("--payload-bytes", type=int, default=defaults.payload_bytes)
    parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="directory for state, ready files and logs (default: temp)",
    )
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.warmup < 0:
        parser.error("--rounds must be at least 1 and --warmup at least 0")
    if args.idle_retention < 0 or (
        args.probe_period is not None and not 0.1 <= args.probe_period <= 3600
    ):
        parser.error("--idle-retention must be >= 0 and --probe-period 0.1-3600 seconds")
    if args.payload_bytes < 4 or args.payload_bytes % 4:
        parser.error("--payload-bytes must be a positive multiple of 4 (an FP32 tensor)")
    return Options(
        rounds=args.rounds,
        warmup=args.warmup,
        idle_retention=args.idle_retention,
        probe_period=args.probe_period,
        payload_bytes=args.payload_bytes,
        directory=args.dir,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Benchmark 5: scale from zero."""
    options = parse_args(argv)
    calls = asyncio.run(run(options))
    print_report(calls, options)
    return 0
