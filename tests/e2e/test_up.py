"""`gpufleet up` + `gpufleet apply -f examples/echo.yaml`: two instances READY on ONE simulated
GPU, visible in `gpufleet instances` and `gpufleet nodes`; a SIGKILLed instance comes back.

Issue 3 "Done when", with real processes: the `gpufleet up` process (control plane and
agent), the example model server instances, and the CLI.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import (
    ECHO_SPEC,
    LISTENING,
    REPO,
    ControlPlaneProc,
    Processes,
    alive,
    ready,
    wait_for,
)
from gpufleet.v1 import instance_pb2

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]


def test_up_runs_echo_on_one_gpu_and_restarts_a_killed_instance(processes: Processes, tmp_path: Path) -> None:
    state_dir = tmp_path / "up"
    up = processes.start(
        "up", "up", "--state-dir", str(state_dir), "--listen", "127.0.0.1:0", "--simulate-gpus", "2x81559",
        "--name", "box", "--workdir", str(REPO),
    )
    processes.agent_state_dirs.append(state_dir / "agent")
    address = up.wait_for_output(LISTENING).group(1)
    plane = ControlPlaneProc(up, address, state_dir)
    banner = up.output()
    assert str(state_dir / "admin-token") in banner and "Ctrl-C" in banner and "2 simulated GPU(s)" in banner

    applied = plane.cli("apply", "-f", str(ECHO_SPEC))
    assert "deployment/echo created" in applied.stdout

    instances = plane.wait_instances("two echo instances READY", lambda found: ready(found, 2))
    [gpu] = {tuple(i.gpu_uuids) for i in instances}
    assert len(gpu) == 1, f"both instances must share one GPU, got {[list(i.gpu_uuids) for i in instances]}"
    assert all(i.gpu_memory_reserved_mib == 2048 for i in instances)

    # Visible through the CLI, as a table and as data.
    table = plane.cli("instances").stdout
    for instance in instances:
        assert re.search(rf"{instance.id}\s+echo\s+box\s+\d\s+Ready", table), table
    listed = plane.cli_json("instances", "echo")
    assert sorted(i["id"] for i in listed) == sorted(i.id for i in instances)
    assert {i["state"] for i in listed} == {"INSTANCE_STATE_READY"}

    def shared_gpu() -> dict[str, Any] | None:
        [node] = plane.cli_json("nodes")
        for entry in node.get("gpus", []):
            if entry["uuid"] == gpu[0] and len(entry.get("instance_ids", [])) == 2:
                return dict(entry)
        return None

    entry = wait_for("the shared GPU in gpufleet nodes", shared_gpu)
    assert sorted(entry["instance_ids"]) == sorted(i.id for i in instances)
    assert int(entry["memory_reserved_mib"]) == 4096

    def measured_4096() -> bool:
        # Simulated cards report the instances' declared use as measured.
        current = shared_gpu()
        return current is not None and int(current.get("memory_used_mib", 0)) == 4096

    wait_for("measured use of the shared GPU", measured_4096)
    nodes_table = plane.cli("nodes").stdout
    assert re.search(r"box\s+Ready\s+\S+ ago\s+\d\s+81559\s+4096\s+4096", nodes_table), nodes_table

    # (b) SIGKILL one instance's process: the agent restarts it, same instance, new pid.
    victim = instances[0]
    os.kill(victim.pid, signal.SIGKILL)

    def restarted(found: list[instance_pb2.Instance]) -> bool:
        again = next((i for i in found if i.id == victim.id), None)
        return ready(found, 2) and again is not None and again.pid != victim.pid and again.restart_count >= 1

    after = plane.wait_instances("the killed instance READY again", restarted)
    assert {i.id for i in after} == {i.id for i in instances}, "no replacement instance: the same one restarts"
    survivor = next(i for i in after if i.id != victim.id)
    assert survivor.pid == instances[1].pid and survivor.restart_count == 0

    # Its output is on this node.
    logs = plane.cli("logs", victim.id, "--agent-state-dir", str(state_dir / "agent"), "--tail", "50").stdout
    assert logs.strip(), "the model server wrote nothing to its log"

    # SIGTERM stops `gpufleet up`, and (its default) its instances with it.
    pids = [i.pid for i in after]
    assert up.stop(signal.SIGTERM) == 0
    for pid in pids:
        wait_for(f"instance pid {pid} gone", lambda: not alive(pid), timeout=15)  # noqa: B023
