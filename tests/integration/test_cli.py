"""The `gpufleet` CLI run as a real subprocess against a real control plane."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest
import yaml

from gpufleet.client import Client
from gpufleet.v1 import deployment_pb2
from tests.integration.test_sdk import ThreadedControlPlane
from tests.integration.test_server_security import Pki, pki  # noqa: F401  (pki is a fixture)

pytestmark = pytest.mark.timeout(120)

_CALL_TIMEOUT_S = 60.0

ECHO_SPEC = """\
name: echo
labels: {team: vision}
spec:
  command: python -m examples.model_server --port $PORT
  port: 0
  gpu: {memory_mib: 2048, core_percent: 25}
  scaling: {min_instances: 2, max_instances: 4, idle_retention: 300s}
  traffic: {max_request_concurrency: 2, max_queue_size: 100, queue_timeout: 30s}
  readiness_probe: {grpc: {}, period: 1s}
---
name: helper
spec: {command: sleep 1000, scaling: {max_instances: 1, scale_down_delay: 90}}
"""


def _cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "gpufleet.client.cli", *args]


def _env(server: str | None = None, state_dir: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUFLEET_")}
    if server is not None:
        env["GPUFLEET_SERVER"] = server
    if state_dir is not None:
        env["GPUFLEET_STATE_DIR"] = str(state_dir)
    return env


def run_cli(
    *args: str, env: dict[str, str], stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        _cli_command(*args),
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=_CALL_TIMEOUT_S,
        check=False,
    )


class LineReader:
    """Reads a pipe on a thread so that waiting for a line is bounded in time."""

    def __init__(self, pipe: IO[str]) -> None:
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, args=(pipe,), daemon=True)
        self._thread.start()

    def _pump(self, pipe: IO[str]) -> None:
        for line in pipe:
            self._lines.put(line)
        self._lines.put(None)

    def wait_for(self, pattern: str, timeout: float = _CALL_TIMEOUT_S) -> str:
        """The first line matching ``pattern``; fails if the pipe closes or time runs out."""
        seen: list[str] = []
        while True:
            try:
                line = self._lines.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(
                    f"no line matching {pattern!r} in {timeout}s; got {seen}"
                ) from None
            if line is None:
                raise AssertionError(
                    f"output ended without a line matching {pattern!r}; got {seen}"
                )
            seen.append(line)
            if re.search(pattern, line):
                return line


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedControlPlane]:
    plane = ThreadedControlPlane(tmp_path_factory.mktemp("cli") / "state")
    yield plane
    plane.stop()


@pytest.fixture
def env(server: ThreadedControlPlane) -> dict[str, str]:
    """Address from $GPUFLEET_SERVER, token from the state dir's admin-token file."""
    return _env(server.address, server.state_dir)


