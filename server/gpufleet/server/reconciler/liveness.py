"""Node liveness: which nodes are READY, SUSPECT or LOST. Pure, no I/O.

A node is judged by the silence since its last heartbeat on a monotonic clock:

* up to `suspect_after`: READY;
* up to `ttl`: SUSPECT (it takes no new instances, keeps the ones it has);
* beyond `ttl`: LOST, and its instances are replaced, except when more than half of the
  nodes are silent at the same time. Then the likelier story is that the control plane
  itself is cut off (or just restarted into a partition): rescheduling everything would
  double-book the cluster when the nodes come back, so they stay SUSPECT.

A control plane that (re)starts has heard no heartbeat yet: every known node counts as
seen at start-up, which gives each one `ttl` of grace before it can be declared lost.
LOST is sticky (it is persisted) until the node sends a heartbeat again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeAlias

from gpufleet.v1 import node_pb2

NodeStateValue: TypeAlias = node_pb2.NodeState.ValueType
READY = node_pb2.NODE_STATE_READY
SUSPECT = node_pb2.NODE_STATE_SUSPECT
LOST = node_pb2.NODE_STATE_LOST


@dataclass(frozen=True, slots=True)
class NodeSighting:
    """What the control plane knows of one node's heartbeats."""

    node_id: str
    last_heartbeat: float | None
    """Monotonic time of the last heartbeat received by this control plane process; None
    when none arrived since it started."""
    persisted_state: NodeStateValue
    """State in the store; LOST survives restarts."""


@dataclass(frozen=True, slots=True)
class LivenessSettings:
    """Thresholds of the liveness verdict."""

    ttl: float
    """Seconds of silence after which a node is lost (--node-ttl)."""
    suspect_after: float
    """Seconds of silence after which a ready node becomes SUSPECT (<= ttl)."""
    started_at: float
    """Monotonic time the control plane started: the grace period runs from there."""

    @classmethod
    def for_heartbeat(
        cls, ttl: float, heartbeat_interval: float, started_at: float
    ) -> LivenessSettings:
        """Suspect after three missed heartbeats, but never later than the TTL."""
        return cls(ttl=ttl, suspect_after=min(ttl, 3 * heartbeat_interval), started_at=started_at)


@dataclass(frozen=True, slots=True)
class LivenessVerdict:
    """The state of every node now, and the transitions that need action."""

    states: Mapping[str, NodeStateValue]
    """READY, SUSPECT or LOST per node id."""
    newly_lost: tuple[str, ...]
    """Nodes declared lost by this verdict: their instances are to be replaced."""
    returned: tuple[str, ...]
    """Nodes that were LOST and send heartbeats again."""
    held_back: tuple[str, ...]
    """Nodes silent past the TTL kept SUSPECT by the mass-silence guard."""

    def schedulable(self, node_id: str) -> bool:
        """Only READY nodes take new instances."""
        return self.states.get(node_id) == READY


def assess(
    sightings: Sequence[NodeSighting], now: float, settings: LivenessSettings
) -> LivenessVerdict:
    """Judge every node (see the module docstring for the rules)."""
    states: dict[str, NodeStateValue] = {}
    returned: list[str] = []
    candidates: list[str] = []
    silent = 0
    watched = 0
    for sighting in sorted(sightings, key=lambda s: s.node_id):
        node_id = sighting.node_id
        last = sighting.last_heartbeat
        heard = last is not None
        seen = last if last is not None else settings.started_at
        silence = now - seen
        fresh = heard and silence <= settings.suspect_after
        if sighting.persisted_state == LOST:
            if fresh:
                states[node_id] = READY
                returned.append(node_id)
            else:
                states[node_id] = LOST
            continue
        watched += 1
        if fresh:
            states[node_id] = READY
            continue
        silent += 1
        if silence <= settings.ttl:
            states[node_id] = SUSPECT
        else:
            candidates.append(node_id)
    held_back: tuple[str, ...] = ()
    newly_lost: tuple[str, ...] = ()
    if candidates and 2 * silent > watched:
        held_back = tuple(candidates)
        for node_id in candidates:
            states[node_id] = SUSPECT
    else:
        newly_lost = tuple(candidates)
        for node_id in candidates:
            states[node_id] = LOST
    return LivenessVerdict(
        states=states, newly_lost=newly_lost, returned=tuple(returned), held_back=held_back
    )
