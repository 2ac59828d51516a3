"""Restarts without rescheduling (issue 3 "Done when"): an agent killed -9 and started again
adopts its instances (same pids), and a restarted control plane keeps every instance where it
is (same ids, same pids). Real `gpufleet server` and `gpufleet agent` processes.
"""

from __future__ import annotations

import re
import signal

import pytest

from gpufleet.v1 import instance_pb2, node_pb2
from tests.e2e.conftest import (
    ECHO_SPEC,
    Processes,
    alive,
    node_id_of,
    ready,
    start_agent,
    start_server,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

ADOPTED = re.compile(r"adopted 2 instance\(s\) recorded by a previous agent")


def pids_by_id(instances: list[instance_pb2.Instance]) -> dict[str, int]:
    return {i.id: i.pid for i in instances}


def test_agent_killed_and_restarted_adopts_its_instances(processes: Processes) -> None:
    plane = start_server(processes, processes.tmp_path / "server")
    agent, _ = start_agent(processes, plane, "a")
    node = node_id_of(plane, "a")
    plane.cli("apply", "-f", str(ECHO_SPEC))
    before = pids_by_id(plane.wait_instances("two echo instances READY", lambda found: ready(found, 2, node)))

    agent.kill_group()  # kill -9 of the agent alone: its instances live in sessions of their own
    assert all(alive(pid) for pid in before.values())

    # Restarted without --join-token: it keeps its identity from the state dir.
    restarted, _ = start_agent(processes, plane, "a", join=False)
    restarted.wait_for_output(ADOPTED)
    after = plane.wait_instances(
        "the same instances READY again",
        lambda found: ready(found, 2, node) and pids_by_id(found) == before,
    )
    assert all(i.restart_count == 0 for i in after)
    assert [n.id for n in plane.nodes()] == [node]

    # SIGTERM: the agent exits cleanly and leaves its instances serving.
    assert restarted.stop(signal.SIGTERM) == 0
    assert all(alive(pid) for pid in before.values())
    assert "leaving 2 instance(s) running" in restarted.output()


def test_control_plane_restart_keeps_instances_in_place(processes: Processes) -> None:
    state_dir = processes.tmp_path / "server"
    plane = start_server(processes, state_dir)
    start_agent(processes, plane, "a")
    node = node_id_of(plane, "a")
    plane.cli("apply", "-f", str(ECHO_SPEC))
    before = pids_by_id(plane.wait_instances("two echo instances READY", lambda found: ready(found, 2, node)))

    plane.proc.stop(signal.SIGKILL)
    # Same port, so the agent finds it again; same state dir, so it remembers everything.
    # (A fixed --listen port would put the embedded gateway on its fixed default port.)
    again = start_server(
        processes, state_dir, "--gateway-listen", "127.0.0.1:0", listen=plane.address, name="server-again"
    )

    def reconnected() -> bool:
        nodes = again.nodes()
        return len(nodes) == 1 and nodes[0].id == node and nodes[0].state == node_pb2.NODE_STATE_READY

    wait_for("the agent back on the restarted control plane", reconnected)
    after = again.wait_instances(
        "the same instances READY", lambda found: ready(found, 2, node) and pids_by_id(found) == before
    )
    assert all(i.restart_count == 0 for i in after)
    assert all(alive(pid) for pid in before.values())
