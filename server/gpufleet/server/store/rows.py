"""Rows of the SQLite schema to and from protobuf messages (pure: no I/O).

The column lists fix the order `*_from_row` expects; every SELECT names them explicitly.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from google.protobuf import timestamp_pb2

from gpufleet.server.store.records import DeploymentRecord, InstanceRecord
from gpufleet.v1 import deployment_pb2, instance_pb2, node_pb2

DEPLOYMENT_COLUMNS = (
    "name, labels, spec, revision, generation, observed_generation, create_time_us, "
    "update_time_us, delete_time_us, invoke_token_sha256, status"
)
INSTANCE_COLUMNS = (
    "id, deployment, node_id, generation, state, reason, gpu_uuids, address, pid, "
    "restart_count, crash_loop, gpu_memory_reserved_mib, gpu_memory_used_mib, "
    "sm_utilization_percent, gpu_memory_overrun, create_time_us, update_time_us, "
    "ready_time_us, spec"
)
NODE_COLUMNS = (
    "id, name, labels, state, cpu_millis, memory_mib, agent_version, advertise_host, gpus, "
    "last_heartbeat_us"
)
INSTANCE_RECORD_COLUMNS = INSTANCE_COLUMNS + ", draining, lost"


def deployment_from_row(row: Iterable[Any]) -> DeploymentRecord:
    (
        name,
        labels,
        spec,
        revision,
        generation,
        observed_generation,
        create_us,
        update_us,
        delete_us,
        token_hash,
        status,
    ) = tuple(row)
    deployment = deployment_pb2.Deployment(
        name=name,
        labels=json.loads(labels),
        spec=deployment_pb2.DeploymentSpec.FromString(spec),
        revision=revision,
        generation=generation,
        observed_generation=observed_generation,
        create_time=timestamp(create_us),
        update_time=timestamp(update_us),
    )
    if delete_us is not None:
        deployment.delete_time.CopyFrom(timestamp(delete_us))
    if status is not None:
        deployment.status.CopyFrom(deployment_pb2.DeploymentStatus.FromString(status))
    return DeploymentRecord(deployment, str(token_hash))


def instance_from_row(row: Iterable[Any]) -> instance_pb2.Instance:
    (
        instance_id,
        deployment,
        node_id,
        generation,
        state,
        reason,
        gpu_uuids,
        address,
        pid,
        restart_count,
        crash_loop,
        reserved,
        used,
        sm,
        overrun,
        create_us,
        _update_us,
        ready_us,
        _spec,
    ) = tuple(row)
    instance = instance_pb2.Instance(
        id=instance_id,
        deployment=deployment,
        generation=generation,
        node_id=node_id,
        gpu_uuids=json.loads(gpu_uuids),
        state=state,
        reason=reason,
        address=address,
        pid=pid,
        restart_count=restart_count,
        crash_loop=bool(crash_loop),
        gpu_memory_reserved_mib=reserved,
        gpu_memory_used_mib=used,
        sm_utilization_percent=sm,
        gpu_memory_overrun=bool(overrun),
        create_time=timestamp(create_us),
    )
    if ready_us is not None:
        instance.ready_time.CopyFrom(timestamp(ready_us))
    return instance


def instance_record_from_row(row: Sequence[Any]) -> InstanceRecord:
    values = tuple(row)
    *instance_values, draining, lost = values
    spec = deployment_pb2.DeploymentSpec.FromString(instance_values[-1])
    return InstanceRecord(
        instance=instance_from_row(instance_values),
        spec=spec,
        draining=bool(draining),
        lost=bool(lost),
    )


def node_from_row(row: Iterable[Any]) -> node_pb2.Node:
    (
        node_id,
        name,
        labels,
        state,
        cpu_millis,
        memory_mib,
        agent_version,
        advertise_host,
        gpus,
        heartbeat_us,
    ) = tuple(row)
    node = node_pb2.Node(
        id=node_id,
        name=name,
        labels=json.loads(labels),
        state=state,
        gpus=node_pb2.Node.FromString(gpus).gpus,
        cpu_millis=cpu_millis,
        memory_mib=memory_mib,
        agent_version=agent_version,
        advertise_host=advertise_host,
    )
    if heartbeat_us is not None:
        node.last_heartbeat_time.CopyFrom(timestamp(heartbeat_us))
    return node


def labels_json(labels: Mapping[str, str]) -> str:
    return json.dumps(dict(sorted(labels.items())), separators=(",", ":"))


def timestamp(micros: int) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromMicroseconds(micros)
    return ts


def micros(ts: timestamp_pb2.Timestamp) -> int:
    return int(ts.ToMicroseconds())
