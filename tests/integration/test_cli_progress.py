"""`gpufleet apply --wait` and `gpufleet scale --wait` as real subprocesses against a real
control plane (port 0, SQLite in tmp_path, reconciler on) with a scripted agent that
reports instances ready, or crash-looping."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gpufleet.v1 import instance_pb2
from tests.integration.test_node_service_helpers import (
    Plane,
    ScriptedAgent,
    node_config,
    running_plane,
)

pytestmark = pytest.mark.timeout(120)

_CLI_TIMEOUT_S = 90.0

SPEC = """\
name: echo
spec:
  command: python -m examples.model_server --port $PORT
  gpu: {memory_mib: 2048, core_percent: 25}
  scaling: {min_instances: 2, max_instances: 4}
"""


@dataclass
class Cluster:
    plane: Plane
    agent: ScriptedAgent
    spec: Path

    async def cli(self, *args: str) -> tuple[int, str, str]:
        """The real CLI in a subprocess; the control plane keeps serving meanwhile."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("GPUFLEET_")}
        env["GPUFLEET_SERVER"] = self.plane.plane.address
        env["GPUFLEET_TOKEN"] = self.plane.plane.admin_token
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gpufleet.client.cli", *args,
            env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(), _CLI_TIMEOUT_S)
        return process.returncode or 0, out.decode(), err.decode()


async def start_cluster(tmp_path: Path, fail_generation: int | None) -> AsyncIterator[Cluster]:
    spec = tmp_path / "echo.yaml"
    spec.write_text(SPEC)
    async with running_plane(node_config(tmp_path / "state")) as plane:
        agent = ScriptedAgent(
            plane.plane.address, plane.plane.join_token, "gpu-a", fail_generation=fail_generation
        )
        await agent.register()
        await agent.connect()
        try:
            yield Cluster(plane, agent, spec)
        finally:
            await agent.close()


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    async for running in start_cluster(tmp_path, fail_generation=None):
        yield running


@pytest.fixture
async def crashing(tmp_path: Path) -> AsyncIterator[Cluster]:
    async for running in start_cluster(tmp_path, fail_generation=1):
        yield running


async def test_apply_wait_shows_progress_until_ready(cluster: Cluster) -> None:
    code, out, err = await cluster.cli("apply", "-f", str(cluster.spec), "--wait", "--timeout", "60")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "deployment/echo created"
    assert lines[-1] == "deployment/echo ready: 2/2 instances"
    progress = [line for line in lines if line.startswith("deployment/echo: ")]
    assert progress and all(" ready" in line for line in progress)
    assert "\x1b" not in out  # not a terminal: plain lines only
    instances = await cluster.plane.instances("echo")
    assert sum(1 for i in instances if i.state == instance_pb2.INSTANCE_STATE_READY) == 2

    # Scaling up with -o json: stdout stays one JSON document, the progress goes to stderr.
    code, out, err = await cluster.cli("scale", "echo", "--min", "3", "--wait", "-o", "json")
    assert code == 0, err
    assert json.loads(out)["spec"]["scaling"]["min_instances"] == 3
    assert err.splitlines()[-1] == "deployment/echo ready: 3/3 instances"

    # The file says min 2 again: apply updates it and waits until the reconciler has seen
    # the new spec. The third instance stays until it has been idle long enough, so the
    # deployment may still want 3.
    code, out, err = await cluster.cli("apply", "-f", str(cluster.spec), "--wait", "--timeout", "60")
    assert code == 0, err
    assert out.splitlines()[0] == "deployment/echo updated"
    assert re.fullmatch(r"deployment/echo ready: ([23])/\1 instances", out.splitlines()[-1])
    updated = await cluster.plane.get("echo")
    assert updated.observed_generation == updated.generation


async def test_wait_times_out_with_the_status_message(crashing: Cluster) -> None:
    code, out, err = await crashing.cli("apply", "-f", str(crashing.spec), "--wait", "--timeout", "3")
    assert code == 1, (out, err)
    assert "deployment/echo created" in out
    assert "error: deployment/echo is not ready after 3s" in err
    assert "exit code 1" in err
    assert "Traceback" not in err


async def test_wait_flags_are_checked_before_anything_changes(cluster: Cluster) -> None:
    code, _, err = await cluster.cli("apply", "-f", str(cluster.spec), "--wait", "--timeout", "0")
    assert code == 2 and "--timeout must be a number of seconds above 0" in err
    code, _, err = await cluster.cli("scale", "echo", "--min", "1", "--wait", "--timeout", "-5")
    assert code == 2 and "--timeout" in err
    assert await cluster.plane.instances() == []
