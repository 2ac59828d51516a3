"""Plain values the store hands out. Protobuf messages are fresh copies owned by the caller."""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from gpufleet.v1 import deployment_pb2, instance_pb2, node_pb2


class ChangeType(enum.StrEnum):
    """What a logged change did to its object."""

    CREATED = "CREATED"
    UPDATED = "UPDATED"
    DELETED = "DELETED"


class ObjectKind(enum.StrEnum):
    """Which kind of object a logged change is about."""

    DEPLOYMENT = "deployment"
    INSTANCE = "instance"


@dataclass(frozen=True)
class DeploymentRecord:
    """A stored deployment: the Deployment message plus the server-only invoke token hash."""

    deployment: deployment_pb2.Deployment
    """Name, labels, spec (with defaults), revision, generation, timestamps, and the status
    the reconciler last wrote (unset until it writes one; then it is served as is)."""
    invoke_token_sha256: str
    """Lowercase hex SHA-256 of the invoke token; the token itself is never stored."""


@dataclass(frozen=True)
class DeploymentPage:
    """One page of deployments ordered by name."""

    deployments: list[DeploymentRecord]
    """At most page_size records."""
    next_page_token: str
    """Opaque token for the next page; empty on the last page."""


@dataclass(frozen=True)
class DeleteResult:
    """Outcome of a delete request."""

    record: DeploymentRecord
    """The deployment with delete_time set (as it was at removal when `removed`)."""
    removed: bool
    """True when it had no instance and is already gone."""


@dataclass(frozen=True)
class StoredEvent:
    """One entry of the change log."""

    revision: int
    """Store revision of the change; unique and increasing."""
    type: ChangeType
    """What happened."""
    kind: ObjectKind
    """Object kind; says how to parse payload."""
    name: str
    """Deployment name or instance id."""
    payload: bytes
    """The object as of the change: a serialized Deployment (status unset) or Instance."""

    def deployment(self) -> deployment_pb2.Deployment:
        """Parse the payload of a deployment event."""
        return deployment_pb2.Deployment.FromString(self.payload)

    def instance(self) -> instance_pb2.Instance:
        """Parse the payload of an instance event."""
        return instance_pb2.Instance.FromString(self.payload)


@dataclass(frozen=True)
class Snapshot:
    """Every deployment and instance as of one revision."""

    revision: int
    """The store revision the snapshot reflects."""
    deployments: list[DeploymentRecord]
    """All deployments, by name."""
    instances: list[instance_pb2.Instance]
    """All instances, by deployment then id."""


@dataclass(frozen=True)
class InstanceRecord:
    """A stored instance with what only the control plane knows about it."""

    instance: instance_pb2.Instance
    """The instance as ListInstances shows it."""
    spec: deployment_pb2.DeploymentSpec
    """The deployment spec the instance was created with (what its node runs)."""
    draining: bool
    """The control plane told its node to stop it; the row goes once the node reports it
    stopped or no longer reports it."""
    lost: bool
    """Its node was declared lost and the instance was replaced; it is sent to no node."""


@dataclass(frozen=True)
class NodeRecord:
    """A stored node and the hash of its secret."""

    node: node_pb2.Node
    """The node as last persisted (GPU readings are the last persisted ones, not live)."""
    secret_sha256: str
    """Lowercase hex SHA-256 of the node secret."""


@dataclass(frozen=True)
class JoinTokenRecord:
    """A stored join token (its hash only)."""

    token_sha256: str
    """Lowercase hex SHA-256 of the token."""
    create_time_us: int
    """When it was created, microseconds since the epoch."""
    expire_time_us: int | None
    """When it stops being accepted; None never."""


@dataclass(frozen=True)
class ClusterRecords:
    """Deployments, instances and nodes, consistent as of one revision: the reconciler's
    input."""

    revision: int
    """The store revision the read reflects."""
    deployments: list[DeploymentRecord]
    """All deployments, by name."""
    instances: list[InstanceRecord]
    """All instances, by deployment then id."""
    nodes: list[NodeRecord]
    """All nodes, by id."""


@dataclass(frozen=True)
class InstanceReport:
    """What a node's agent says about one of its instances (heartbeat InstanceStatus)."""

    instance_id: str
    state: instance_pb2.InstanceState.ValueType
    reason: str
    pid: int
    address: str
    """"host:port" gateways dial; empty while the instance has no port."""
    restart_count: int
    crash_loop: bool
    gpu_memory_used_mib: int
    sm_utilization_percent: int
    gpu_memory_overrun: bool


@dataclass(frozen=True)
class NewInstance:
    """An instance the reconciler placed: stored PENDING before its node hears of it."""

    instance: instance_pb2.Instance
    """Id, deployment, generation, node, GPUs, reserved memory; state PENDING."""
    spec: deployment_pb2.DeploymentSpec
    """The deployment spec it runs."""


@dataclass(frozen=True)
class InstanceMark:
    """An instance to flag (draining or lost), with the reason shown in ListInstances."""

    instance_id: str
    reason: str


@dataclass(frozen=True)
class StatusWrite:
    """The reconciler's view of one deployment."""

    name: str
    observed_generation: int
    status: deployment_pb2.DeploymentStatus


@dataclass(frozen=True)
class ReconcileBatch:
    """Everything one reconciler pass changes, applied in one transaction, in this order:
    node states, lost marks, drain marks, deletions, creations, purges, status writes."""

    node_states: Mapping[str, node_pb2.NodeState.ValueType] = field(default_factory=dict)
    """New persisted state per node id (only LOST and READY are persisted)."""
    lost: Sequence[InstanceMark] = ()
    """Instances of lost nodes: marked lost (state FAILED) once; never sent to a node again."""
    drain: Sequence[InstanceMark] = ()
    """Instances to stop gracefully (state DRAINING while it still ran)."""
    delete: Sequence[str] = ()
    """Instance rows to remove (stopped, gone from their node, or lost and settled)."""
    create: Sequence[NewInstance] = ()
    """New instances, PENDING."""
    purge: Sequence[str] = ()
    """Deployments being deleted that have no instance left (after the deletions above)."""
    status: Sequence[StatusWrite] = ()
    """Status and observed generation per deployment; written only where they changed."""

    @property
    def empty(self) -> bool:
        """Nothing to write."""
        return not (
            self.node_states
            or self.lost
            or self.drain
            or self.delete
            or self.create
            or self.purge
            or self.status
        )
