"""Issue 5, fault 4: an agent cut off beyond the node TTL while another node has room gets
exactly one replacement per lost instance.

Cut off = SIGSTOP: the agent process freezes (no heartbeat, its TCP connection stays open)
while its instances keep running, as on a partitioned or hung machine. This differs from
tests/e2e/test_node_failover.py, where the agent and its instances are killed. Replacements
are counted from WatchEvents CREATED instance events. After SIGCONT the agent comes back:
still no further instance is created, and the deployment keeps exactly its two instances.
"""

from __future__ import annotations

import os
import signal

import pytest

from gpufleet.v1 import deployment_service_pb2, instance_pb2, node_pb2
from tests.e2e.conftest import Processes, alive, node_id_of, start_agent, wait_for
from tests.e2e.test_node_failover import current_revision, instance_events_since, on_node
from tests.reliability.conftest import READY, create, deployment, ready_instances, start_plane

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

NODE_TTL_S = 3
CREATED = deployment_service_pb2.EVENT_TYPE_CREATED


def _created(events: list[deployment_service_pb2.WatchEventsResponse]) -> list[instance_pb2.Instance]:
    return [e.instance for e in events if e.type == CREATED and e.instance.deployment == "echo"]


def test_agent_cut_off_beyond_ttl_gets_exactly_one_replacement_per_instance(processes: Processes) -> None:
    plane = start_plane(
        processes, processes.tmp_path / "server", "--node-ttl", str(NODE_TTL_S), "--heartbeat-interval", "1"
    )
    agent_a, _ = start_agent(processes, plane, "a")
    node_a = node_id_of(plane, "a")
    create(plane, deployment("echo", min_instances=2, max_instances=2))
    first = ready_instances(plane, "echo", 2)
    assert {i.node_id for i in first} == {node_a}

    start_agent(processes, plane, "b")
    node_b = node_id_of(plane, "b")
    wait_for(
        "node b READY",
        lambda: any(n.id == node_b and n.state == node_pb2.NODE_STATE_READY for n in plane.nodes()),
    )
    since = current_revision(plane)

    os.kill(agent_a.popen.pid, signal.SIGSTOP)
    try:
        moved = plane.wait_instances(
            "two replacements READY on node b",
            lambda found: len(on_node(found, node_b)) == 2
            and all(i.state == READY for i in on_node(found, node_b)),
            timeout=NODE_TTL_S + 30,
        )
        replacements = on_node(moved, node_b)
        wait_for(
            "node a LOST",
            lambda: any(n.id == node_a and n.state == node_pb2.NODE_STATE_LOST for n in plane.nodes()),
        )
        # Listening two more TTLs: only the two replacements were ever created.
        created = _created(instance_events_since(plane, since, listen_for=2 * NODE_TTL_S))
        assert sorted(i.id for i in created) == sorted(i.id for i in replacements), created
        assert not {i.id for i in replacements} & {i.id for i in first}
        assert all(alive(i.pid) for i in first), "a frozen agent's instances keep running"
    finally:
        os.kill(agent_a.popen.pid, signal.SIGCONT)

    # The agent wakes up and reconnects: nothing more is created, the old copies stop.
    wait_for(
        "node a READY again",
        lambda: any(n.id == node_a and n.state == node_pb2.NODE_STATE_READY for n in plane.nodes()),
    )
    wait_for("the lost node's instances stopped", lambda: not any(alive(i.pid) for i in first))
    created = _created(instance_events_since(plane, since, listen_for=NODE_TTL_S))
    assert sorted(i.id for i in created) == sorted(i.id for i in replacements), created
    final = plane.instances("echo")
    assert sorted(i.id for i in final) == sorted(i.id for i in replacements)
    assert all(i.state == READY and i.node_id == node_b for i in final)
    print(
        f"agent SIGSTOPped past a {NODE_TTL_S} s TTL: 2 instances lost, 2 replacements created "
        "(exactly one each), none more after it came back"
    )