def test_apply_get_list_scale_rotate_delete(env: dict[str, str], tmp_path: Path) -> None:
    spec = tmp_path / "echo.yaml"
    spec.write_text(ECHO_SPEC)

    created = run_cli("apply", "-f", str(spec), env=env)
    assert created.returncode == 0, created.stderr
    lines = created.stdout.splitlines()
    assert "deployment/echo created" in lines and "deployment/helper created" in lines
    assert len(re.findall(r"invoke token: \S+", created.stdout)) == 2
    assert "shown only this once" in created.stdout

    again = run_cli("apply", "-f", str(spec), env=env)
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines() == ["deployment/echo unchanged", "deployment/helper unchanged"]

    spec.write_text(ECHO_SPEC.replace("max_instances: 4", "max_instances: 6"))
    updated = run_cli("apply", "-f", str(spec), env=env)
    assert updated.stdout.splitlines() == ["deployment/echo updated", "deployment/helper unchanged"]

    table = run_cli("get", "echo", env=env)
    assert table.returncode == 0, table.stderr
    header, row = table.stdout.splitlines()
    assert header.split() == [
        "NAME", "PHASE", "READY", "QUEUED", "IN-FLIGHT", "MIN-MAX", "GPU", "REVISION", "AGE"
    ]  # fmt: skip
    assert row.split()[:6] == ["echo", "Standby", "0/2", "0", "0", "2-6"]

    as_yaml = yaml.safe_load(run_cli("get", "echo", "-o", "yaml", env=env).stdout)
    assert as_yaml["spec"]["gpu"]["core_percent"] == 25
    assert as_yaml["spec"]["traffic"]["queue_timeout"] == "30s"

    listed = run_cli("list", "-o", "json", env=env)
    assert listed.returncode == 0, listed.stderr
    assert [d["name"] for d in json.loads(listed.stdout)] == ["echo", "helper"]
    selected = run_cli("-o", "json", "list", "-l", "team=vision", env=env)
    assert [d["name"] for d in json.loads(selected.stdout)] == ["echo"]

    scaled = run_cli("scale", "echo", "--min", "1", "--max", "3", env=env)
    assert scaled.returncode == 0, scaled.stderr
    assert scaled.stdout.strip() == "deployment/echo scaled: min 1, max 3"

    rotated = run_cli("rotate-token", "echo", env=env)
    assert rotated.returncode == 0, rotated.stderr
    assert re.fullmatch(r"\S+\n", rotated.stdout) and "shown only this once" in rotated.stderr

    # What `get -o yaml` prints applies back as it is.
    round_trip = run_cli(
        "apply", "-f", "-", env=env, stdin=run_cli("get", "echo", "-o", "yaml", env=env).stdout
    )
    assert round_trip.stdout.strip() == "deployment/echo unchanged", round_trip.stderr

    deleted = run_cli("delete", "echo", "--wait", env=env)
    assert deleted.returncode == 0, deleted.stderr
    assert deleted.stdout.strip().endswith("deployment/echo deleted")
    gone = run_cli("get", "echo", env=env)
    assert gone.returncode == 1
    assert "NOT_FOUND" in gone.stderr and "Traceback" not in gone.stderr


def test_apply_json_from_stdin(env: dict[str, str]) -> None:
    document = {"name": "from-stdin", "spec": {"command": "run", "scaling": {"idle_retention": 45}}}
    result = run_cli("apply", "-f", "-", "-o", "json", env=env, stdin=json.dumps(document))
    assert result.returncode == 0, result.stderr
    [applied] = json.loads(result.stdout)
    assert applied["action"] == "created" and applied["invoke_token"]
    assert applied["deployment"]["spec"]["scaling"]["idle_retention"] == "45s"


def test_server_side_violations_each_on_their_own_line(env: dict[str, str], tmp_path: Path) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text(
        "name: bad-spec\nspec:\n  command: run\n  port: 70000\n"
        "  gpu: {memory_mib: 10, core_percent: 150}\n"
    )
    result = run_cli("apply", "-f", str(spec), env=env)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert any(line.startswith("error: INVALID_ARGUMENT") for line in lines)
    assert any(re.match(r"  \S*spec\.port: ", line) for line in lines), lines
    assert any(re.match(r"  \S*spec\.gpu\.core_percent: ", line) for line in lines), lines


def test_local_spec_error_names_file_document_and_field(
    env: dict[str, str], tmp_path: Path
) -> None:
    spec = tmp_path / "typo.yaml"
    spec.write_text("name: a\n---\nname: b\nspec: {scaling: {idle_retention: soon}}\n")
    result = run_cli("apply", "-f", str(spec), env=env)
    assert result.returncode == 2
    assert f"{spec}: document 2: spec.scaling.idle_retention: expected a duration" in result.stderr
    assert "Traceback" not in result.stderr


def test_connection_refused_exits_3_naming_the_address(tmp_path: Path) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{closed.getsockname()[1]}"
        result = run_cli("--server", address, "--token", "t", "list", env=_env(state_dir=tmp_path))
    assert result.returncode == 3
    assert f"cannot connect to the control plane at {address}" in result.stderr
    assert "gpufleet server" in result.stderr and "Traceback" not in result.stderr


