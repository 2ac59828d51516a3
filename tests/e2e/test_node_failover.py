"""A node that goes away for longer than the node TTL: its instances move to the other node,
EXACTLY once (issue 3 "Done when"). Real `gpufleet server`, two `gpufleet agent` processes,
and the example model server as instances.
"""

from __future__ import annotations

import grpc
import pytest

from gpufleet.client.errors import RPCError
from gpufleet.v1 import deployment_service_pb2, instance_pb2, node_pb2
from tests.e2e.conftest import (
    ECHO_SPEC,
    ControlPlaneProc,
    Processes,
    kill_instances,
    node_id_of,
    ready,
    start_agent,
    start_server,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

NODE_TTL_S = 3


def current_revision(plane: ControlPlaneProc) -> int:
    """The store revision now: the revision of the watch's SNAPSHOT_END."""
    with plane.client() as client:
        for event in client.watch_events(0, timeout=10):
            if event.type == deployment_service_pb2.EVENT_TYPE_SNAPSHOT_END:
                return event.revision
    raise AssertionError("the watch ended without SNAPSHOT_END")


def instance_events_since(
    plane: ControlPlaneProc, revision: int, listen_for: float
) -> list[deployment_service_pb2.WatchEventsResponse]:
    """Every instance event after `revision`, listening for `listen_for` seconds of live changes."""
    events = []
    with plane.client() as client:
        try:
            for event in client.watch_events(revision, timeout=listen_for):
                if event.WhichOneof("object") == "instance":
                    events.append(event)
        except RPCError as err:
            if err.code != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise
    return events


def on_node(found: list[instance_pb2.Instance], node_id: str) -> list[instance_pb2.Instance]:
    return [i for i in found if i.node_id == node_id]


def test_instances_of_a_lost_node_move_exactly_once(processes: Processes) -> None:
    plane = start_server(
        processes, processes.tmp_path / "server", "--node-ttl", str(NODE_TTL_S), "--heartbeat-interval", "1"
    )
    agent_a, state_a = start_agent(processes, plane, "a")
    node_a = node_id_of(plane, "a")
    plane.cli("apply", "-f", str(ECHO_SPEC))
    first = plane.wait_instances("two echo instances READY on node a", lambda found: ready(found, 2, node_a))

    start_agent(processes, plane, "b")
    node_b = node_id_of(plane, "b")
    wait_for(
        "node b READY",
        lambda: any(n.id == node_b and n.state == node_pb2.NODE_STATE_READY for n in plane.nodes()),
    )
    since = current_revision(plane)

    # Node a dies with its instances, as when its machine goes down.
    agent_a.kill_group()
    kill_instances(state_a)

    moved = plane.wait_instances(
        "two replacements READY on node b",
        lambda found: ready(on_node(found, node_b), 2),
        timeout=NODE_TTL_S + 30,
    )
    replacements = on_node(moved, node_b)
    assert not {i.id for i in replacements} & {i.id for i in first}
    assert all(i.gpu_memory_reserved_mib == 2048 for i in replacements)
    lost = wait_for(
        "node a LOST",
        lambda: next((n for n in plane.nodes() if n.id == node_a and n.state == node_pb2.NODE_STATE_LOST), None),
    )
    assert lost.name == "a"

    # Exactly once: listening a few more TTLs, only the two replacements were ever created.
    events = instance_events_since(plane, since, listen_for=2 * NODE_TTL_S)
    created = sorted(
        e.instance.id
        for e in events
        if e.type == deployment_service_pb2.EVENT_TYPE_CREATED and e.instance.deployment == "echo"
    )
    assert created == sorted(i.id for i in replacements), [
        (deployment_service_pb2.EventType.Name(e.type), e.instance.id, e.instance.node_id) for e in events
    ]
    final = plane.instances("echo")
    assert ready(on_node(final, node_b), 2)
    assert {i.id for i in on_node(final, node_b)} == {i.id for i in replacements}
