"""One store write as it runs on the database thread: revisions handed out and events logged.

A write is a synchronous function of a Transaction. Several writes may share one SQLite
transaction (group commit, see group_commit.py); each still sees a Transaction of its own
that starts at the revision the writes before it left.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import TypeVar

from gpufleet.server.store.records import ChangeType, DeploymentRecord, ObjectKind, StoredEvent
from gpufleet.server.store.rows import labels_json, micros, timestamp
from gpufleet.v1 import deployment_pb2, instance_pb2

_T = TypeVar("_T")


class Transaction:
    """Hands out revisions and collects the events one write logs."""

    def __init__(self, db: sqlite3.Connection, *, revision: int, now_us: int) -> None:
        self.db = db
        self.now_us = now_us
        self.events: list[StoredEvent] = []
        self._revision = revision

    @property
    def revision(self) -> int:
        """The latest revision taken so far (the store's revision if none was taken)."""
        return self._revision

    def next_revision(self) -> int:
        """Take the next store revision; the caller must `log` an event with it."""
        self._revision += 1
        return self._revision

    def log(
        self,
        change: ChangeType,
        kind: ObjectKind,
        name: str,
        payload: deployment_pb2.Deployment | instance_pb2.Instance,
    ) -> int:
        """Append an event; deployments carry their own revision, others take the next."""
        if isinstance(payload, deployment_pb2.Deployment):
            revision = payload.revision
        else:
            revision = self.next_revision()
        if revision != self._revision:
            raise RuntimeError(
                f"event revision {revision} is not the transaction's latest {self._revision}"
            )
        data = payload.SerializeToString()
        self.db.execute(
            "INSERT INTO events (revision, type, kind, name, payload) VALUES (?, ?, ?, ?, ?)",
            (revision, change.value, kind.value, name, data),
        )
        self.events.append(StoredEvent(revision, change, kind, name, data))
        return revision

    def save_deployment(
        self, deployment: deployment_pb2.Deployment, invoke_token_sha256: str
    ) -> DeploymentRecord:
        """Write a changed deployment under a new revision and log UPDATED."""
        new = deployment_pb2.Deployment()
        new.CopyFrom(deployment)
        new.revision = self.next_revision()
        new.update_time.CopyFrom(timestamp(self.now_us))
        self.db.execute(
            "UPDATE deployments SET labels = ?, spec = ?, revision = ?, generation = ?, "
            "observed_generation = ?, update_time_us = ?, delete_time_us = ?, "
            "invoke_token_sha256 = ?, status = ? WHERE name = ?",
            (
                labels_json(new.labels),
                new.spec.SerializeToString(),
                new.revision,
                new.generation,
                new.observed_generation,
                self.now_us,
                micros(new.delete_time) if new.HasField("delete_time") else None,
                invoke_token_sha256,
                new.status.SerializeToString() if new.HasField("status") else None,
                new.name,
            ),
        )
        self.log(ChangeType.UPDATED, ObjectKind.DEPLOYMENT, new.name, new)
        return DeploymentRecord(new, invoke_token_sha256)

    def remove_deployment(
        self, deployment: deployment_pb2.Deployment, record: DeploymentRecord
    ) -> DeploymentRecord:
        """Delete the row and log DELETED with the deployment as it was removed."""
        gone = deployment_pb2.Deployment()
        gone.CopyFrom(deployment)
        gone.revision = self.next_revision()
        gone.update_time.CopyFrom(timestamp(self.now_us))
        self.db.execute("DELETE FROM deployments WHERE name = ?", (gone.name,))
        self.log(ChangeType.DELETED, ObjectKind.DEPLOYMENT, gone.name, gone)
        return DeploymentRecord(gone, record.invoke_token_sha256)


WriteBody = Callable[[Transaction], _T]
"""One write: runs on the database thread inside an open transaction; raises a domain
error (gpufleet.server.errors) to leave everything it did undone."""
