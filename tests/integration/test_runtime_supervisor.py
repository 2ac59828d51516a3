"""The instance supervisor with real processes: start, probes, crashes, stop, logs, adoption.

Only the GPU is simulated (uuids are plain strings). Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import signal
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path

import pytest

from gpufleet.agent.runtime import procfs
from gpufleet.agent.runtime.backoff import RestartPolicy
from gpufleet.agent.runtime.logs import read_log_tail
from gpufleet.agent.runtime.paths import state_file
from gpufleet.agent.runtime.process import LogSettings
from gpufleet.agent.runtime.spec import (
    ExecAction,
    GrpcAction,
    HttpGetAction,
    InstanceSpec,
    ProbeAction,
    ProbeSpec,
    TcpAction,
)
from gpufleet.agent.runtime.status import InstanceStatusSnapshot
from gpufleet.agent.runtime.supervisor import Supervisor, SupervisorConfig
from gpufleet.v1 import instance_pb2

pytestmark = pytest.mark.timeout(60)

READY = instance_pb2.INSTANCE_STATE_READY
STARTING = instance_pb2.INSTANCE_STATE_STARTING
FAILED = instance_pb2.INSTANCE_STATE_FAILED
STOPPED = instance_pb2.INSTANCE_STATE_STOPPED

PY = shlex.quote(sys.executable)

HTTP_SERVER = """
import http.server, os, sys
unready = os.environ.get("UNREADY_FILE", "")
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(503 if unready and os.path.exists(unready) else 200)
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler)
print("serving on", os.environ["PORT"], flush=True)
print("to stderr", file=sys.stderr, flush=True)
server.serve_forever()
"""

GRPC_SERVER = """
import os, signal, threading
from concurrent import futures
import grpc
from grpc_health.v1 import health, health_pb2_grpc
server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
server.add_insecure_port("127.0.0.1:" + os.environ["PORT"])
server.start()
done = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: done.set())
done.wait()
server.stop(None)
"""

ENV_DUMP = """
import json, os, time
print("ENV " + json.dumps(dict(os.environ)), flush=True)
time.sleep(600)
"""

SIGTERM_IGNORING_CHILD = """
import os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
with open(sys.argv[1], "w") as f:
    f.write(str(os.getpid()) + chr(10))
time.sleep(600)
"""

FAST = SupervisorConfig(
    restart_policy=RestartPolicy(backoff_base=0.05, backoff_cap=0.2, reset_after=30.0),
    stop_poll_interval=0.02,
    exit_poll_interval=0.05,
)

Statuses = dict[str, InstanceStatusSnapshot]


def probe(action: ProbeAction, **timing: float) -> ProbeSpec:
    settings = {"period": 0.1, "timeout": 2.0, "failure_threshold": 2} | timing
    return ProbeSpec(action=action, **settings)  # type: ignore[arg-type]


def script(tmp_path: Path, name: str, source: str) -> str:
    path = tmp_path / name
    path.write_text(source)
    return f"{PY} {shlex.quote(str(path))}"


def http_server(tmp_path: Path) -> str:
    return script(tmp_path, "http_server.py", HTTP_SERVER)


def spec(instance_id: str, command: str, **fields: object) -> InstanceSpec:
    base = InstanceSpec(
        instance_id=instance_id,
        deployment="echo",
        generation=1,
        command=command,
        termination_grace_period=2.0,
    )
    return replace(base, **fields)  # type: ignore[arg-type]


def gone(pid: int) -> bool:
    """Exited: no such process, or a zombie nobody has reaped yet."""
    stat = procfs.read_stat(pid)
    return stat is None or stat.state == "Z"


async def wait_until(
    supervisor: Supervisor,
    condition: Callable[[Statuses], bool],
    timeout: float = 15.0,
) -> Statuses:
    """Wait for status changes until `condition` holds for the statuses by instance id."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        supervisor.changed.clear()
        statuses = {s.instance_id: s for s in supervisor.statuses()}
        if condition(statuses):
            return statuses
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            pytest.fail(f"condition not met within {timeout}s; statuses: {statuses}")
        try:
            await asyncio.wait_for(supervisor.changed.wait(), remaining)
        except TimeoutError:
            pass


