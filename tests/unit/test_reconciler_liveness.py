"""Node liveness verdicts: grace period, TTL, mass-silence guard, lost nodes coming back."""

from __future__ import annotations

import pytest

from gpufleet.server.reconciler.liveness import (
    LOST,
    READY,
    SUSPECT,
    LivenessSettings,
    NodeSighting,
    assess,
)
from gpufleet.v1 import node_pb2

TTL = 15.0
SETTINGS = LivenessSettings(ttl=TTL, suspect_after=6.0, started_at=100.0)
UNSET = node_pb2.NODE_STATE_UNSPECIFIED


def sighting(
    node_id: str, last: float | None, persisted: node_pb2.NodeState.ValueType = READY
) -> NodeSighting:
    return NodeSighting(node_id=node_id, last_heartbeat=last, persisted_state=persisted)


@pytest.mark.parametrize(
    ("name", "nodes", "now", "states", "newly_lost", "held_back"),
    [
        ("fresh", [sighting("a", 199.0), sighting("b", 195.0)], 200.0,
         {"a": READY, "b": READY}, (), ()),
        ("missed some heartbeats", [sighting("a", 190.0), sighting("b", 199.0)], 200.0,
         {"a": SUSPECT, "b": READY}, (), ()),
        ("silent past the ttl, one of two", [sighting("a", 180.0), sighting("b", 199.0)], 200.0,
         {"a": LOST, "b": READY}, ("a",), ()),
        ("exactly half silent is not more than half",
         [sighting("a", 150.0), sighting("b", 150.0), sighting("c", 199.0), sighting("d", 199.0)],
         200.0, {"a": LOST, "b": LOST, "c": READY, "d": READY}, ("a", "b"), ()),
        ("two of three silent: guard",
         [sighting("a", 150.0), sighting("b", 150.0), sighting("c", 199.0)], 200.0,
         {"a": SUSPECT, "b": SUSPECT, "c": READY}, (), ("a", "b")),
        ("a suspect node counts as silent for the guard",
         [sighting("a", 150.0), sighting("b", 190.0), sighting("c", 199.0)], 200.0,
         {"a": SUSPECT, "b": SUSPECT, "c": READY}, (), ("a",)),
        ("single silent node: guard", [sighting("a", 150.0)], 200.0, {"a": SUSPECT}, (), ("a",)),
        ("lost nodes do not count",
         [sighting("a", None, LOST), sighting("b", 150.0), sighting("c", 199.0)], 200.0,
         {"a": LOST, "b": LOST, "c": READY}, ("b",), ()),
        ("grace: no heartbeat since start, within ttl",
         [sighting("a", None), sighting("b", 109.0)], 110.0,
         {"a": SUSPECT, "b": READY}, (), ()),
        ("grace over: never came back",
         [sighting("a", None), sighting("b", 120.0)], 120.0,
         {"a": LOST, "b": READY}, ("a",), ()),
        ("first registration, never heard", [sighting("a", None, UNSET), sighting("b", 104.0)],
         105.0, {"a": SUSPECT, "b": READY}, (), ()),
    ],
)  # fmt: skip
def test_assess(
    name: str,
    nodes: list[NodeSighting],
    now: float,
    states: dict[str, int],
    newly_lost: tuple[str, ...],
    held_back: tuple[str, ...],
) -> None:
    verdict = assess(nodes, now, SETTINGS)
    assert dict(verdict.states) == states, name
    assert verdict.newly_lost == newly_lost, name
    assert verdict.held_back == held_back, name
    assert verdict.returned == (), name


def test_restart_grace_gives_every_node_the_ttl() -> None:
    # Right after a restart nobody has reported: all silent, but within the grace period
    # nothing is lost, and past it the guard still holds (all of them are silent).
    nodes = [sighting("a", None), sighting("b", None)]
    assert set(assess(nodes, 101.0, SETTINGS).states.values()) == {SUSPECT}
    late = assess(nodes, 100.0 + TTL + 1, SETTINGS)
    assert late.newly_lost == () and late.held_back == ("a", "b")


def test_lost_is_sticky_until_a_fresh_heartbeat() -> None:
    stale = assess([sighting("a", 150.0, LOST), sighting("b", 199.0)], 200.0, SETTINGS)
    assert stale.states["a"] == LOST and stale.newly_lost == () and stale.returned == ()
    back = assess([sighting("a", 199.5, LOST), sighting("b", 199.0)], 200.0, SETTINGS)
    assert back.states["a"] == READY and back.returned == ("a",)
    assert back.schedulable("a") and not stale.schedulable("a")


def test_suspect_after_is_three_heartbeats_capped_by_ttl() -> None:
    assert LivenessSettings.for_heartbeat(15.0, 2.0, 0.0).suspect_after == 6.0
    assert LivenessSettings.for_heartbeat(2.0, 1.0, 0.0).suspect_after == 2.0
