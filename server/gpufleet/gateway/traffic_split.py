"""Weighted choice of a deployment inside a service (canary, blue/green).

Two selectors over the same weights (0-1000 each; 0 takes no traffic):

- `choose_weighted`: independent random draws; deterministic for a given random source.
  Each gateway draws on its own, so several gateways need no coordination.
- `smooth_weighted_choice`: nginx's smooth weighted round robin. Over any window of
  sum(weights) calls each deployment gets exactly its share, interleaved rather than in
  runs (90/10 sends 1 call in 10 to the canary, not 100 in a row).

Both return None when every weight is 0: the service has nowhere to send the call.
Targets are considered in name order, so the result never depends on the input order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from gpufleet.gateway.routing import RandomSource

MAX_WEIGHT = 1000


@dataclass(frozen=True, slots=True)
class WeightedTarget:
    """A deployment and its weight inside the service."""

    name: str
    """Deployment name."""
    weight: int
    """Share of the service's traffic, 0-1000, relative to the other weights."""


@dataclass(frozen=True, slots=True)
class SmoothState:
    """Smooth round robin memory: each deployment's current weight."""

    current: tuple[tuple[str, int], ...] = field(default=())
    """(deployment, current weight) pairs in name order."""


def choose_weighted(targets: Sequence[WeightedTarget], rng: RandomSource) -> str | None:
    """Draw one deployment with probability weight / sum(weights)."""
    ordered = _validated(targets)
    total = sum(t.weight for t in ordered)
    if total == 0:
        return None
    point = rng.random() * total
    cumulative = 0
    for target in ordered:
        cumulative += target.weight
        if point < cumulative:
            return target.name
    # rng.random() < 1 keeps point below total; this guards a source that returns 1.0.
    return next(t.name for t in reversed(ordered) if t.weight > 0)


def smooth_weighted_choice(
    targets: Sequence[WeightedTarget], state: SmoothState
) -> tuple[str | None, SmoothState]:
    """Pick the next deployment by smooth weighted round robin; returns it and the new state.

    Deployments absent from `targets` are forgotten; new ones start at current weight 0.
    """
    ordered = [t for t in _validated(targets) if t.weight > 0]
    if not ordered:
        return None, SmoothState()
    previous = dict(state.current)
    total = sum(t.weight for t in ordered)
    current = {t.name: previous.get(t.name, 0) + t.weight for t in ordered}
    # max() keeps the first of equal values, and `ordered` is in name order.
    chosen = max(ordered, key=lambda t: current[t.name]).name
    current[chosen] -= total
    return chosen, SmoothState(tuple((t.name, current[t.name]) for t in ordered))


def _validated(targets: Sequence[WeightedTarget]) -> list[WeightedTarget]:
    seen: set[str] = set()
    for target in targets:
        if not 0 <= target.weight <= MAX_WEIGHT:
            raise ValueError(
                f"weight of deployment {target.name!r} must be 0-{MAX_WEIGHT}, "
                f"got {target.weight}"
            )
        if target.name in seen:
            raise ValueError(
                f"deployment {target.name!r} appears twice in one service split; "
                "give each deployment one weight"
            )
        seen.add(target.name)
    return sorted(targets, key=lambda t: t.name)
