"""The route a gateway needs for one deployment. Pure, no I/O.

Endpoints: instances that pass readiness and have an address; draining instances (or all
of them, once the deployment is being deleted) stay listed with draining = true while they
still run, so gateways finish their calls and send no new ones; lost, stopped and failed
instances are left out.
"""

from __future__ import annotations

from collections.abc import Iterable

from gpufleet.server.store import DeploymentRecord, InstanceRecord
from gpufleet.v1 import instance_pb2, routing_service_pb2 as pb

_State = instance_pb2.InstanceState


def endpoints(records: Iterable[InstanceRecord], deleting: bool) -> list[pb.Endpoint]:
    """The endpoints of one deployment's instances, by instance id."""
    out: list[pb.Endpoint] = []
    for record in sorted(records, key=lambda r: r.instance.id):
        instance = record.instance
        if record.lost or not instance.address:
            continue
        draining = deleting or record.draining or instance.state == _State.INSTANCE_STATE_DRAINING
        ready = instance.state == _State.INSTANCE_STATE_READY
        was_ready = instance.HasField("ready_time") and instance.state in (
            _State.INSTANCE_STATE_READY,
            _State.INSTANCE_STATE_DRAINING,
        )
        if (ready and not draining) or (draining and was_ready):
            out.append(
                pb.Endpoint(
                    instance_id=instance.id,
                    address=instance.address,
                    node_id=instance.node_id,
                    draining=draining,
                )
            )
    return out


def deployment_route(
    record: DeploymentRecord, instances: Iterable[InstanceRecord]
) -> pb.DeploymentRoute:
    """Everything a gateway needs to serve one deployment."""
    deployment = record.deployment
    spec = deployment.spec
    return pb.DeploymentRoute(
        deployment=deployment.name,
        endpoints=endpoints(instances, deployment.HasField("delete_time")),
        traffic=spec.traffic,
        scaling=spec.scaling,
        service=spec.service,
        service_weight=spec.service_weight,
        invoke_token_sha256=record.invoke_token_sha256,
    )
