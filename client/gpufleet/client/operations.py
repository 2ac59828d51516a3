"""Pure decisions shared by Client and AsyncClient: apply outcomes, label selectors and
waiting for a deletion in an event stream. No I/O here."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from gpufleet.v1 import deployment_pb2, deployment_service_pb2


class ApplyAction(enum.Enum):
    """What apply did to one deployment."""

    CREATED = "created"
    UPDATED = "updated"
    UNCHANGED = "unchanged"


@dataclass(frozen=True)
class ApplyResult:
    """Outcome of ``apply`` for one deployment."""

    action: ApplyAction
    """Whether the deployment was created, updated or already as desired."""
    deployment: deployment_pb2.Deployment
    """The deployment as stored after apply."""
    invoke_token: str | None = None
    """Invoke token, only on create: the server shows it this one time."""


def same_desired_state(
    stored: deployment_pb2.Deployment, desired: deployment_pb2.Deployment
) -> bool:
    """True when applying ``desired`` over ``stored`` would change nothing the user set."""
    return dict(stored.labels) == dict(desired.labels) and stored.spec == desired.spec


def update_action(
    before: deployment_pb2.Deployment, after: deployment_pb2.Deployment
) -> ApplyAction:
    """Classify an update by what the server stored: the server may fill defaults into the
    spec, so a spec that differs locally can still leave the stored deployment as it was."""
    if after.generation == before.generation and dict(after.labels) == dict(before.labels):
        return ApplyAction.UNCHANGED
    return ApplyAction.UPDATED


def label_selector(labels: str | Mapping[str, str] | None) -> str:
    """The server's selector syntax "k1=v1,k2=v2" from a mapping (or a ready string)."""
    if labels is None:
        return ""
    if isinstance(labels, str):
        return labels
    return ",".join(f"{key}={value}" for key, value in sorted(labels.items()))


def desired_for_update(desired: deployment_pb2.Deployment) -> deployment_pb2.Deployment:
    """Only the fields an update sends: name, labels and spec."""
    return deployment_pb2.Deployment(
        name=desired.name, labels=dict(desired.labels), spec=desired.spec
    )


class DeletionTracker:
    """Follows a WatchEvents stream until one deployment is gone.

    From revision 0 the stream starts with a snapshot: a name missing from it is already
    gone. From a later revision a DELETED event for the name ends the wait.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._in_snapshot = False

    def done(self, event: deployment_service_pb2.WatchEventsResponse) -> bool:
        """Feed the next event; True once the deployment is known to be gone."""
        is_ours = event.WhichOneof("object") == "deployment" and event.deployment.name == self._name
        if event.type == deployment_service_pb2.EVENT_TYPE_SNAPSHOT:
            self._in_snapshot = self._in_snapshot or is_ours
            return False
        if event.type == deployment_service_pb2.EVENT_TYPE_SNAPSHOT_END:
            return not self._in_snapshot
        return is_ours and event.type == deployment_service_pb2.EVENT_TYPE_DELETED
