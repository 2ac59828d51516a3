"""The Node.js client (clients/node) against the real stack on 127.0.0.1, ports 0, with one
simulated 80 GB GPU.

The client creates a `tokens` deployment scaled to zero on the control plane, then streams
tokens through the gateway with the deployment's invoke token: the call wakes the instance
(a real `python -m examples.model_server` process started by the agent) and waits for it.

Where `gpufleet up` embeds a gateway, the stack is that one process (control plane, gateway
and a local agent); otherwise it is `gpufleet server`, `gpufleet gateway` and `gpufleet agent`
started separately.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gpufleet.agent.config import AGENT_SUBDIR
from gpufleet.agent.runtime import procfs, statefile
from gpufleet.server import up

REPO = Path(__file__).resolve().parents[2]
CLIENT = REPO / "clients" / "node" / "deploy_and_stream.js"
NODE = shutil.which("node")
START_TIMEOUT_S = 30.0
CLIENT_TIMEOUT_S = 90.0
SERVER_LINE = re.compile(r"gpufleet control plane listening on (\S+)")
GATEWAY_LINE = re.compile(r"gpufleet gateway listening on (\S+)")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(150),
    pytest.mark.skipif(
        NODE is None,
        reason="node is not on PATH: the Node.js client test needs Node.js 18+ and "
        "`npm install` at the repository root (make setup does both)",
    ),
]


def _env(**extra: str) -> dict[str, str]:
    """This venv first on PATH (instances run `python -m examples.model_server`), no stray
    GPUFLEET_* settings."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("GPUFLEET_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


@dataclass
class Stack:
    """The processes of one test, killed with their process groups at the end."""

    tmp_path: Path
    processes: list[tuple[str, subprocess.Popen[bytes], Path]] = field(default_factory=list)
    server: str = ""
    gateway: str = ""
    state_dir: Path = Path()
    agent_state_dir: Path = Path()
    """Where the agent keeps its instances' state files (to kill them at the end)."""

    def start(self, name: str, *args: str) -> tuple[subprocess.Popen[bytes], Path]:
        log = self.tmp_path / f"{name}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "gpufleet.client.cli", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=REPO,
                env=_env(),
                start_new_session=True,
            )
        self.processes.append((name, process, log))
        return process, log

    def wait_line(self, name: str, pattern: re.Pattern[str]) -> str:
        """The first group of `pattern` once process `name` has printed it."""
        process, log = next((p, path) for n, p, path in self.processes if n == name)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            found = pattern.search(log.read_text(errors="replace"))
            if found:
                return found.group(1)
            if process.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"{name} did not print {pattern.pattern!r}:\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(
            f"--- {name} ---\n{log.read_text(errors='replace')}" for name, _, log in self.processes
        )

    def stop(self) -> None:
        for _, process, _ in self.processes:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(10)
        # Instances run in sessions of their own; the agent's state files name them.
        records, _ = statefile.load_records(self.agent_state_dir)
        for record in records:
            if record.pid > 0 and procfs.is_running(record.pid, record.start_ticks):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(record.pid, signal.SIGKILL)


def up_embeds_a_gateway() -> bool:
    """True once `gpufleet up` runs a gateway beside its control plane and agent."""
    return "--gateway-listen" in up.build_parser().format_help()


def start_up(stack: Stack) -> None:
    """`gpufleet up`: control plane, gateway and agent in one process."""
    stack.agent_state_dir = stack.state_dir / AGENT_SUBDIR
    stack.start(
        "up", "up", "--state-dir", str(stack.state_dir), "--listen", "127.0.0.1:0",
        "--gateway-listen", "127.0.0.1:0", "--simulate-gpus", "1x81559",
        "--workdir", str(REPO), "--name", "node-a",
    )
    stack.server = stack.wait_line("up", SERVER_LINE)
    stack.gateway = stack.wait_line("up", GATEWAY_LINE)


def start_separately(stack: Stack) -> None:
    """`gpufleet server`, `gpufleet gateway` and `gpufleet agent` as three processes."""
    stack.agent_state_dir = stack.tmp_path / "agent"
    stack.start(
        "server", "server", "--state-dir", str(stack.state_dir), "--listen", "127.0.0.1:0"
    )
    stack.server = stack.wait_line("server", SERVER_LINE)
    token_file = stack.state_dir / "admin-token"
    stack.start(
        "gateway", "gateway", "--server", stack.server, "--token-file", str(token_file),
        "--listen", "127.0.0.1:0",
    )
    stack.gateway = stack.wait_line("gateway", GATEWAY_LINE)
    join_token = (stack.state_dir / "join-token").read_text().strip()
    stack.start(
        "agent", "agent", "--server", stack.server, "--join-token", join_token,
        "--simulate-gpus", "1x81559", "--state-dir", str(stack.agent_state_dir),
        "--workdir", str(REPO), "--advertise-host", "127.0.0.1", "--name", "node-a",
    )


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    running = Stack(tmp_path_factory.mktemp("node-client"))
    running.state_dir = running.tmp_path / "state"
    try:
        if up_embeds_a_gateway():
            start_up(running)
        else:
            start_separately(running)
        yield running
    finally:
        running.stop()


def run_client(
    stack: Stack, *args: str, token: str | None = None
) -> subprocess.CompletedProcess[str]:
    if NODE is None:
        raise AssertionError("node is not on PATH")
    admin = token if token is not None else (stack.state_dir / "admin-token").read_text().strip()
    return subprocess.run(
        [NODE, str(CLIENT), "--server", stack.server, "--gateway", stack.gateway, *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=_env(GPUFLEET_TOKEN=admin),
        timeout=CLIENT_TIMEOUT_S,
    )


def test_node_client_creates_a_deployment_and_streams_tokens_through_the_gateway(
    stack: Stack,
) -> None:
    result = run_client(
        stack, "--name", "tokens", "--prompt", "hello from node", "--max-tokens", "5",
        "--timeout", "80",
    )
    assert result.returncode == 0, f"{result.stderr}\n{stack.logs()}"
    summary = json.loads(result.stdout)
    assert summary["deployment"]["name"] == "tokens"
    assert int(summary["deployment"]["revision"]) >= 1
    assert summary["invoke_token_issued"] is True
    stream = summary["stream"]
    assert stream["tokens"] == ["hello", "from", "node", "hello", "from"]
    assert stream["final"] is True
    assert stream["responses"] == 5
    # The instance the agent started for the call, e.g. "tokens-7f3a9c".
    assert stream["route_target"].startswith("tokens-")


def test_node_client_reports_a_refused_admin_token(stack: Stack) -> None:
    result = run_client(stack, "--name", "refused", token="not-the-admin-token")
    assert result.returncode == 1
    error = json.loads(result.stderr.strip().splitlines()[-1])["error"]
    assert error["call"] == "CreateDeployment"
    assert error["code"] == "PERMISSION_DENIED"  # a token was sent, but not the admin one


def test_node_client_rejects_bad_arguments(stack: Stack) -> None:
    result = run_client(stack, "--max-tokens", "zero")
    assert result.returncode == 2
    assert "--max-tokens must be a whole number" in result.stderr
