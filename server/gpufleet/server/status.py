"""Deployment status from its stored record and instances. Pure, no I/O."""

from __future__ import annotations

from collections.abc import Sequence

from gpufleet.v1 import deployment_pb2, instance_pb2

_State = instance_pb2.InstanceState
_Phase = deployment_pb2.DeploymentPhase


def compute_status(
    deployment: deployment_pb2.Deployment, instances: Sequence[instance_pb2.Instance]
) -> deployment_pb2.DeploymentStatus:
    """Summarise a deployment's instances.

    Phase order: DRAINING once deletion was requested; STANDBY with no instance; RUNNING
    when any instance is ready; FAILED when none is ready and one failed or crash-loops;
    otherwise STARTING. Desired is min_instances (0 while draining). Queue depth and
    in-flight come from gateways and stay 0 here.

    Once the reconciler has written a status (deployment.status is set), that one is
    returned instead, except while deleting: the reconciler also knows the demand, placement
    failures, rollouts and gateway load, which the instances alone do not tell.
    """
    if deployment.HasField("status") and not deployment.HasField("delete_time"):
        recorded = deployment_pb2.DeploymentStatus()
        recorded.CopyFrom(deployment.status)
        return recorded
    ready = sum(1 for i in instances if i.state == _State.INSTANCE_STATE_READY)
    failed = [
        i for i in instances if i.state == _State.INSTANCE_STATE_FAILED or i.crash_loop
    ]
    deleting = deployment.HasField("delete_time")
    status = deployment_pb2.DeploymentStatus(
        ready_instances=ready,
        desired_instances=0 if deleting else deployment.spec.scaling.min_instances,
    )
    if deleting:
        status.phase = _Phase.DEPLOYMENT_PHASE_DRAINING
        status.message = f"deleting: {len(instances)} instance(s) left to drain"
    elif not instances:
        status.phase = _Phase.DEPLOYMENT_PHASE_STANDBY
    elif ready > 0:
        status.phase = _Phase.DEPLOYMENT_PHASE_RUNNING
    elif failed:
        status.phase = _Phase.DEPLOYMENT_PHASE_FAILED
        status.message = f"instance {failed[0].id}: {failed[0].reason or 'failed'}"
    else:
        status.phase = _Phase.DEPLOYMENT_PHASE_STARTING
    return status
