"""End-to-end fixtures: real `gpufleet` processes (server, agent, up, CLI) on 127.0.0.1.

Every process starts in its own session and is SIGKILLed with its whole process group at
teardown; instance processes (their own sessions, started by agents) are found through the
agents' state files and killed too. Every wait polls with a deadline.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from gpufleet.agent.runtime import procfs, statefile
from gpufleet.client.sdk import Client
from gpufleet.v1 import instance_pb2, node_pb2

REPO = Path(__file__).resolve().parents[2]
ECHO_SPEC = REPO / "examples" / "echo.yaml"
LISTENING = re.compile(r"gpufleet control plane listening on (\S+)")
READY = instance_pb2.INSTANCE_STATE_READY
WAIT_S = 30.0
_POLL_S = 0.1

T = TypeVar("T")


def base_env(**extra: str) -> dict[str, str]:
    """The environment of every process: this venv first on PATH, no stray GPUFLEET_* settings."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("GPUFLEET_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = WAIT_S) -> T:
    """Poll `probe` until it returns something other than None (or False)."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            value = probe()
        except Exception as err:  # noqa: BLE001 - a server still starting answers with errors
            value, last_error = None, err
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what} (last error: {last_error!r})")
        time.sleep(_POLL_S)


@dataclass
class Proc:
    """One gpufleet process with its output in a file."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_output(self, pattern: re.Pattern[str], timeout: float = WAIT_S) -> re.Match[str]:
        def probe() -> re.Match[str] | None:
            if self.popen.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.popen.returncode}:\n{self.output()}")
            return pattern.search(self.output())

        try:
            return wait_for(f"{pattern.pattern!r} from {self.name}", probe, timeout)
        except AssertionError as err:
            raise AssertionError(f"{err}\n--- {self.name} output ---\n{self.output()}") from None

    def kill_group(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(10)

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = WAIT_S) -> int:
        """Signal the process itself (not its group) and wait for it to exit."""
        self.popen.send_signal(sig)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} did not exit within {timeout:g}s after {sig.name}") from None


@dataclass
class Processes:
    """Starts processes and remembers what to kill at teardown."""

    tmp_path: Path
    procs: list[Proc] = field(default_factory=list)
    agent_state_dirs: list[Path] = field(default_factory=list)

    def start(self, name: str, *args: str, env: dict[str, str] | None = None) -> Proc:
        log_path = self.tmp_path / f"{name}-{len(self.procs)}.log"
        with open(log_path, "wb") as log:
            popen = subprocess.Popen(
                [sys.executable, "-m", "gpufleet.client.cli", *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env or base_env(),
                cwd=REPO,
                start_new_session=True,
            )
        proc = Proc(name, popen, log_path)
        self.procs.append(proc)
        return proc

    def cleanup(self) -> None:
        for proc in self.procs:
            proc.kill_group()
        for state_dir in self.agent_state_dirs:
            kill_instances(state_dir)


def kill_instances(agent_state_dir: Path) -> None:
    """SIGKILL the process group of every live instance recorded in an agent's state dir."""
    records, _ = statefile.load_records(agent_state_dir)
    for record in records:
        if record.pid > 0 and procfs.is_running(record.pid, record.start_ticks):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(record.pid, signal.SIGKILL)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    running = Processes(tmp_path)
    try:
        yield running
    finally:
        running.cleanup()


@dataclass
class ControlPlaneProc:
    """A control plane process (`gpufleet server` or `gpufleet up`) and how to talk to it."""

    proc: Proc
    address: str
    state_dir: Path

    @property
    def admin_token(self) -> str:
        return (self.state_dir / "admin-token").read_text().strip()

    @property
    def join_token(self) -> str:
        return (self.state_dir / "join-token").read_text().strip()

    def client(self) -> Client:
        return Client(self.address, self.admin_token)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run the gpufleet CLI against this control plane."""
        result = subprocess.run(
            [sys.executable, "-m", "gpufleet.client.cli", "--server", self.address, *args],
            capture_output=True,
            text=True,
            env=base_env(GPUFLEET_STATE_DIR=str(self.state_dir)),
            cwd=REPO,
            timeout=WAIT_S,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"gpufleet {' '.join(args)} exited {result.returncode}:\n{result.stderr}")
        return result

    def cli_json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "-o", "json").stdout)

    def instances(self, deployment: str = "") -> list[instance_pb2.Instance]:
        with self.client() as client:
            return client.list_instances(deployment)

    def nodes(self) -> list[node_pb2.Node]:
        with self.client() as client:
            return client.list_nodes()

    def wait_instances(
        self,
        what: str,
        predicate: Callable[[list[instance_pb2.Instance]], bool],
        deployment: str = "echo",
        timeout: float = WAIT_S,
    ) -> list[instance_pb2.Instance]:
        def probe() -> list[instance_pb2.Instance] | None:
            current = self.instances(deployment)
            return current if predicate(current) else None

        try:
            return wait_for(what, probe, timeout)
        except AssertionError as err:
            raise AssertionError(f"{err}\nlast instances: {self.instances(deployment)}") from None


def start_server(
    processes: Processes, state_dir: Path, *extra: str, listen: str = "127.0.0.1:0", name: str = "server"
) -> ControlPlaneProc:
    proc = processes.start(name, "server", "--state-dir", str(state_dir), "--listen", listen, *extra)
    address = proc.wait_for_output(LISTENING).group(1)
    return ControlPlaneProc(proc, address, state_dir)


def start_agent(
    processes: Processes,
    plane: ControlPlaneProc,
    name: str,
    *extra: str,
    join: bool = True,
) -> tuple[Proc, Path]:
    state_dir = processes.tmp_path / f"agent-{name}"
    processes.agent_state_dirs.append(state_dir)
    args = ["agent", "--server", plane.address, "--name", name, "--state-dir", str(state_dir)]
    if join:
        args += ["--join-token", plane.join_token]
    args += ["--simulate-gpus", "1x81559", "--workdir", str(REPO), "--advertise-host", "127.0.0.1", *extra]
    return processes.start(f"agent-{name}", *args), state_dir


def ready(instances: list[instance_pb2.Instance], count: int, node_id: str | None = None) -> bool:
    """Exactly `count` instances, all READY with a pid (and on node_id, when given)."""
    return len(instances) == count and all(
        i.state == READY and i.pid > 0 and (node_id is None or i.node_id == node_id) for i in instances
    )


def node_id_of(plane: ControlPlaneProc, name: str) -> str:
    return wait_for(
        f"node {name} registered",
        lambda: next((node.id for node in plane.nodes() if node.name == name), None),
    )


def alive(pid: int) -> bool:
    stat = procfs.read_stat(pid)
    return stat is not None and stat.state != "Z"