def test_missing_token_says_where_it_looked(server: ThreadedControlPlane, tmp_path: Path) -> None:
    result = run_cli("list", env=_env(server.address, tmp_path / "empty-state"))
    assert result.returncode == 2
    assert "no admin token" in result.stderr
    assert str(tmp_path / "empty-state" / "admin-token") in result.stderr
    assert "Traceback" not in result.stderr


def test_wrong_token_is_a_server_error_without_traceback(
    server: ThreadedControlPlane, tmp_path: Path
) -> None:
    result = run_cli("--token", "wrong", "list", env=_env(server.address, tmp_path))
    assert result.returncode == 1
    assert re.search(r"error: (UNAUTHENTICATED|PERMISSION_DENIED)", result.stderr)
    assert "Traceback" not in result.stderr


def test_delete_wait_returns_after_draining(
    server: ThreadedControlPlane, env: dict[str, str]
) -> None:
    with Client(server.address, server.admin_token, timeout=10) as client:
        client.create_deployment(
            deployment_pb2.Deployment(
                name="draining", spec=deployment_pb2.DeploymentSpec(command="run")
            )
        )
    server.add_instance("draining", "draining-1")
    process = subprocess.Popen(
        _cli_command("delete", "draining", "--wait", "--timeout", "60"),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        LineReader(process.stdout).wait_for("waiting for its instances to drain")
        server.finish_draining("draining", "draining-1")
        _, err = process.communicate(timeout=_CALL_TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(_CALL_TIMEOUT_S)
    assert process.returncode == 0, err


def test_watch_prints_snapshot_then_changes(
    server: ThreadedControlPlane, env: dict[str, str]
) -> None:
    process = subprocess.Popen(
        _cli_command("watch", "-o", "json"),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        lines = LineReader(process.stdout)
        lines.wait_for("EVENT_TYPE_SNAPSHOT_END")
        with Client(server.address, server.admin_token, timeout=10) as client:
            client.create_deployment(
                deployment_pb2.Deployment(
                    name="watched", spec=deployment_pb2.DeploymentSpec(command="run")
                )
            )
        event = json.loads(lines.wait_for('"name": "watched"'))
        assert event["type"] == "EVENT_TYPE_CREATED"
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=_CALL_TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(_CALL_TIMEOUT_S)
    assert process.returncode == 130
    assert "Traceback" not in err


def test_server_command_runs_the_control_plane(tmp_path: Path) -> None:
    state_dir = tmp_path / "served"
    process = subprocess.Popen(
        _cli_command("server", "--state-dir", str(state_dir), "--listen", "127.0.0.1:0"),
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = LineReader(process.stdout).wait_for(r"gpufleet control plane listening on ")
        address = line.rsplit(" ", 1)[1].strip()
        listed = run_cli("list", "-o", "json", env=_env(address, state_dir))
        assert listed.returncode == 0, listed.stderr
        assert json.loads(listed.stdout) == []
        process.send_signal(signal.SIGTERM)
        process.wait(_CALL_TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(_CALL_TIMEOUT_S)
    assert process.returncode == 0


def test_mutual_tls_flags(tmp_path: Path, pki: Pki) -> None:  # noqa: F811
    plane = ThreadedControlPlane(
        tmp_path / "state",
        tls_cert=pki.server_cert,
        tls_key=pki.server_key,
        tls_client_ca=pki.ca,
    )
    try:
        env = _env(plane.address, plane.state_dir)
        ca = ("--tls-ca", str(pki.ca))
        client_pair = ("--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key))
        secured = run_cli(*ca, *client_pair, "list", "-o", "json", env=env)
        assert secured.returncode == 0, secured.stderr
        assert json.loads(secured.stdout) == []
        # Without a client certificate the handshake fails: the server cannot be reached.
        refused = run_cli(*ca, "list", env=env)
        assert refused.returncode == 3
        assert f"cannot connect to the control plane at {plane.address}" in refused.stderr
    finally:
        plane.stop()
