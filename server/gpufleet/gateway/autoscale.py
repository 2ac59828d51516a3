"""Autoscaling policy: a pure function from load and instances to a desired count.

In the style of Ray Serve's policies, `decide(context, state) -> (decision, state)`: all
time comes from `context.now`, and `state` carries the only memory (since when load has been
above or below target), so the caller stores it between calls.

The rules, in order:

1. Zero instances: any call in flight or queued asks for one instance at once, whatever
   scale_up_delay says (scale from zero); with no load the count is min_instances.
2. Load: `need = ceil((in_flight + queued) / target_concurrency)`. Above the current count
   for scale_up_delay -> scale up to need; below it for scale_down_delay -> scale down to
   need, but load alone never goes below one instance.
3. Idle release: ready instances idle for idle_retention may be released, down to
   max(min_instances, need). This is the only way to reach zero instances, so a deployment
   at zero always had its last instance idle for idle_retention.
4. Bounds: never below min_instances, never above max_instances, with no delay.

When the decision is below the current count, `release` names exactly the instances to
stop, best candidates first: instances idle past idle_retention (idlest first), then those
still starting (they have no calls and no warm state), then the other ready instances,
idlest first; ties by id. Busy instances chosen this way should be drained, not killed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from gpufleet.gateway.config import ScalingConfig

# Guards ceil() against float noise: 3 calls at target 0.1 must need 30, not 31.
_EPSILON = 1e-9


@dataclass(frozen=True, slots=True)
class InstanceLoad:
    """One instance of the deployment (ready or starting)."""

    instance_id: str
    """Instance id."""
    ready: bool
    """True once it passes readiness; False while it starts."""
    idle_s: float = 0.0
    """Seconds it has been ready with no call in flight. The idle clock runs only while the
    instance is ready and idle: 0 while starting or busy."""


@dataclass(frozen=True, slots=True)
class AutoscaleContext:
    """What the policy looks at for one deployment."""

    config: ScalingConfig
    """Bounds, target and delays."""
    instances: Sequence[InstanceLoad]
    """Current instances, ready and starting (draining ones excluded)."""
    in_flight: int
    """Calls in flight on the deployment."""
    queued: int
    """Calls waiting in the deployment's queues."""
    now: float
    """Current time, seconds on a monotonic clock (the same one as in the state)."""


@dataclass(frozen=True, slots=True)
class AutoscaleState:
    """Memory between decisions."""

    above_since: float | None = None
    """Since when load has needed more instances than there are; None if it does not."""
    below_since: float | None = None
    """Since when load has needed fewer instances than there are; None if it does not."""


@dataclass(frozen=True, slots=True)
class AutoscaleDecision:
    """The policy's answer."""

    desired: int
    """Instances the deployment should have."""
    release: tuple[str, ...]
    """Instances to stop, `max(0, current - desired)` of them, in the order to stop them."""
    reason: str
    """Why, for logs and status messages."""


def decide(
    context: AutoscaleContext, state: AutoscaleState
) -> tuple[AutoscaleDecision, AutoscaleState]:
    """Decide the desired instance count and which instances to release."""
    config = context.config
    instances = context.instances
    current = len(instances)
    load = context.in_flight + context.queued
    need = _need(load, config.target_concurrency)
    floor = config.min_instances

    if current == 0:
        if load > 0:
            desired = _clamp(max(1, floor), config)
            reason = f"scale from zero: {load} call(s) and no instance"
        else:
            desired = _clamp(floor, config)
            reason = "no load" if desired == 0 else f"keep min_instances={floor}"
        return AutoscaleDecision(desired, (), reason), AutoscaleState()

    above_since = state.above_since
    below_since = state.below_since
    if need > current:
        above_since = context.now if above_since is None else above_since
        below_since = None
        held = context.now - above_since
        if held >= config.scale_up_delay_s:
            by_load = need
            reason = f"load {load} needs {need} instance(s)"
        else:
            by_load = current
            reason = (
                f"load {load} needs {need} instance(s); scale_up_delay "
                f"{config.scale_up_delay_s:g}s not reached ({held:g}s)"
            )
    elif need < current:
        below_since = context.now if below_since is None else below_since
        above_since = None
        held = context.now - below_since
        if held >= config.scale_down_delay_s:
            by_load = max(need, 1)
            reason = f"load {load} needs {need} instance(s)"
        else:
            by_load = current
            reason = (
                f"load {load} needs {need} instance(s); scale_down_delay "
                f"{config.scale_down_delay_s:g}s not reached ({held:g}s)"
            )
    else:
        above_since = None
        below_since = None
        by_load = current
        reason = f"load {load} fits {current} instance(s)"

    idle = [i for i in instances if i.ready and i.idle_s >= config.idle_retention_s]
    after_idle = max(floor, need, current - len(idle))
    if after_idle < by_load:
        reason = (
            f"{current - after_idle} instance(s) idle for idle_retention "
            f"{config.idle_retention_s:g}s"
        )
    desired = _clamp(min(by_load, after_idle), config)
    if desired != min(by_load, after_idle):
        reason = f"{reason}; bounded to [{floor}, {config.max_instances}]"
    release = _release_order(instances, config.idle_retention_s)[: max(0, current - desired)]
    return (
        AutoscaleDecision(desired, tuple(release), reason),
        AutoscaleState(above_since=above_since, below_since=below_since),
    )


def _need(load: int, target: float) -> int:
    if load <= 0:
        return 0
    return max(1, math.ceil(load / target - _EPSILON))


def _clamp(count: int, config: ScalingConfig) -> int:
    return max(config.min_instances, min(config.max_instances, count))


def _release_order(instances: Sequence[InstanceLoad], idle_retention_s: float) -> list[str]:
    def rank(instance: InstanceLoad) -> tuple[int, float, str]:
        if instance.ready and instance.idle_s >= idle_retention_s:
            group = 0
        elif not instance.ready:
            group = 1
        else:
            group = 2
        return (group, -instance.idle_s, instance.instance_id)

    return [i.instance_id for i in sorted(instances, key=rank)]
