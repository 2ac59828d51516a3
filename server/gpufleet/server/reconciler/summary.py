"""The DeploymentStatus the reconciler writes for one deployment. Pure, no I/O.

Phase: DRAINING while deleting; RUNNING when an instance is ready; STANDBY with no instance
and none wanted; FAILED when none is ready and one failed or crash-loops; otherwise
STARTING (also while instances wait for capacity: the message says why).
Message, most important first: a stopped rollout, instances that cannot be placed, the
failure of an instance, a rollout in progress.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gpufleet.v1 import deployment_pb2, instance_pb2

_State = instance_pb2.InstanceState
_Phase = deployment_pb2.DeploymentPhase


@dataclass(frozen=True, slots=True)
class StatusInputs:
    """What one deployment's status is made of."""

    live: Sequence[instance_pb2.Instance]
    """Instances neither draining nor lost, after this pass's decisions."""
    desired: int
    """The desired count."""
    queue_depth: int = 0
    in_flight: int = 0
    deleting: bool = False
    remaining: int = 0
    """While deleting: instance rows left."""
    blocked: str = ""
    """Why the rollout stopped; empty if it did not."""
    unplaced: str = ""
    """Why instances could not be placed; empty if all were."""
    rolling_to: int = 0
    """Generation a rollout in progress moves to; 0 when none."""
    updated: int = 0
    """Live instances already on the current spec, during a rollout."""


def deployment_status(inputs: StatusInputs) -> deployment_pb2.DeploymentStatus:
    """Summarise a deployment (see the module docstring)."""
    status = deployment_pb2.DeploymentStatus(
        queue_depth=inputs.queue_depth, in_flight=inputs.in_flight
    )
    if inputs.deleting:
        status.phase = _Phase.DEPLOYMENT_PHASE_DRAINING
        status.message = f"deleting: {inputs.remaining} instance(s) left to drain"
        return status
    ready = sum(1 for i in inputs.live if i.state == _State.INSTANCE_STATE_READY)
    failed = sorted(
        (i for i in inputs.live if i.state == _State.INSTANCE_STATE_FAILED or i.crash_loop),
        key=lambda i: i.id,
    )
    status.ready_instances = ready
    status.desired_instances = inputs.desired
    if ready > 0:
        status.phase = _Phase.DEPLOYMENT_PHASE_RUNNING
    elif not inputs.live and inputs.desired == 0:
        status.phase = _Phase.DEPLOYMENT_PHASE_STANDBY
    elif failed:
        status.phase = _Phase.DEPLOYMENT_PHASE_FAILED
    else:
        status.phase = _Phase.DEPLOYMENT_PHASE_STARTING
    if inputs.blocked:
        status.message = inputs.blocked
    elif inputs.unplaced:
        status.message = inputs.unplaced
    elif failed:
        first = failed[0]
        crash = " (crash loop)" if first.crash_loop else ""
        status.message = f"instance {first.id}: {first.reason or 'failed'}{crash}"
    elif inputs.rolling_to:
        status.message = (
            f"rolling out generation {inputs.rolling_to}: {inputs.updated} of "
            f"{inputs.desired} instance(s) updated"
        )
    return status
