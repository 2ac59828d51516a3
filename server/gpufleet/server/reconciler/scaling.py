"""How many instances a deployment should have now. Pure, no I/O.

The load-driven part is the gateway's autoscaling policy (gpufleet.gateway.autoscale), fed
with what the gateways report through ReportLoad, summed over gateways. On top of it:

* wakeups (calls that found no ready instance) ask for at least one instance at once;
* scale-out calls ask for one more instance each, beyond those the deployment has;
* the result stays within [min_instances, max_instances].

Idle release works per instance (`idle_seconds`). Gateways report, per instance, calls in
flight and seconds idle; the load board keeps the minimum over the gateways that reported
it recently (any gateway with calls in flight on it makes it busy). The idle clock only
runs while the instance is READY, so that minimum is capped by the time since it became
ready. An instance no gateway reported on (no gateway runs, or it has not seen the
instance yet), or a deployment some gateway has calls in flight on without naming the
instance, falls back to the deployment-wide rule: the clock runs from the later of the
moment the instance became ready and the last time the deployment had any load; before
the first report that moment is the control plane's start, so a restarted control plane
does not release instances whose recent traffic it never saw.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from gpufleet.gateway.autoscale import AutoscaleContext, AutoscaleState, InstanceLoad, decide
from gpufleet.gateway.config import ScalingConfig
from gpufleet.v1 import deployment_pb2


@dataclass(frozen=True, slots=True)
class Demand:
    """Load on one deployment, summed over the gateways that reported recently."""

    queue_depth: int = 0
    """Calls waiting in gateway queues."""
    in_flight: int = 0
    """Calls in flight."""
    wakeups: int = 0
    """Calls that arrived while no instance was ready, since the last pass."""
    scale_out_requests: int = 0
    """Calls with route rule scale-out, since the last pass."""
    last_busy: float = 0.0
    """Wall time the deployment last had load (or the control plane started)."""
    instance_idle: Mapping[str, float] = field(default_factory=dict)
    """Per instance some fresh gateway reported: seconds idle, the minimum over those
    gateways (0 when any has calls in flight on it)."""
    unattributed: bool = False
    """Some fresh gateway has calls in flight on the deployment without naming instances,
    so per-instance idle times cannot be trusted."""


@dataclass(frozen=True, slots=True)
class CountedInstance:
    """A live instance of the deployment (not draining, not lost)."""

    instance_id: str
    ready: bool
    ready_since: float | None = None
    """Wall time it last became ready; None if it is not ready."""


@dataclass(frozen=True, slots=True)
class ScaleMemory:
    """What the policy remembers between passes."""

    desired: int | None = None
    """The last desired count; None before the first pass."""
    autoscale: AutoscaleState = field(default_factory=AutoscaleState)
    """The gateway policy's own state (since when load is above or below target)."""


@dataclass(frozen=True, slots=True)
class ScaleDecision:
    """The desired count and why."""

    desired: int
    reason: str
    release: tuple[str, ...] = ()
    """Instances to stop first when the count goes down, best candidates first (idle past
    idle_retention, then still starting, then the idlest ready ones)."""


def idle_seconds(instance: CountedInstance, demand: Demand, now: float) -> float:
    """How long `instance` has been ready with no call in flight (`now` is wall time).

    0 while it is not ready. Per-instance gateway reports win, capped by the time since it
    became ready; without them the deployment-wide rule applies (see the module docstring).
    """
    if not instance.ready:
        return 0.0
    ready_since = now if instance.ready_since is None else instance.ready_since
    ready_for = max(0.0, now - ready_since)
    reported = demand.instance_idle.get(instance.instance_id)
    if reported is not None and not demand.unattributed:
        return min(max(0.0, reported), ready_for)
    if demand.queue_depth + demand.in_flight > 0:
        return 0.0
    return max(0.0, now - max(ready_since, demand.last_busy))


def desired_count(
    spec: deployment_pb2.DeploymentSpec,
    instances: Sequence[CountedInstance],
    demand: Demand,
    memory: ScaleMemory,
    now: float,
) -> tuple[ScaleDecision, ScaleMemory]:
    """Decide the desired count of one live deployment (`now` is wall time)."""
    low = spec.scaling.min_instances
    high = max(spec.scaling.max_instances, 1, low)
    try:
        config = ScalingConfig.from_spec(spec.scaling, spec.traffic)
    except ValueError as err:
        # Stored specs are validated, so this is a spec from an older, laxer version.
        desired = max(low, min(high, memory.desired or low))
        return ScaleDecision(desired, f"scaling spec not usable ({err})"), memory
    # A rolling update runs surge instances on top of the wanted ones; counting them as
    # wanted would ratchet the count up by the surge on every update.
    counted = list(instances)
    if memory.desired is not None:
        counted = sorted(counted, key=lambda i: (not i.ready, i.instance_id))[: memory.desired]
    loads = [
        InstanceLoad(instance_id=i.instance_id, ready=i.ready, idle_s=idle_seconds(i, demand, now))
        for i in counted
    ]
    decision, state = decide(
        AutoscaleContext(
            config=config,
            instances=loads,
            in_flight=demand.in_flight,
            queued=demand.queue_depth,
            now=now,
        ),
        memory.autoscale,
    )
    desired, reason = decision.desired, decision.reason
    if demand.wakeups > 0 and desired < 1:
        desired, reason = 1, f"{demand.wakeups} call(s) waiting for an instance"
    if demand.scale_out_requests > 0:
        wanted = max(desired, len(counted)) + demand.scale_out_requests
        if wanted > desired:
            desired, reason = wanted, f"{demand.scale_out_requests} scale-out call(s)"
    bounded = max(low, min(high, desired))
    if bounded != desired:
        reason = f"{reason}; bounded to [{low}, {high}]"
    return (
        ScaleDecision(bounded, reason, release=decision.release),
        ScaleMemory(desired=bounded, autoscale=state),
    )
