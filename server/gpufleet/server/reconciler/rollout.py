"""Which instances of one deployment to start and to stop in this pass. Pure, no I/O.

Without an update in progress this is plain scaling: start the missing instances, stop the
surplus (failed first, then those the scaling policy chose to release, in its order, then
those not ready yet, then the newest ready ones).

A rolling update runs while some live instances run an outdated spec. As in Kubernetes'
deployment controller, with N the desired count:

* at most N + surge instances exist at once, so new ones start only into that room;
* at least N - unavailable instances stay ready, so an old ready instance stops only when
  another ready one makes up for it (old instances that are not ready stop at once: they
  serve nothing);
* a new instance that fails or crash-loops stops the rollout: nothing more starts or stops
  and the old instances keep serving until the spec is fixed (the next update starts a new
  rollout, in which the failed instances are old and not ready).

"Outdated" compares only what the instance process sees (`runtime_spec`): scaling, traffic,
rollout, spread and service changes bump the generation but restart nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from gpufleet.server.spec_defaults import DEFAULT_MAX_SURGE_PERCENT
from gpufleet.v1 import deployment_pb2


@dataclass(frozen=True, slots=True)
class Member:
    """A live instance of the deployment (not draining, not lost)."""

    instance_id: str
    current: bool
    """Runs the deployment's current runtime spec."""
    ready: bool
    """Passes readiness."""
    failed: bool
    """FAILED or crash-looping."""
    created: float
    """Creation time, for choosing which to stop (any clock; only the order matters)."""


@dataclass(frozen=True, slots=True)
class Step:
    """What to do with one deployment now."""

    start: int = 0
    """New instances (current spec) to place."""
    stop: tuple[str, ...] = ()
    """Instances to drain, in order."""
    rollout: bool = False
    """An update is in progress (some live instance runs an outdated spec)."""
    blocked: str = ""
    """Why the rollout stopped; empty when it did not."""


@dataclass(frozen=True, slots=True)
class RolloutLimits:
    """max surge and max unavailable as instance counts."""

    surge: int
    unavailable: int


def rollout_limits(spec: deployment_pb2.DeploymentSpec) -> RolloutLimits:
    """Percentages of max(min_instances, 1): surge rounded up, unavailable down.

    Both 0 (possible after rounding) could never make progress, so surge becomes 1 then.
    """
    base = max(spec.scaling.min_instances, 1)
    surge_percent = (
        spec.rollout.max_surge_percent
        if spec.rollout.HasField("max_surge_percent")
        else DEFAULT_MAX_SURGE_PERCENT
    )
    surge = math.ceil(surge_percent * base / 100)
    unavailable = math.floor(spec.rollout.max_unavailable_percent * base / 100)
    if surge == 0 and unavailable == 0:
        surge = 1
    return RolloutLimits(surge=surge, unavailable=unavailable)


def runtime_spec(spec: deployment_pb2.DeploymentSpec) -> deployment_pb2.DeploymentSpec:
    """The part of a spec that its instances run: without scaling, traffic, rollout, spread
    policy and service, which the control plane and gateways apply."""
    runtime = deployment_pb2.DeploymentSpec()
    runtime.CopyFrom(spec)
    for name in ("scaling", "traffic", "rollout", "spread_policy", "service", "service_weight"):
        runtime.ClearField(name)
    return runtime


def same_runtime(a: deployment_pb2.DeploymentSpec, b: deployment_pb2.DeploymentSpec) -> bool:
    """True when instances of `a` need no restart to run `b`."""
    return runtime_spec(a) == runtime_spec(b)


def stop_order(members: Sequence[Member], prefer: Sequence[str] = ()) -> list[Member]:
    """Best candidates to stop first: failed, then those in `prefer` (in its order), then
    not ready, then ready; newest first."""
    rank = {instance_id: index for index, instance_id in enumerate(prefer)}
    return sorted(
        members,
        key=lambda m: (
            not m.failed,
            rank.get(m.instance_id, len(rank)),
            m.ready,
            -m.created,
            m.instance_id,
        ),
    )


def plan_step(
    members: Sequence[Member],
    desired: int,
    limits: RolloutLimits,
    prefer_stop: Sequence[str] = (),
) -> Step:
    """Decide starts and stops for one live deployment (see the module docstring).

    prefer_stop: the instances the scaling policy would release first (idle ones), so that a
    scale-down drains an idle instance rather than a busy one.
    """
    current = [m for m in members if m.current]
    outdated = [m for m in members if not m.current]
    if not outdated:
        if len(members) < desired:
            return Step(start=desired - len(members))
        surplus = len(members) - desired
        ordered = stop_order(members, prefer_stop)
        return Step(stop=tuple(m.instance_id for m in ordered[:surplus]))

    failed_new = sorted((m for m in current if m.failed), key=lambda m: m.instance_id)
    if failed_new:
        return Step(
            rollout=True,
            blocked=(
                f"rollout stopped: new instance {failed_new[0].instance_id} failed; "
                f"{len(outdated)} instance(s) of the previous spec keep serving; fix the "
                "spec and update the deployment again"
            ),
        )
    if len(current) > desired:
        surplus = len(current) - desired
        stop = [m.instance_id for m in stop_order(current)[:surplus]]
        stop += [m.instance_id for m in outdated if not m.ready]
        return Step(stop=tuple(stop), rollout=True)

    min_available = max(0, desired - limits.unavailable)
    room = desired + limits.surge - len(members)
    start = max(0, min(room, desired - len(current)))
    stop = [m.instance_id for m in sorted(outdated, key=lambda m: m.instance_id) if not m.ready]
    available = sum(1 for m in members if m.ready)
    budget = available - min_available
    old_ready = sorted((m for m in outdated if m.ready), key=lambda m: (m.created, m.instance_id))
    stop += [m.instance_id for m in old_ready[: max(0, budget)]]
    return Step(start=start, stop=tuple(stop), rollout=True)
