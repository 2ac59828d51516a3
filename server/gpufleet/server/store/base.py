"""The control plane's state, behind one abstract class.

Contract every implementation keeps:

* **Revisions.** One store-wide counter. Each change to a watched object (a deployment or
  an instance) takes the next revision and appends one event carrying that revision, in
  the same transaction as the change. A deployment's `revision` is the revision of its last
  change. Revisions never go backwards, also across restarts.
* **Durability.** A method that changes state returns only after its transaction is
  committed durably; a caller may acknowledge the write as soon as the method returns.
* **Atomicity.** A method either applies all of its change (object rows and events) or
  none; on any error nothing is written.
* **Watching.** `subscribe()` delivers every event committed after the call, in revision
  order. Subscribe first, then read (`snapshot` or `list_events_since`), then drop
  subscription events with a revision you already have: no gap, no duplicate.
* **History.** The last `event_retention` events are kept; asking for events after a
  revision whose successors were compacted raises OutOfRange.
* **Errors.** Only `gpufleet.server.errors` exceptions for caller mistakes (NotFound,
  AlreadyExists, RevisionMismatch, FailedPrecondition, InvalidArgument, OutOfRange); no
  gRPC types. Inputs are assumed validated (names, specs): the store does not re-validate.
* **Copies.** Returned protobuf messages are fresh copies the caller may mutate.

Deletion is graceful: `mark_deployment_deleted` removes a deployment at once when it has
no instance, otherwise it sets delete_time and `purge_deployment` removes it once the last
instance is gone.

Instances have two owners: the reconciler decides which exist and whether they drain or are
lost (`commit_reconcile`), agents report how they run (`report_instances`). Neither write
touches the other's fields, so a pass based on a slightly older read never undoes a report.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence

from gpufleet.server.store.broadcast import Subscription
from gpufleet.server.store.records import (
    ClusterRecords,
    DeleteResult,
    DeploymentPage,
    DeploymentRecord,
    InstanceRecord,
    InstanceReport,
    JoinTokenRecord,
    NodeRecord,
    ReconcileBatch,
    Snapshot,
    StoredEvent,
)
from gpufleet.v1 import deployment_pb2, instance_pb2, node_pb2


class Store(abc.ABC):
    """Durable state of deployments, nodes, instances and the change log."""

    @abc.abstractmethod
    async def close(self) -> None:
        """End every subscription and release the database; the store is unusable after."""

    @abc.abstractmethod
    def close_subscriptions(self) -> None:
        """End every subscription now and refuse new ones (shutdown begins); reads and
        writes keep working until `close`."""

    @abc.abstractmethod
    def subscribe(self) -> Subscription:
        """Receive every event committed from now on (see the module contract)."""

    @abc.abstractmethod
    async def current_revision(self) -> int:
        """Revision of the latest change; 0 for an empty store."""

    # Deployments

    @abc.abstractmethod
    async def create_deployment(
        self,
        name: str,
        labels: Mapping[str, str],
        spec: deployment_pb2.DeploymentSpec,
        invoke_token_sha256: str,
    ) -> DeploymentRecord:
        """Store a new deployment at generation 1 and log CREATED.

        Raises AlreadyExists if the name is taken (also while the old one drains).
        """

    @abc.abstractmethod
    async def get_deployment(self, name: str) -> DeploymentRecord:
        """Return one deployment; raises NotFound."""

    @abc.abstractmethod
    async def list_deployments(
        self,
        page_size: int,
        page_token: str = "",
        label_selector: Mapping[str, str] | None = None,
    ) -> DeploymentPage:
        """Page through deployments by name, keeping those that carry every selector label.

        page_size >= 1. Raises InvalidArgument (field "page_token") for a token this store
        did not hand out.
        """

    @abc.abstractmethod
    async def update_deployment(
        self,
        name: str,
        labels: Mapping[str, str],
        spec: deployment_pb2.DeploymentSpec,
        expected_revision: int,
    ) -> DeploymentRecord:
        """Replace labels and spec if the stored revision equals expected_revision.

        The generation goes up only when the spec changes. Raises NotFound,
        RevisionMismatch, or FailedPrecondition if the deployment is being deleted.
        """

    @abc.abstractmethod
    async def scale_deployment(
        self,
        name: str,
        min_instances: int | None,
        max_instances: int | None,
        expected_revision: int | None = None,
    ) -> DeploymentRecord:
        """Set spec.scaling bounds (None keeps a bound); bumps the generation on change.

        expected_revision None skips the revision check. Raises NotFound, RevisionMismatch,
        FailedPrecondition (being deleted).
        """

    @abc.abstractmethod
    async def set_observed_generation(self, name: str, generation: int) -> DeploymentRecord:
        """Record that the reconciler acted on `generation`; raises NotFound."""

    @abc.abstractmethod
    async def set_invoke_token_hash(self, name: str, invoke_token_sha256: str) -> DeploymentRecord:
        """Replace the invoke token hash (logged as UPDATED); raises NotFound."""

    @abc.abstractmethod
    async def mark_deployment_deleted(
        self, name: str, expected_revision: int | None = None
    ) -> DeleteResult:
        """Start a graceful delete: removed at once without instances, else delete_time set.

        Deleting a deployment already being deleted changes nothing. Raises NotFound,
        RevisionMismatch.
        """

    @abc.abstractmethod
    async def purge_deployment(self, name: str) -> bool:
        """Remove a deployment that is being deleted and has no instance left.

        Returns True if it was removed, False if it is not being deleted, still has
        instances, or is already gone.
        """

    @abc.abstractmethod
    async def snapshot(self) -> Snapshot:
        """Every deployment and instance, consistent as of one revision."""

    @abc.abstractmethod
    async def list_events_since(self, revision: int, limit: int = 1000) -> list[StoredEvent]:
        """Up to `limit` events with revision > `revision`, oldest first.

        Raises OutOfRange if events after `revision` were compacted, or if `revision` is
        beyond the current revision.
        """

    # Nodes and instances

    @abc.abstractmethod
    async def put_node(self, node: node_pb2.Node, secret_sha256: str) -> None:
        """Insert or replace a node (id, name, labels, resources, GPUs, heartbeat).

        Nodes are not watched objects: this takes no revision and logs no event.
        """

    @abc.abstractmethod
    async def list_nodes(self) -> list[node_pb2.Node]:
        """Every node, ordered by id."""

    @abc.abstractmethod
    async def put_instance(
        self, instance: instance_pb2.Instance, spec: deployment_pb2.DeploymentSpec
    ) -> int:
        """Insert or replace an instance with the spec it runs; logs CREATED or UPDATED.

        Returns the change's revision. Raises NotFound if its deployment or node is unknown.
        """

    @abc.abstractmethod
    async def delete_instance(self, instance_id: str) -> int:
        """Remove an instance and log DELETED; returns the revision. Raises NotFound."""

    @abc.abstractmethod
    async def list_instances(self, deployment: str | None = None) -> list[instance_pb2.Instance]:
        """Instances ordered by deployment then id, optionally of one deployment."""

    # The node side

    @abc.abstractmethod
    async def add_join_token(self, token_sha256: str, expire_time_us: int | None) -> None:
        """Store a join token hash (no-op if it is already stored). Not a watched object."""

    @abc.abstractmethod
    async def get_join_token(self, token_sha256: str) -> JoinTokenRecord | None:
        """The join token with this hash, expired or not; None if unknown."""

    @abc.abstractmethod
    async def list_node_records(self) -> list[NodeRecord]:
        """Every node with its secret hash, ordered by id."""

    @abc.abstractmethod
    async def update_node_info(self, node: node_pb2.Node) -> bool:
        """Replace what the agent reports of a node (GPUs, cpu, memory, agent version,
        advertise host, last heartbeat); name, labels, secret and state stay. False if the
        node is unknown."""

    @abc.abstractmethod
    async def list_instance_records(
        self, deployment: str | None = None, node_id: str | None = None
    ) -> list[InstanceRecord]:
        """Instances with their spec and flags, ordered by deployment then id, optionally of
        one deployment and/or one node."""

    @abc.abstractmethod
    async def cluster_records(self) -> ClusterRecords:
        """Every deployment, instance and node, consistent as of one revision."""

    @abc.abstractmethod
    async def report_instances(self, node_id: str, reports: Sequence[InstanceReport]) -> int:
        """Apply a node's reports to its instances, in one transaction.

        Only instances placed on `node_id` and not lost are touched, and only the reported
        fields (state, reason, pid, address, restarts, crash loop, measured GPU use); a
        report equal to the row writes nothing. A draining instance reported as still running
        is stored as DRAINING. ready_time is set when an instance becomes READY. Logs UPDATED
        per changed instance; returns how many changed.
        """

    @abc.abstractmethod
    async def commit_reconcile(self, batch: ReconcileBatch) -> int:
        """Apply one reconciler pass atomically (see ReconcileBatch for the order).

        Steps that no longer apply are skipped, not errors: marking or deleting an instance
        that is gone, marking lost an instance already lost, purging a deployment that still
        has instances. Status writes that change nothing are skipped. Returns the store
        revision after the batch.
        """
