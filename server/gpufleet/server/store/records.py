"""Plain values the store hands out. Protobuf messages are fresh copies owned by the caller."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from gpufleet.v1 import deployment_pb2, instance_pb2


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
    """A stored deployment: the Deployment message (status left unset: it is computed from
    instances when served) plus the server-only invoke token hash."""

    deployment: deployment_pb2.Deployment
    """Name, labels, spec (with defaults), revision, generation, timestamps."""
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