def state_is(instance_id: str, state: int, **fields: object) -> Callable[[Statuses], bool]:
    def check(statuses: Statuses) -> bool:
        status = statuses.get(instance_id)
        return (
            status is not None
            and status.state == state
            and all(getattr(status, key) == value for key, value in fields.items())
        )

    return check


async def wait_for_file_text(path: Path, needle: str, timeout: float = 10.0) -> str:
    """Poll a file the instance writes (there is no event for that), bounded."""
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        if path.exists() and needle in (text := path.read_text()):
            return text
        await asyncio.sleep(0.02)
    pytest.fail(f"{needle!r} did not appear in {path} within {timeout}s")


class Supervisors:
    """Creates supervisors on one state dir and cleans up every process they started."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.created: list[Supervisor] = []
        self.pids: set[int] = set()

    def new(self, config: SupervisorConfig = FAST) -> Supervisor:
        supervisor = Supervisor(self.state_dir, config, on_change=lambda: self._track())
        self.created.append(supervisor)
        return supervisor

    def _track(self) -> None:
        for supervisor in self.created:
            self.pids.update(supervisor.pids().values())

    async def cleanup(self) -> None:
        for supervisor in self.created:
            try:
                await asyncio.wait_for(supervisor.stop_all(), 20)
            except (RuntimeError, TimeoutError):
                pass
            await supervisor.close()
        for pid in self.pids:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


@pytest.fixture
async def supervisors(tmp_path: Path) -> AsyncIterator[Supervisors]:
    factory = Supervisors(tmp_path / "state")
    yield factory
    await factory.cleanup()


@pytest.mark.parametrize("kind", ["http", "tcp", "grpc", "exec"])
async def test_instance_becomes_ready_through_each_probe_kind(
    kind: str, tmp_path: Path, supervisors: Supervisors
) -> None:
    ready_file = tmp_path / "ready"
    commands = {
        "http": script(tmp_path, "http_server.py", HTTP_SERVER),
        "tcp": script(tmp_path, "http_server.py", HTTP_SERVER),
        "grpc": script(tmp_path, "grpc_server.py", GRPC_SERVER),
        "exec": f"touch {shlex.quote(str(ready_file))}; exec sleep 600",
    }
    actions: dict[str, ProbeAction] = {
        "http": HttpGetAction(path="/"),
        "tcp": TcpAction(),
        "grpc": GrpcAction(),
        "exec": ExecAction(command=("/bin/sh", "-c", 'test -e "$READY_FILE"')),
    }
    supervisor = supervisors.new()
    await supervisor.apply(
        [
            spec(
                "inst-1",
                commands[kind],
                env={"READY_FILE": str(ready_file)},
                readiness=probe(actions[kind]),
            )
        ]
    )
    statuses = await wait_until(supervisor, state_is("inst-1", READY))
    status = statuses["inst-1"]
    assert status.pid > 0 and status.port > 0
    assert supervisor.pids() == {"inst-1": status.pid}
    assert status.restart_count == 0 and not status.crash_loop
    await supervisor.stop_all()
    assert supervisor.statuses() == []
    assert gone(status.pid)
    assert not state_file(supervisors.state_dir, "inst-1").exists()


async def test_env_is_explicit_with_port_gpus_and_mps_limits(
    tmp_path: Path, supervisors: Supervisors
) -> None:
    agent_env = {
        "PATH": os.environ["PATH"],
        "HOME": "/home/agent",
        "LANG": "C.UTF-8",
        "AGENT_TOKEN": "t",
    }
    supervisor = supervisors.new(replace(FAST, agent_env=agent_env))
    command = script(tmp_path, "env_dump.py", ENV_DUMP)
    await supervisor.apply(
        [
            spec(
                "gpu-1",
                command,
                port=0,
                env={"USER_VAR": "1", "CUDA_VISIBLE_DEVICES": "all"},
                gpu_uuids=("GPU-sim-0",),
                mps_core_percent=25,
                mps_memory_limit_mib=2048,
            )
        ]
    )
    status = (await wait_until(supervisor, state_is("gpu-1", READY)))["gpu-1"]
    log_file = supervisors.state_dir / "instances" / "gpu-1" / "logs" / "instance.log"
    text = await wait_for_file_text(log_file, "ENV ")
    env = json.loads(text.split("ENV ", 1)[1].splitlines()[0])
    env.pop("PWD", None)  # set by the shell itself
    assert env == {
        "PATH": os.environ["PATH"],
        "HOME": "/home/agent",
        "LANG": "C.UTF-8",
        "USER_VAR": "1",
        "PORT": str(status.port),
        "CUDA_VISIBLE_DEVICES": "GPU-sim-0",
        "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "25",
        "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": "0=2048M",
        "GPUFLEET_INSTANCE_ID": "gpu-1",
        "GPUFLEET_DEPLOYMENT": "echo",
    }
    assert read_log_tail(supervisors.state_dir, "gpu-1", 1).startswith("ENV ")


async def test_rotation_keeps_every_line_the_instance_wrote(
    tmp_path: Path, supervisors: Supervisors
) -> None:
    supervisor = supervisors.new(replace(FAST, log_settings=LogSettings(max_bytes=2048, keep=1000)))
    writer = script(
        tmp_path,
        "writer.py",
        "import sys, time\n"
        "for i in range(3000):\n"
        "    print(f'line {i:05d}', file=sys.stderr if i % 3 == 0 else sys.stdout, flush=True)\n"
        "print('DONE', flush=True)\n"
        "time.sleep(600)\n",
    )
    await supervisor.apply([spec("logs-1", writer)])
    await wait_until(supervisor, state_is("logs-1", READY))
    log_dir = supervisors.state_dir / "instances" / "logs-1" / "logs"
    deadline = asyncio.get_running_loop().time() + 15
    while "DONE" not in read_log_tail(supervisors.state_dir, "logs-1", 1):
        assert asyncio.get_running_loop().time() < deadline, "instance output never arrived"
        await asyncio.sleep(0.05)
    lines = read_log_tail(supervisors.state_dir, "logs-1", 100_000).splitlines()
    assert lines == [f"line {i:05d}" for i in range(3000)] + ["DONE"]
    assert len(list(log_dir.glob("instance.log.*"))) > 10


async def test_crash_is_restarted_with_backoff_until_crash_loop(supervisors: Supervisors) -> None:
    seen: list[InstanceStatusSnapshot] = []
    supervisor = supervisors.new()

    def crash_looping(statuses: Statuses) -> bool:
        status = statuses.get("crash-1")
        if status is None:
            return False
        seen.append(status)
        return status.restart_count >= 3 and status.crash_loop

    await supervisor.apply([spec("crash-1", "echo starting; exit 3")])
    await wait_until(supervisor, crash_looping)
    failures = [s for s in seen if s.state == FAILED]
    assert failures and all(s.reason == "exit code 3" for s in failures)
    # The first crash is not a crash loop yet; the flag comes with repetition.
    assert not failures[0].crash_loop
    assert seen[-1].crash_loop
    assert "starting" in read_log_tail(supervisors.state_dir, "crash-1", 5)


async def test_killed_instance_comes_back(tmp_path: Path, supervisors: Supervisors) -> None:
    supervisor = supervisors.new()
    await supervisor.apply(
        [spec("kill-1", http_server(tmp_path), readiness=probe(TcpAction()))]
    )
    first = (await wait_until(supervisor, state_is("kill-1", READY)))["kill-1"]
    os.kill(first.pid, signal.SIGKILL)
    failed = await wait_until(supervisor, state_is("kill-1", FAILED))
    assert failed["kill-1"].reason == "killed by signal 9 (SIGKILL)"
    again = (await wait_until(supervisor, state_is("kill-1", READY, restart_count=1)))["kill-1"]
    assert again.pid != first.pid
    assert again.port == first.port
    # The agent restarts an instance on request too (e.g. a GPU memory overrun).
    supervisor.restart("kill-1", "GPU memory overrun: 900 MiB used, 512 MiB requested")
    overrun = await wait_until(supervisor, state_is("kill-1", FAILED))
    assert overrun["kill-1"].reason == "GPU memory overrun: 900 MiB used, 512 MiB requested"
    third = (await wait_until(supervisor, state_is("kill-1", READY, restart_count=2)))["kill-1"]
    assert third.pid != again.pid and gone(again.pid)
    with pytest.raises(KeyError, match="not running on this node"):
        supervisor.restart("other-1", "x")


async def test_liveness_failure_restarts(supervisors: Supervisors) -> None:
    supervisor = supervisors.new()
    await supervisor.apply(
        [spec("live-1", "exec sleep 600", liveness=probe(TcpAction(), failure_threshold=2))]
    )
    seen_reasons: list[str] = []

    def restarted(statuses: Statuses) -> bool:
        status = statuses["live-1"]
        seen_reasons.append(status.reason)
        return status.restart_count >= 1

    await wait_until(supervisor, restarted)
    expected = "liveness probe failed: TCP connect to 127.0.0.1:"
    assert any(reason.startswith(expected) for reason in seen_reasons)


async def test_startup_probe_gates_readiness_and_readiness_flaps(
    tmp_path: Path, supervisors: Supervisors
) -> None:
    gate = tmp_path / "gate"
    attempts = tmp_path / "attempts"
    unready = tmp_path / "unready"
    startup = probe(
        ExecAction(command=("/bin/sh", "-c", f"echo x >> {attempts}; test -e {gate}")),
        failure_threshold=1000,
    )
    supervisor = supervisors.new()
    await supervisor.apply(
        [
            spec(
                "gate-1",
                script(tmp_path, "http_server.py", HTTP_SERVER),
                env={"UNREADY_FILE": str(unready)},
                startup=startup,
                readiness=probe(HttpGetAction(path="/")),
            )
        ]
    )
    await wait_for_file_text(attempts, "x\nx\nx\n")
    status = supervisor.statuses()[0]
    assert status.state == STARTING  # the server answers, but startup has not passed
    gate.touch()
    await wait_until(supervisor, state_is("gate-1", READY))
    unready.touch()
    statuses = await wait_until(supervisor, state_is("gate-1", STARTING))
    assert statuses["gate-1"].reason.startswith("readiness probe failed: GET http://127.0.0.1:")
    assert "HTTP 503" in statuses["gate-1"].reason
    unready.unlink()
    statuses = await wait_until(supervisor, state_is("gate-1", READY))
    assert statuses["gate-1"].restart_count == 0


async def test_stop_kills_the_whole_group_including_a_child_ignoring_sigterm(
    tmp_path: Path, supervisors: Supervisors
) -> None:
    child_pid_file = tmp_path / "child.pid"
    child = script(tmp_path, "stubborn.py", SIGTERM_IGNORING_CHILD)
    supervisor = supervisors.new()
    await supervisor.apply(
        [spec("stop-1", f"{child} {child_pid_file} & wait", termination_grace_period=0.3)]
    )
    leader = (await wait_until(supervisor, state_is("stop-1", READY)))["stop-1"].pid
    child_pid = int(await wait_for_file_text(child_pid_file, "\n"))
    assert procfs.read_stat(child_pid) is not None
    assert procfs.read_stat(child_pid).pgid == leader  # type: ignore[union-attr]
    await asyncio.wait_for(supervisor.stop_all(), 10)
    assert gone(leader)
    assert gone(child_pid)
    assert supervisor.statuses() == []


async def test_apply_replaces_drains_and_removes(tmp_path: Path, supervisors: Supervisors) -> None:
    supervisor = supervisors.new()
    first = spec("app-1", "exec sleep 600")
    await supervisor.apply([first])
    old = (await wait_until(supervisor, state_is("app-1", READY)))["app-1"]
    await supervisor.apply([first])  # unchanged: left alone
    assert supervisor.statuses()[0].pid == old.pid
    await supervisor.apply([replace(first, generation=2)])
    new = (await wait_until(supervisor, state_is("app-1", READY, generation=2)))["app-1"]
    assert new.pid != old.pid and gone(old.pid)
    assert new.port == old.port and new.restart_count == 0
    await supervisor.apply([replace(first, generation=2, draining=True)])
    drained = (await wait_until(supervisor, state_is("app-1", STOPPED)))["app-1"]
    assert drained.pid == 0 and drained.reason == "drained" and gone(new.pid)
    await supervisor.apply([])
    await wait_until(supervisor, lambda s: not s)
    assert not state_file(supervisors.state_dir, "app-1").exists()
    with pytest.raises(ValueError, match="listed twice"):
        await supervisor.apply([first, first])


async def test_new_supervisor_adopts_running_instance_and_watches_it(
    tmp_path: Path, supervisors: Supervisors
) -> None:
    first = supervisors.new()
    await first.apply(
        [spec("adopt-1", http_server(tmp_path), readiness=probe(HttpGetAction()))]
    )
    running = (await wait_until(first, state_is("adopt-1", READY)))["adopt-1"]
    await first.close()
    assert not gone(running.pid)

    second = supervisors.new()
    assert await second.start() == []
    adopted = second.statuses()[0]
    assert (adopted.state, adopted.pid, adopted.port) == (READY, running.pid, running.port)
    assert adopted.reason == "adopted after an agent restart"

    # Not its parent, it still notices the exit and restarts the instance.
    os.kill(running.pid, signal.SIGKILL)
    failed = await wait_until(second, state_is("adopt-1", FAILED))
    assert failed["adopt-1"].reason.startswith("exited (exit status unknown")
    back = (await wait_until(second, state_is("adopt-1", READY, restart_count=1)))["adopt-1"]
    assert back.pid != running.pid


async def test_reused_pid_is_not_adopted_and_dead_instances_restart(
    tmp_path: Path, supervisors: Supervisors
) -> None:
    first = supervisors.new()
    await first.apply([spec("reuse-1", "exec sleep 600"), spec("dead-1", "exec sleep 600")])
    statuses = await wait_until(
        first, lambda s: all(state_is(i, READY)(s) for i in ("reuse-1", "dead-1"))
    )
    await first.close()
    # Fake pid reuse: the recorded start time no longer matches the process with that pid.
    path = state_file(supervisors.state_dir, "reuse-1")
    record = json.loads(path.read_text())
    record["start_ticks"] += 1
    path.write_text(json.dumps(record))
    dead_pid = statuses["dead-1"].pid
    os.kill(dead_pid, signal.SIGKILL)
    deadline = asyncio.get_running_loop().time() + 10
    while not gone(dead_pid):
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.01)

    second = supervisors.new()
    await second.start()
    after = await wait_until(
        second,
        lambda s: all(state_is(i, READY, restart_count=1)(s) for i in ("reuse-1", "dead-1")),
    )
    stranger = statuses["reuse-1"].pid
    assert after["reuse-1"].pid != stranger
    # The process that "reused" the pid is not ours: it was neither adopted nor killed.
    assert not gone(stranger)
    os.kill(stranger, signal.SIGKILL)


async def test_readiness_is_seen_long_before_the_period_while_starting(
    tmp_path: Path, supervisors: Supervisors
) -> None:
    # The server listens only after a short load; the readiness period is a minute. Until the
    # first check passes the agent checks quickly (a call may be waiting on this instance),
    # so READY comes well within the period instead of a whole period after the spawn.
    command = f"sleep 0.3; exec {http_server(tmp_path)}"
    supervisor = supervisors.new()
    await supervisor.apply(
        [spec("inst-1", command, readiness=probe(HttpGetAction(path="/"), period=60.0))]
    )
    await wait_until(supervisor, state_is("inst-1", READY), timeout=10.0)
