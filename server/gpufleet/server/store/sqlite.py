"""SQLite implementation of the Store contract (see store.base).

One aiosqlite connection per process. Every store call, read or write, runs as one
synchronous function on the connection's thread (db_thread.py), so calls never interleave
and each pays one thread hand-off. Writes go through group commit (group_commit.py): the
writes queued while a transaction commits share the next one, each in its own savepoint,
and every caller is answered only after that COMMIT. WAL with synchronous=FULL makes every
COMMIT durable before a write method returns. A write, once queued, commits (or fails) and
publishes its events even if its caller is cancelled meanwhile.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from gpufleet.server.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    RevisionMismatch,
    StartupError,
    Violation,
)
from gpufleet.server.store.base import Store
from gpufleet.server.store.broadcast import ChangeHub, Subscription
from gpufleet.server.store.db_thread import DbThread
from gpufleet.server.store.group_commit import DEFAULT_MAX_BATCH, GroupCommitter
from gpufleet.server.store.migrations import MIGRATIONS, Migration
from gpufleet.server.store.records import (
    ChangeType,
    ClusterRecords,
    DeleteResult,
    DeploymentPage,
    DeploymentRecord,
    InstanceMark,
    InstanceRecord,
    InstanceReport,
    JoinTokenRecord,
    NewInstance,
    NodeRecord,
    ObjectKind,
    ReconcileBatch,
    Snapshot,
    StatusWrite,
    StoredEvent,
)
from gpufleet.server.store.rows import (
    DEPLOYMENT_COLUMNS,
    INSTANCE_COLUMNS,
    INSTANCE_RECORD_COLUMNS,
    NODE_COLUMNS,
    deployment_from_row,
    instance_from_row,
    instance_record_from_row,
    labels_json,
    micros,
    node_from_row,
    timestamp,
)
from gpufleet.server.store.transaction import Transaction, WriteBody
from gpufleet.v1 import deployment_pb2, instance_pb2, node_pb2

_log = logging.getLogger(__name__)

_T = TypeVar("_T")

DEFAULT_EVENT_RETENTION = 10_000
BUSY_TIMEOUT_MS = 5_000

_State = instance_pb2.InstanceState
# States in which an instance still runs (or is about to): a draining one is shown as
# DRAINING until its node reports it stopped or failed.
_RUNNING_STATES = frozenset(
    {_State.INSTANCE_STATE_PENDING, _State.INSTANCE_STATE_STARTING, _State.INSTANCE_STATE_READY}
)


class SqliteStore(Store):
    """Store on one SQLite file. Create with `await SqliteStore.open(path)`."""

    def __init__(
        self,
        thread: DbThread,
        *,
        event_retention: int,
        clock: Callable[[], float],
        max_batch: int = DEFAULT_MAX_BATCH,
    ) -> None:
        self._thread = thread
        self._clock = clock
        self._hub = ChangeHub()
        self._writes = GroupCommitter(
            thread, event_retention=event_retention, publish=self._hub.publish, max_batch=max_batch
        )
        self._closed = False
        self._closing: asyncio.Task[None] | None = None

    @classmethod
    async def open(
        cls,
        path: Path,
        *,
        event_retention: int = DEFAULT_EVENT_RETENTION,
        clock: Callable[[], float] = time.time,
        max_batch: int = DEFAULT_MAX_BATCH,
    ) -> SqliteStore:
        """Open (creating if needed) the database at `path` and bring its schema up to date.

        event_retention: how many of the latest events the change log keeps at least (>= 1);
          it is cut back to that once it holds a tenth more.
        clock: seconds since the epoch, for timestamps.
        max_batch: most writes committed together in one transaction (>= 1).
        Raises StartupError when the file cannot be used.
        """
        if event_retention < 1:
            raise ValueError(f"event_retention must be at least 1, got {event_retention}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        thread = await DbThread.open(path)
        try:
            await thread.run(lambda db: _prepare(db, path))
        except BaseException:
            await thread.close()
            raise
        return cls(thread, event_retention=event_retention, clock=clock, max_batch=max_batch)

    async def close(self) -> None:
        self._hub.close()
        self._closed = True
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._finish())
        await asyncio.shield(self._closing)

    async def _finish(self) -> None:
        await self._writes.close()
        await self._thread.close()

    def close_subscriptions(self) -> None:
        self._hub.close()

    def subscribe(self) -> Subscription:
        return self._hub.subscribe()

    async def settings(self) -> dict[str, str]:
        """Effective connection settings (journal_mode, synchronous, foreign_keys,
        busy_timeout), read back from SQLite: for diagnostics and tests."""

        def read(db: sqlite3.Connection) -> dict[str, str]:
            return {
                pragma: str(db.execute(f"PRAGMA {pragma}").fetchone()[0])
                for pragma in ("journal_mode", "synchronous", "foreign_keys", "busy_timeout")
            }

        return await self._read(read)

    async def current_revision(self) -> int:
        return await self._read(lambda db: _meta(db, "revision"))

    # Deployments

    async def create_deployment(
        self,
        name: str,
        labels: Mapping[str, str],
        spec: deployment_pb2.DeploymentSpec,
        invoke_token_sha256: str,
    ) -> DeploymentRecord:
        def body(tx: Transaction) -> DeploymentRecord:
            existing = _fetch_deployment(tx.db, name)
            if existing is not None:
                if existing.deployment.HasField("delete_time"):
                    raise AlreadyExists(
                        f"deployment {name!r} is still being deleted (its instances are "
                        "draining); wait until it is gone, or pick another name",
                        metadata={"name": name},
                    )
                raise AlreadyExists(
                    f"deployment {name!r} already exists; update it instead, or pick "
                    "another name",
                    metadata={"name": name},
                )
            now = tx.now_us
            deployment = deployment_pb2.Deployment(
                name=name,
                labels=dict(labels),
                spec=spec,
                revision=tx.next_revision(),
                generation=1,
                observed_generation=0,
                create_time=timestamp(now),
                update_time=timestamp(now),
            )
            tx.db.execute(
                f"INSERT INTO deployments ({DEPLOYMENT_COLUMNS}) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, NULL, ?, NULL)",
                (
                    name,
                    labels_json(labels),
                    spec.SerializeToString(),
                    deployment.revision,
                    1,
                    0,
                    now,
                    now,
                    invoke_token_sha256,
                ),
            )
            tx.log(ChangeType.CREATED, ObjectKind.DEPLOYMENT, name, deployment)
            return DeploymentRecord(deployment, invoke_token_sha256)

        return await self._write(body)

    async def get_deployment(self, name: str) -> DeploymentRecord:
        return await self._read(lambda db: _require_deployment(db, name))

    async def list_deployments(
        self,
        page_size: int,
        page_token: str = "",
        label_selector: Mapping[str, str] | None = None,
    ) -> DeploymentPage:
        if page_size < 1:
            raise ValueError(f"page_size must be at least 1, got {page_size}")
        after = _decode_page_token(page_token)
        clauses = ["name > ?"]
        params: list[Any] = [after]
        for key, value in sorted((label_selector or {}).items()):
            # json_each with bound parameters: label keys need no quoting in a JSON path.
            clauses.append(
                "EXISTS (SELECT 1 FROM json_each(deployments.labels) AS l "
                "WHERE l.key = ? AND l.value = ?)"
            )
            params.extend((key, value))
        params.append(page_size + 1)
        sql = (
            f"SELECT {DEPLOYMENT_COLUMNS} FROM deployments WHERE {' AND '.join(clauses)} "
            "ORDER BY name LIMIT ?"
        )
        rows = await self._read(lambda db: db.execute(sql, params).fetchall())
        records = [deployment_from_row(row) for row in rows[:page_size]]
        next_token = ""
        if len(rows) > page_size:
            next_token = _encode_page_token(records[-1].deployment.name)
        return DeploymentPage(records, next_token)

    async def update_deployment(
        self,
        name: str,
        labels: Mapping[str, str],
        spec: deployment_pb2.DeploymentSpec,
        expected_revision: int,
    ) -> DeploymentRecord:
        def body(tx: Transaction) -> DeploymentRecord:
            record = _require_live_deployment(tx.db, name, "update")
            _check_revision(record, expected_revision)
            old = record.deployment
            spec_changed = old.spec != spec
            if not spec_changed and dict(old.labels) == dict(labels):
                return record
            new = deployment_pb2.Deployment()
            new.CopyFrom(old)
            new.labels.clear()
            new.labels.update(labels)
            new.spec.CopyFrom(spec)
            if spec_changed:
                new.generation = old.generation + 1
            return tx.save_deployment(new, record.invoke_token_sha256)

        return await self._write(body)

    async def scale_deployment(
        self,
        name: str,
        min_instances: int | None,
        max_instances: int | None,
        expected_revision: int | None = None,
    ) -> DeploymentRecord:
        def body(tx: Transaction) -> DeploymentRecord:
            record = _require_live_deployment(tx.db, name, "scale")
            if expected_revision is not None:
                _check_revision(record, expected_revision)
            new = deployment_pb2.Deployment()
            new.CopyFrom(record.deployment)
            if min_instances is not None:
                new.spec.scaling.min_instances = min_instances
            if max_instances is not None:
                new.spec.scaling.max_instances = max_instances
            if new.spec == record.deployment.spec:
                return record
            new.generation += 1
            return tx.save_deployment(new, record.invoke_token_sha256)

        return await self._write(body)

    async def set_observed_generation(self, name: str, generation: int) -> DeploymentRecord:
        def body(tx: Transaction) -> DeploymentRecord:
            record = _require_deployment(tx.db, name)
            if record.deployment.observed_generation == generation:
                return record
            new = deployment_pb2.Deployment()
            new.CopyFrom(record.deployment)
            new.observed_generation = generation
            return tx.save_deployment(new, record.invoke_token_sha256)

        return await self._write(body)

    async def set_invoke_token_hash(self, name: str, invoke_token_sha256: str) -> DeploymentRecord:
        def body(tx: Transaction) -> DeploymentRecord:
            record = _require_deployment(tx.db, name)
            return tx.save_deployment(record.deployment, invoke_token_sha256)

        return await self._write(body)

    async def mark_deployment_deleted(
        self, name: str, expected_revision: int | None = None
    ) -> DeleteResult:
        def body(tx: Transaction) -> DeleteResult:
            record = _require_deployment(tx.db, name)
            if expected_revision is not None:
                _check_revision(record, expected_revision)
            if record.deployment.HasField("delete_time"):
                return DeleteResult(record, removed=False)
            new = deployment_pb2.Deployment()
            new.CopyFrom(record.deployment)
            new.delete_time.CopyFrom(timestamp(tx.now_us))
            if _instance_count(tx.db, name) == 0:
                return DeleteResult(tx.remove_deployment(new, record), removed=True)
            return DeleteResult(tx.save_deployment(new, record.invoke_token_sha256), removed=False)

        return await self._write(body)

    async def purge_deployment(self, name: str) -> bool:
        def body(tx: Transaction) -> bool:
            record = _fetch_deployment(tx.db, name)
            if record is None or not record.deployment.HasField("delete_time"):
                return False
            if _instance_count(tx.db, name) > 0:
                return False
            tx.remove_deployment(record.deployment, record)
            return True

        return await self._write(body)

    async def snapshot(self) -> Snapshot:
        def read(db: sqlite3.Connection) -> Snapshot:
            db.execute("BEGIN")
            try:
                revision = _meta(db, "revision")
                deployments = [
                    deployment_from_row(row)
                    for row in db.execute(
                        f"SELECT {DEPLOYMENT_COLUMNS} FROM deployments ORDER BY name"
                    )
                ]
                instances = _select_instances(db, None)
            finally:
                db.execute("COMMIT")
            return Snapshot(revision, deployments, instances)

        return await self._read(read)

    async def list_events_since(self, revision: int, limit: int = 1000) -> list[StoredEvent]:
        def read(db: sqlite3.Connection) -> list[StoredEvent]:
            current = _meta(db, "revision")
            compacted = _meta(db, "compacted_revision")
            if revision < compacted:
                raise OutOfRange(
                    f"revision {revision} is older than the kept history (changes up to "
                    f"revision {compacted} were compacted); watch again from revision 0 to "
                    "get a fresh snapshot",
                    metadata={"revision": str(revision), "compacted_revision": str(compacted)},
                )
            if revision > current:
                raise OutOfRange(
                    f"revision {revision} is ahead of the store's current revision {current}; "
                    "watch again from revision 0 to get a fresh snapshot",
                    metadata={"revision": str(revision), "current_revision": str(current)},
                )
            rows = db.execute(
                "SELECT revision, type, kind, name, payload FROM events WHERE revision > ? "
                "ORDER BY revision LIMIT ?",
                (revision, limit),
            )
            return [
                StoredEvent(int(r[0]), ChangeType(r[1]), ObjectKind(r[2]), str(r[3]), bytes(r[4]))
                for r in rows
            ]

        return await self._read(read)

    # Nodes and instances

    async def put_node(self, node: node_pb2.Node, secret_sha256: str) -> None:
        def body(tx: Transaction) -> None:
            heartbeat = (
                micros(node.last_heartbeat_time) if node.HasField("last_heartbeat_time") else None
            )
            tx.db.execute(
                "INSERT INTO nodes (id, name, labels, secret_sha256, state, cpu_millis, "
                "memory_mib, agent_version, advertise_host, gpus, register_time_us, "
                "last_heartbeat_us) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET name = excluded.name, "
                "labels = excluded.labels, secret_sha256 = excluded.secret_sha256, "
                "state = excluded.state, cpu_millis = excluded.cpu_millis, "
                "memory_mib = excluded.memory_mib, agent_version = excluded.agent_version, "
                "advertise_host = excluded.advertise_host, gpus = excluded.gpus, "
                "last_heartbeat_us = excluded.last_heartbeat_us",
                (
                    node.id,
                    node.name,
                    labels_json(node.labels),
                    secret_sha256,
                    int(node.state),
                    node.cpu_millis,
                    node.memory_mib,
                    node.agent_version,
                    node.advertise_host,
                    node_pb2.Node(gpus=node.gpus).SerializeToString(),
                    tx.now_us,
                    heartbeat,
                ),
            )

        await self._write(body)

    async def list_nodes(self) -> list[node_pb2.Node]:
        rows = await self._read(
            lambda db: db.execute(f"SELECT {NODE_COLUMNS} FROM nodes ORDER BY id").fetchall()
        )
        return [node_from_row(row) for row in rows]

    async def put_instance(
        self, instance: instance_pb2.Instance, spec: deployment_pb2.DeploymentSpec
    ) -> int:
        def body(tx: Transaction) -> int:
            if _fetch_deployment(tx.db, instance.deployment) is None:
                raise NotFound(
                    f"instance {instance.id!r} names deployment {instance.deployment!r}, "
                    "which does not exist",
                    metadata={"deployment": instance.deployment},
                )
            if not _node_exists(tx.db, instance.node_id):
                raise NotFound(
                    f"instance {instance.id!r} names node {instance.node_id!r}, which is not "
                    "registered",
                    metadata={"node_id": instance.node_id},
                )
            existing = tx.db.execute(
                "SELECT create_time_us FROM instances WHERE id = ?", (instance.id,)
            ).fetchone()
            stored = instance_pb2.Instance()
            stored.CopyFrom(instance)
            if existing is not None:
                stored.create_time.CopyFrom(timestamp(int(existing[0])))
            elif not stored.HasField("create_time"):
                stored.create_time.CopyFrom(timestamp(tx.now_us))
            tx.db.execute(
                f"INSERT OR REPLACE INTO instances ({INSTANCE_COLUMNS}) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    stored.id,
                    stored.deployment,
                    stored.node_id,
                    stored.generation,
                    int(stored.state),
                    stored.reason,
                    json.dumps(list(stored.gpu_uuids)),
                    stored.address,
                    stored.pid,
                    stored.restart_count,
                    int(stored.crash_loop),
                    stored.gpu_memory_reserved_mib,
                    stored.gpu_memory_used_mib,
                    stored.sm_utilization_percent,
                    int(stored.gpu_memory_overrun),
                    micros(stored.create_time),
                    tx.now_us,
                    micros(stored.ready_time) if stored.HasField("ready_time") else None,
                    spec.SerializeToString(),
                ),
            )
            change = ChangeType.UPDATED if existing is not None else ChangeType.CREATED
            return tx.log(change, ObjectKind.INSTANCE, stored.id, stored)

        return await self._write(body)

    async def delete_instance(self, instance_id: str) -> int:
        def body(tx: Transaction) -> int:
            row = tx.db.execute(
                f"SELECT {INSTANCE_COLUMNS} FROM instances WHERE id = ?", (instance_id,)
            ).fetchone()
            if row is None:
                raise NotFound(
                    f"instance {instance_id!r} does not exist", metadata={"instance": instance_id}
                )
            tx.db.execute("DELETE FROM instances WHERE id = ?", (instance_id,))
            return tx.log(
                ChangeType.DELETED, ObjectKind.INSTANCE, instance_id, instance_from_row(row)
            )

        return await self._write(body)

    async def list_instances(self, deployment: str | None = None) -> list[instance_pb2.Instance]:
        return await self._read(lambda db: _select_instances(db, deployment))

    # The node side

    async def add_join_token(self, token_sha256: str, expire_time_us: int | None) -> None:
        def body(tx: Transaction) -> None:
            tx.db.execute(
                "INSERT OR IGNORE INTO join_tokens (token_sha256, create_time_us, "
                "expire_time_us) VALUES (?, ?, ?)",
                (token_sha256, tx.now_us, expire_time_us),
            )

        await self._write(body)

    async def get_join_token(self, token_sha256: str) -> JoinTokenRecord | None:
        row = await self._read(
            lambda db: db.execute(
                "SELECT token_sha256, create_time_us, expire_time_us FROM join_tokens "
                "WHERE token_sha256 = ?",
                (token_sha256,),
            ).fetchone()
        )
        if row is None:
            return None
        token, created, expires = row
        return JoinTokenRecord(str(token), int(created), None if expires is None else int(expires))

    async def list_node_records(self) -> list[NodeRecord]:
        return await self._read(_select_node_records)

    async def update_node_info(self, node: node_pb2.Node) -> bool:
        def body(tx: Transaction) -> bool:
            heartbeat = (
                micros(node.last_heartbeat_time) if node.HasField("last_heartbeat_time") else None
            )
            cursor = tx.db.execute(
                "UPDATE nodes SET cpu_millis = ?, memory_mib = ?, agent_version = ?, "
                "advertise_host = ?, gpus = ?, last_heartbeat_us = ? WHERE id = ?",
                (
                    node.cpu_millis,
                    node.memory_mib,
                    node.agent_version,
                    node.advertise_host,
                    node_pb2.Node(gpus=node.gpus).SerializeToString(),
                    heartbeat,
                    node.id,
                ),
            )
            return cursor.rowcount > 0

        return await self._write(body)

    async def list_instance_records(
        self, deployment: str | None = None, node_id: str | None = None
    ) -> list[InstanceRecord]:
        clauses: list[str] = []
        params: list[Any] = []
        if deployment is not None:
            clauses.append("deployment = ?")
            params.append(deployment)
        if node_id is not None:
            clauses.append("node_id = ?")
            params.append(node_id)
        where = f"WHERE {' AND '.join(clauses)} " if clauses else ""
        sql = f"SELECT {INSTANCE_RECORD_COLUMNS} FROM instances {where}ORDER BY deployment, id"
        rows = await self._read(lambda db: db.execute(sql, params).fetchall())
        return [instance_record_from_row(row) for row in rows]

    async def cluster_records(self) -> ClusterRecords:
        def read(db: sqlite3.Connection) -> ClusterRecords:
            db.execute("BEGIN")
            try:
                revision = _meta(db, "revision")
                deployments = [
                    deployment_from_row(row)
                    for row in db.execute(
                        f"SELECT {DEPLOYMENT_COLUMNS} FROM deployments ORDER BY name"
                    )
                ]
                instances = [
                    instance_record_from_row(row)
                    for row in db.execute(
                        f"SELECT {INSTANCE_RECORD_COLUMNS} FROM instances "
                        "ORDER BY deployment, id"
                    )
                ]
                nodes = _select_node_records(db)
            finally:
                db.execute("COMMIT")
            return ClusterRecords(revision, deployments, instances, nodes)

        return await self._read(read)

    async def report_instances(self, node_id: str, reports: Sequence[InstanceReport]) -> int:
        def body(tx: Transaction) -> int:
            changed = 0
            for report in reports:
                if _apply_report(tx, node_id, report):
                    changed += 1
            return changed

        return await self._write(body)

    async def commit_reconcile(self, batch: ReconcileBatch) -> int:
        def body(tx: Transaction) -> int:
            for node_id, state in sorted(batch.node_states.items()):
                tx.db.execute("UPDATE nodes SET state = ? WHERE id = ?", (int(state), node_id))
            for mark in batch.lost:
                _mark_instance(tx, mark, lost=True)
            for mark in batch.drain:
                _mark_instance(tx, mark, lost=False)
            for instance_id in batch.delete:
                _delete_instance_row(tx, instance_id)
            for new in batch.create:
                _insert_new_instance(tx, new)
            for name in batch.purge:
                record = _fetch_deployment(tx.db, name)
                if (
                    record is not None
                    and record.deployment.HasField("delete_time")
                    and _instance_count(tx.db, name) == 0
                ):
                    tx.remove_deployment(record.deployment, record)
            for write in batch.status:
                _write_status(tx, write)
            return tx.revision

        return await self._write(body)

    # Internals

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the store is closed")

    async def _read(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        self._check_open()
        return await self._thread.run(fn)

    async def _write(self, body: WriteBody[_T]) -> _T:
        self._check_open()
        return await self._writes.write(body, int(self._clock() * 1_000_000))


def _prepare(db: sqlite3.Connection, path: Path) -> None:
    """Set the pragmas and bring the schema up to date (on the database thread)."""
    _configure(db, path)
    _migrate(db, path)


def _configure(db: sqlite3.Connection, path: Path) -> None:
    db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    row = db.execute("PRAGMA journal_mode = WAL").fetchone()
    mode = str(row[0]).lower() if row else ""
    if mode != "wal":
        raise StartupError(
            f"cannot switch {path} to WAL journal mode (got {mode!r}); put the state dir "
            "on a local file system"
        )
    # FULL: with WAL this syncs the log at every commit, so an acknowledged write survives
    # a power cut, not only a killed process.
    db.execute("PRAGMA synchronous = FULL")
    db.execute("PRAGMA foreign_keys = ON")


def _migrate(db: sqlite3.Connection, path: Path) -> None:
    db.execute(
        "CREATE TABLE IF NOT EXISTS schema_version ("
        "version INTEGER PRIMARY KEY, applied_time_us INTEGER NOT NULL) STRICT"
    )
    row = db.execute("SELECT max(version) FROM schema_version").fetchone()
    current = int(row[0]) if row and row[0] is not None else 0
    latest = MIGRATIONS[-1].version
    if current > latest:
        raise StartupError(
            f"{path} has schema version {current}, newer than this gpufleet knows "
            f"({latest}); run a newer gpufleet or point --state-dir elsewhere"
        )
    for migration in MIGRATIONS:
        if migration.version > current:
            _apply(db, migration)
            _log.info("applied schema migration %d: %s", migration.version, migration.description)


def _apply(db: sqlite3.Connection, migration: Migration) -> None:
    db.execute("BEGIN IMMEDIATE")
    try:
        for statement in migration.statements:
            db.execute(statement)
        db.execute(
            "INSERT INTO schema_version (version, applied_time_us) VALUES (?, ?)",
            (migration.version, int(time.time() * 1_000_000)),
        )
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def _meta(db: sqlite3.Connection, key: str) -> int:
    row = db.execute("SELECT value FROM store_meta WHERE key = ?", (key,)).fetchone()
    return int(row[0])


def _fetch_deployment(db: sqlite3.Connection, name: str) -> DeploymentRecord | None:
    row = db.execute(
        f"SELECT {DEPLOYMENT_COLUMNS} FROM deployments WHERE name = ?", (name,)
    ).fetchone()
    return deployment_from_row(row) if row is not None else None


def _require_deployment(db: sqlite3.Connection, name: str) -> DeploymentRecord:
    record = _fetch_deployment(db, name)
    if record is None:
        raise NotFound(f"deployment {name!r} does not exist", metadata={"name": name})
    return record


def _require_live_deployment(db: sqlite3.Connection, name: str, action: str) -> DeploymentRecord:
    record = _require_deployment(db, name)
    if record.deployment.HasField("delete_time"):
        raise FailedPrecondition(
            f"cannot {action} deployment {name!r}: it is being deleted; wait until it is "
            "gone and create it again",
            reason="DEPLOYMENT_DELETING",
            metadata={"name": name},
        )
    return record


def _check_revision(record: DeploymentRecord, expected: int) -> None:
    if record.deployment.revision != expected:
        raise RevisionMismatch(
            "deployment", record.deployment.name, expected, record.deployment.revision
        )


def _node_exists(db: sqlite3.Connection, node_id: str) -> bool:
    return db.execute("SELECT 1 FROM nodes WHERE id = ?", (node_id,)).fetchone() is not None


def _fetch_instance_record(db: sqlite3.Connection, instance_id: str) -> InstanceRecord | None:
    row = db.execute(
        f"SELECT {INSTANCE_RECORD_COLUMNS} FROM instances WHERE id = ?", (instance_id,)
    ).fetchone()
    return instance_record_from_row(row) if row is not None else None


def _apply_report(tx: Transaction, node_id: str, report: InstanceReport) -> bool:
    """Apply one agent report to its instance; True if the row changed."""
    record = _fetch_instance_record(tx.db, report.instance_id)
    if record is None or record.lost or record.instance.node_id != node_id:
        return False
    current = record.instance
    new = instance_pb2.Instance()
    new.CopyFrom(current)
    state = report.state
    if state == _State.INSTANCE_STATE_UNSPECIFIED:
        state = current.state
    if record.draining and state in _RUNNING_STATES:
        state = _State.INSTANCE_STATE_DRAINING
    new.state = state
    new.reason = report.reason
    new.pid = report.pid
    new.address = report.address
    new.restart_count = report.restart_count
    new.crash_loop = report.crash_loop
    new.gpu_memory_used_mib = report.gpu_memory_used_mib
    new.sm_utilization_percent = report.sm_utilization_percent
    new.gpu_memory_overrun = report.gpu_memory_overrun
    if state == _State.INSTANCE_STATE_READY and current.state != _State.INSTANCE_STATE_READY:
        new.ready_time.CopyFrom(timestamp(tx.now_us))
    if new == current:
        return False
    tx.db.execute(
        "UPDATE instances SET state = ?, reason = ?, pid = ?, address = ?, "
        "restart_count = ?, crash_loop = ?, gpu_memory_used_mib = ?, "
        "sm_utilization_percent = ?, gpu_memory_overrun = ?, ready_time_us = ?, "
        "update_time_us = ? WHERE id = ?",
        (
            int(new.state),
            new.reason,
            new.pid,
            new.address,
            new.restart_count,
            int(new.crash_loop),
            new.gpu_memory_used_mib,
            new.sm_utilization_percent,
            int(new.gpu_memory_overrun),
            micros(new.ready_time) if new.HasField("ready_time") else None,
            tx.now_us,
            new.id,
        ),
    )
    tx.log(ChangeType.UPDATED, ObjectKind.INSTANCE, new.id, new)
    return True


def _mark_instance(tx: Transaction, mark: InstanceMark, *, lost: bool) -> None:
    """Flag an instance lost (state FAILED) or draining (DRAINING while it still runs)."""
    record = _fetch_instance_record(tx.db, mark.instance_id)
    if record is None or record.lost or (not lost and record.draining):
        return
    new = instance_pb2.Instance()
    new.CopyFrom(record.instance)
    new.reason = mark.reason
    if lost:
        new.state = _State.INSTANCE_STATE_FAILED
    elif new.state in _RUNNING_STATES:
        new.state = _State.INSTANCE_STATE_DRAINING
    tx.db.execute(
        "UPDATE instances SET state = ?, reason = ?, draining = ?, lost = ?, "
        "update_time_us = ? WHERE id = ?",
        (
            int(new.state),
            new.reason,
            int(record.draining or not lost),
            int(lost),
            tx.now_us,
            new.id,
        ),
    )
    tx.log(ChangeType.UPDATED, ObjectKind.INSTANCE, new.id, new)


def _delete_instance_row(tx: Transaction, instance_id: str) -> None:
    record = _fetch_instance_record(tx.db, instance_id)
    if record is None:
        return
    tx.db.execute("DELETE FROM instances WHERE id = ?", (instance_id,))
    tx.log(ChangeType.DELETED, ObjectKind.INSTANCE, instance_id, record.instance)


def _insert_new_instance(tx: Transaction, new: NewInstance) -> None:
    """Insert a placed instance; skipped if its deployment or node vanished meanwhile (the
    next pass decides again)."""
    instance = instance_pb2.Instance()
    instance.CopyFrom(new.instance)
    deployment = _fetch_deployment(tx.db, instance.deployment)
    if deployment is None or not _node_exists(tx.db, instance.node_id):
        return
    instance.create_time.CopyFrom(timestamp(tx.now_us))
    tx.db.execute(
        f"INSERT INTO instances ({INSTANCE_RECORD_COLUMNS}) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, 0)",
        (
            instance.id,
            instance.deployment,
            instance.node_id,
            instance.generation,
            int(instance.state),
            instance.reason,
            json.dumps(list(instance.gpu_uuids)),
            instance.address,
            instance.pid,
            instance.restart_count,
            int(instance.crash_loop),
            instance.gpu_memory_reserved_mib,
            instance.gpu_memory_used_mib,
            instance.sm_utilization_percent,
            int(instance.gpu_memory_overrun),
            tx.now_us,
            tx.now_us,
            None,
            new.spec.SerializeToString(),
        ),
    )
    tx.log(ChangeType.CREATED, ObjectKind.INSTANCE, instance.id, instance)


def _write_status(tx: Transaction, write: StatusWrite) -> None:
    record = _fetch_deployment(tx.db, write.name)
    if record is None:
        return
    new = deployment_pb2.Deployment()
    new.CopyFrom(record.deployment)
    new.observed_generation = write.observed_generation
    new.status.CopyFrom(write.status)
    if new == record.deployment:
        return
    tx.save_deployment(new, record.invoke_token_sha256)


def _instance_count(db: sqlite3.Connection, deployment: str) -> int:
    row = db.execute(
        "SELECT count(*) FROM instances WHERE deployment = ?", (deployment,)
    ).fetchone()
    return int(row[0])


def _select_instances(db: sqlite3.Connection, deployment: str | None) -> list[instance_pb2.Instance]:
    if deployment is None:
        rows = db.execute(f"SELECT {INSTANCE_COLUMNS} FROM instances ORDER BY deployment, id")
    else:
        rows = db.execute(
            f"SELECT {INSTANCE_COLUMNS} FROM instances WHERE deployment = ? ORDER BY id",
            (deployment,),
        )
    return [instance_from_row(row) for row in rows]


def _select_node_records(db: sqlite3.Connection) -> list[NodeRecord]:
    rows = db.execute(f"SELECT {NODE_COLUMNS}, secret_sha256 FROM nodes ORDER BY id")
    records: list[NodeRecord] = []
    for row in rows:
        *node_values, secret = tuple(row)
        records.append(NodeRecord(node_from_row(node_values), str(secret)))
    return records


_PAGE_TOKEN_VERSION = 1


def _encode_page_token(last_name: str) -> str:
    raw = json.dumps({"v": _PAGE_TOKEN_VERSION, "after": last_name}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _decode_page_token(token: str) -> str:
    if token == "":
        return ""
    try:
        padded = token + "=" * (-len(token) % 4)
        data = json.loads(base64.urlsafe_b64decode(padded.encode()))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        data = None
    if (
        not isinstance(data, dict)
        or data.get("v") != _PAGE_TOKEN_VERSION
        or not isinstance(data.get("after"), str)
    ):
        raise InvalidArgument(
            [
                Violation(
                    "page_token",
                    "is not a token this server handed out; send the next_page_token of "
                    "the previous response unchanged, or an empty token for the first page",
                )
            ]
        )
    return str(data["after"])
