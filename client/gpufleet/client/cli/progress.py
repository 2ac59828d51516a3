"""How far deployments are from ready, followed from WatchEvents. Pure: no I/O.

Feed every event of a watch started at revision 0 (snapshot first) to a RolloutTracker; after
SNAPSHOT_END, `view()` tells each deployment's progress and whether it is READY.

A deployment is ready when all of these hold:
- the reconciler has seen the spec that apply or scale stored (observed_generation);
- its status counts at least as many ready instances as desired;
- its status has no message: the reconciler writes one whenever something is still under
  way or wrong (a rollout in progress, instances that cannot be placed, a crash);
- none of its instances is pending, starting or failed: during a rollout the old ready
  instances alone would satisfy the count.
The reconciler writes a deployment's status after the instance changes of the same pass,
so by the time a status arrives, the instances it accounts for have arrived too.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from gpufleet.client.output import phase_name
from gpufleet.v1 import deployment_pb2, deployment_service_pb2 as pb, instance_pb2

_State = instance_pb2.InstanceState
_STARTING = frozenset({_State.INSTANCE_STATE_PENDING, _State.INSTANCE_STATE_STARTING})


@dataclass(frozen=True)
class Target:
    """A deployment to wait for."""

    name: str
    generation: int
    """The generation apply or scale stored; the reconciler must have observed it."""


class Outcome(enum.Enum):
    """Where a deployment stands."""

    WAITING = "waiting"
    READY = "ready"
    GONE = "gone"
    """Deleted (or being deleted): it will never be ready."""


@dataclass(frozen=True)
class DeploymentProgress:
    """One deployment as the progress display shows it."""

    name: str
    outcome: Outcome
    phase: str
    """Standby, Starting, Running, Draining, Failed or Pending."""
    desired: int
    ready: int
    """Instances passing readiness."""
    starting: int
    """Instances placed or started, not ready yet."""
    failed: int
    """Instances failed or crash-looping."""
    message: str
    """The status message, or why the deployment is gone."""

    def summary(self) -> str:
        """"1/2 ready, 1 starting (Starting)" and the message, if any."""
        parts = [f"{self.ready}/{self.desired} ready"]
        if self.starting:
            parts.append(f"{self.starting} starting")
        if self.failed:
            parts.append(f"{self.failed} failed")
        text = f"{', '.join(parts)} ({self.phase})"
        return f"{text}: {self.message}" if self.message else text

    def line(self) -> str:
        """The plain text line for this state."""
        if self.outcome is Outcome.READY:
            if self.desired == 0:
                return f"deployment/{self.name} ready: standby, the first call starts an instance"
            return f"deployment/{self.name} ready: {self.ready}/{self.desired} instances"
        if self.outcome is Outcome.GONE:
            return f"deployment/{self.name} {self.message}"
        return f"deployment/{self.name}: {self.summary()}"


class RolloutTracker:
    """Follows deployments to ready through a WatchEvents stream started at revision 0."""

    def __init__(self, targets: Sequence[Target]) -> None:
        self._targets = {target.name: target for target in targets}
        self._deployments: dict[str, deployment_pb2.Deployment] = {}
        self._deleted: set[str] = set()
        self._instances: dict[str, dict[str, instance_pb2.Instance]] = {
            name: {} for name in self._targets
        }
        self._snapshot_done = False

    @property
    def started(self) -> bool:
        """True once the snapshot is complete (before that, the view is partial)."""
        return self._snapshot_done

    def feed(self, event: pb.WatchEventsResponse) -> bool:
        """Take the next event; True when the view may have changed (and is complete)."""
        if event.type == pb.EVENT_TYPE_SNAPSHOT_END:
            self._snapshot_done = True
            return True
        which = event.WhichOneof("object")
        deleted = event.type == pb.EVENT_TYPE_DELETED
        if which == "deployment" and event.deployment.name in self._targets:
            name = event.deployment.name
            if deleted:
                self._deleted.add(name)
            else:
                self._deployments[name] = event.deployment
        elif which == "instance" and event.instance.deployment in self._targets:
            instances = self._instances[event.instance.deployment]
            if deleted:
                instances.pop(event.instance.id, None)
            else:
                instances[event.instance.id] = event.instance
        else:
            return False
        return self._snapshot_done

    def view(self) -> tuple[DeploymentProgress, ...]:
        """Every target's progress, in the order given."""
        return tuple(self._progress(target) for target in self._targets.values())

    def finished(self) -> bool:
        """True when every target is ready (requires the snapshot)."""
        return self._snapshot_done and all(p.outcome is Outcome.READY for p in self.view())

    def _progress(self, target: Target) -> DeploymentProgress:
        deployment = self._deployments.get(target.name)
        instances = self._instances[target.name].values()
        starting = sum(1 for i in instances if i.state in _STARTING and not i.crash_loop)
        failed = sum(
            1 for i in instances if i.state == _State.INSTANCE_STATE_FAILED or i.crash_loop
        )
        ready = sum(1 for i in instances if i.state == _State.INSTANCE_STATE_READY)
        if deployment is None or target.name in self._deleted:
            # Missing from a complete snapshot: deleted between apply and the watch.
            gone = target.name in self._deleted or self._snapshot_done
            return DeploymentProgress(
                target.name,
                Outcome.GONE if gone else Outcome.WAITING,
                "-",
                0,
                ready,
                starting,
                failed,
                "was deleted" if gone else "",
            )
        status = deployment.status
        if deployment.HasField("delete_time"):
            return DeploymentProgress(
                target.name,
                Outcome.GONE,
                phase_name(status.phase),
                status.desired_instances,
                ready,
                starting,
                failed,
                "is being deleted",
            )
        settled = (
            deployment.observed_generation >= target.generation
            and status.phase != deployment_pb2.DEPLOYMENT_PHASE_UNSPECIFIED
            and status.ready_instances >= status.desired_instances
            and not status.message
            and starting == 0
            and failed == 0
        )
        return DeploymentProgress(
            target.name,
            Outcome.READY if settled and self._snapshot_done else Outcome.WAITING,
            phase_name(status.phase),
            status.desired_instances,
            ready,
            starting,
            failed,
            status.message,
        )
