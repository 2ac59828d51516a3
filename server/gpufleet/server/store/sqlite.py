"""SQLite implementation of the Store contract (see store.base).

One aiosqlite connection per process, used under one asyncio lock, so transactions never
interleave. WAL with synchronous=FULL makes every COMMIT durable before a write method
returns. Each write runs in a shielded task: a caller cancelled mid-write cannot leave a
transaction half done, or a committed change unpublished to watchers.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite
from google.protobuf import timestamp_pb2

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
from gpufleet.v1 import deployment_pb2, instance_pb2, node_pb2

_log = logging.getLogger(__name__)

_T = TypeVar("_T")

DEFAULT_EVENT_RETENTION = 10_000
BUSY_TIMEOUT_MS = 5_000

_DEPLOYMENT_COLUMNS = (
    "name, labels, spec, revision, generation, observed_generation, create_time_us, "
    "update_time_us, delete_time_us, invoke_token_sha256, status"
)
_INSTANCE_COLUMNS = (
    "id, deployment, node_id, generation, state, reason, gpu_uuids, address, pid, "
    "restart_count, crash_loop, gpu_memory_reserved_mib, gpu_memory_used_mib, "
    "sm_utilization_percent, gpu_memory_overrun, create_time_us, update_time_us, "
    "ready_time_us, spec"
)
_NODE_COLUMNS = (
    "id, name, labels, state, cpu_millis, memory_mib, agent_version, advertise_host, gpus, "
    "last_heartbeat_us"
)
_INSTANCE_RECORD_COLUMNS = _INSTANCE_COLUMNS + ", draining, lost"

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
        db: aiosqlite.Connection,
        *,
        event_retention: int,
        clock: Callable[[], float],
    ) -> None:
        self._db = db
        self._event_retention = event_retention
        self._clock = clock
        self._lock = asyncio.Lock()
        self._hub = ChangeHub()
        self._closed = False

    @classmethod
    async def open(
        cls,
        path: Path,
        *,
        event_retention: int = DEFAULT_EVENT_RETENTION,
        clock: Callable[[], float] = time.time,
    ) -> SqliteStore:
        """Open (creating if needed) the database at `path` and bring its schema up to date.

        event_retention: how many of the latest events the change log keeps (>= 1).
        clock: seconds since the epoch, for timestamps.
        Raises StartupError when the file cannot be used.
        """
        if event_retention < 1:
            raise ValueError(f"event_retention must be at least 1, got {event_retention}")
        try:
            db = await aiosqlite.connect(path, isolation_level=None)
        except sqlite3.Error as err:
            raise StartupError(f"cannot open the database {path}: {err}") from err
        try:
            await _configure(db, path)
            await _migrate(db, path)
        except BaseException:
            await db.close()
            raise
        return cls(db, event_retention=event_retention, clock=clock)

    async def close(self) -> None:
        self._hub.close()
        async with self._lock:
            if self._closed:
                return
            self._closed = True
            await self._db.close()

    def close_subscriptions(self) -> None:
        self._hub.close()

    def subscribe(self) -> Subscription:
        return self._hub.subscribe()

    async def settings(self) -> dict[str, str]:
        """Effective connection settings (journal_mode, synchronous, foreign_keys,
        busy_timeout), read back from SQLite: for diagnostics and tests."""
        values: dict[str, str] = {}
        async with self._lock:
            self._check_open()
            for pragma in ("journal_mode", "synchronous", "foreign_keys", "busy_timeout"):
                rows = list(await self._db.execute_fetchall(f"PRAGMA {pragma}"))
                values[pragma] = str(rows[0][0])
        return values

    async def current_revision(self) -> int:
        async with self._lock:
            self._check_open()
            return await _meta(self._db, "revision")

    # Deployments

    async def create_deployment(
        self,
        name: str,
        labels: Mapping[str, str],
        spec: deployment_pb2.DeploymentSpec,
        invoke_token_sha256: str,
    ) -> DeploymentRecord:
        async def body(tx: _Transaction) -> DeploymentRecord:
            existing = await _fetch_deployment(tx.db, name)
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
                create_time=_timestamp(now),
                update_time=_timestamp(now),
            )
            await tx.db.execute(
                f"INSERT INTO deployments ({_DEPLOYMENT_COLUMNS}) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, NULL, ?, NULL)",
                (
                    name,
                    _labels_json(labels),
                    spec.SerializeToString(),
                    deployment.revision,
                    1,
                    0,
                    now,
                    now,
                    invoke_token_sha256,
                ),
            )
            await tx.log(ChangeType.CREATED, ObjectKind.DEPLOYMENT, name, deployment)
            return DeploymentRecord(deployment, invoke_token_sha256)

        return await self._write(body)

    async def get_deployment(self, name: str) -> DeploymentRecord:
        async with self._lock:
            self._check_open()
            return await _require_deployment(self._db, name)

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
            f"SELECT {_DEPLOYMENT_COLUMNS} FROM deployments WHERE {' AND '.join(clauses)} "
            "ORDER BY name LIMIT ?"
        )
        async with self._lock:
            self._check_open()
            rows = list(await self._db.execute_fetchall(sql, params))
        records = [_deployment_from_row(row) for row in rows[:page_size]]
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
        async def body(tx: _Transaction) -> DeploymentRecord:
            record = await _require_live_deployment(tx.db, name, "update")
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
            return await tx.save_deployment(new, record.invoke_token_sha256)

        return await self._write(body)

    async def scale_deployment(
        self,
        name: str,
        min_instances: int | None,
        max_instances: int | None,
        expected_revision: int | None = None,
    ) -> DeploymentRecord:
        async def body(tx: _Transaction) -> DeploymentRecord:
            record = await _require_live_deployment(tx.db, name, "scale")
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
            return await tx.save_deployment(new, record.invoke_token_sha256)

        return await self._write(body)

    async def set_observed_generation(self, name: str, generation: int) -> DeploymentRecord:
        async def body(tx: _Transaction) -> DeploymentRecord:
            record = await _require_deployment(tx.db, name)
            if record.deployment.observed_generation == generation:
                return record
            new = deployment_pb2.Deployment()
            new.CopyFrom(record.deployment)
            new.observed_generation = generation
            return await tx.save_deployment(new, record.invoke_token_sha256)

        return await self._write(body)

    async def set_invoke_token_hash(self, name: str, invoke_token_sha256: str) -> DeploymentRecord:
        async def body(tx: _Transaction) -> DeploymentRecord:
            record = await _require_deployment(tx.db, name)
            return await tx.save_deployment(record.deployment, invoke_token_sha256)

        return await self._write(body)

    async def mark_deployment_deleted(
        self, name: str, expected_revision: int | None = None
    ) -> DeleteResult:
        async def body(tx: _Transaction) -> DeleteResult:
            record = await _require_deployment(tx.db, name)
            if expected_revision is not None:
                _check_revision(record, expected_revision)
            if record.deployment.HasField("delete_time"):
                return DeleteResult(record, removed=False)
            new = deployment_pb2.Deployment()
            new.CopyFrom(record.deployment)
            new.delete_time.CopyFrom(_timestamp(tx.now_us))
            if await _instance_count(tx.db, name) == 0:
                return DeleteResult(await tx.remove_deployment(new, record), removed=True)
            return DeleteResult(
                await tx.save_deployment(new, record.invoke_token_sha256), removed=False
            )

        return await self._write(body)

    async def purge_deployment(self, name: str) -> bool:
        async def body(tx: _Transaction) -> bool:
            record = await _fetch_deployment(tx.db, name)
            if record is None or not record.deployment.HasField("delete_time"):
                return False
            if await _instance_count(tx.db, name) > 0:
                return False
            await tx.remove_deployment(record.deployment, record)
            return True

        return await self._write(body)

    async def snapshot(self) -> Snapshot:
        async with self._lock:
            self._check_open()
            await self._db.execute("BEGIN")
            try:
                revision = await _meta(self._db, "revision")
                deployments = [
                    _deployment_from_row(row)
                    for row in await self._db.execute_fetchall(
                        f"SELECT {_DEPLOYMENT_COLUMNS} FROM deployments ORDER BY name"
                    )
                ]
                instances = await _select_instances(self._db, None)
            finally:
                await self._db.execute("COMMIT")
        return Snapshot(revision, deployments, instances)

    async def list_events_since(self, revision: int, limit: int = 1000) -> list[StoredEvent]:
        async with self._lock:
            self._check_open()
            current = await _meta(self._db, "revision")
            compacted = await _meta(self._db, "compacted_revision")
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
            rows = await self._db.execute_fetchall(
                "SELECT revision, type, kind, name, payload FROM events WHERE revision > ? "
                "ORDER BY revision LIMIT ?",
                (revision, limit),
            )
        return [
            StoredEvent(int(r[0]), ChangeType(r[1]), ObjectKind(r[2]), str(r[3]), bytes(r[4]))
            for r in rows
        ]

    # Nodes and instances

    async def put_node(self, node: node_pb2.Node, secret_sha256: str) -> None:
        async def body(tx: _Transaction) -> None:
            heartbeat = (
                _micros(node.last_heartbeat_time) if node.HasField("last_heartbeat_time") else None
            )
            await tx.db.execute(
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
                    _labels_json(node.labels),
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
        async with self._lock:
            self._check_open()
            rows = await self._db.execute_fetchall(
                f"SELECT {_NODE_COLUMNS} FROM nodes ORDER BY id"
            )
        return [_node_from_row(row) for row in rows]

    async def put_instance(
        self, instance: instance_pb2.Instance, spec: deployment_pb2.DeploymentSpec
    ) -> int:
        async def body(tx: _Transaction) -> int:
            if await _fetch_deployment(tx.db, instance.deployment) is None:
                raise NotFound(
                    f"instance {instance.id!r} names deployment {instance.deployment!r}, "
                    "which does not exist",
                    metadata={"deployment": instance.deployment},
                )
            node_rows = list(
                await tx.db.execute_fetchall(
                    "SELECT 1 FROM nodes WHERE id = ?", (instance.node_id,)
                )
            )
            if not node_rows:
                raise NotFound(
                    f"instance {instance.id!r} names node {instance.node_id!r}, which is not "
                    "registered",
                    metadata={"node_id": instance.node_id},
                )
            existing = list(
                await tx.db.execute_fetchall(
                    "SELECT create_time_us FROM instances WHERE id = ?", (instance.id,)
                )
            )
            stored = instance_pb2.Instance()
            stored.CopyFrom(instance)
            if existing:
                stored.create_time.CopyFrom(_timestamp(int(existing[0][0])))
            elif not stored.HasField("create_time"):
                stored.create_time.CopyFrom(_timestamp(tx.now_us))
            await tx.db.execute(
                f"INSERT OR REPLACE INTO instances ({_INSTANCE_COLUMNS}) "
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
                    _micros(stored.create_time),
                    tx.now_us,
                    _micros(stored.ready_time) if stored.HasField("ready_time") else None,
                    spec.SerializeToString(),
                ),
            )
            change = ChangeType.UPDATED if existing else ChangeType.CREATED
            return await tx.log(change, ObjectKind.INSTANCE, stored.id, stored)

        return await self._write(body)

    async def delete_instance(self, instance_id: str) -> int:
        async def body(tx: _Transaction) -> int:
            rows = await tx.db.execute_fetchall(
                f"SELECT {_INSTANCE_COLUMNS} FROM instances WHERE id = ?", (instance_id,)
            )
            found = [_instance_from_row(row) for row in rows]
            if not found:
                raise NotFound(
                    f"instance {instance_id!r} does not exist", metadata={"instance": instance_id}
                )
            await tx.db.execute("DELETE FROM instances WHERE id = ?", (instance_id,))
            return await tx.log(ChangeType.DELETED, ObjectKind.INSTANCE, instance_id, found[0])

        return await self._write(body)

    async def list_instances(self, deployment: str | None = None) -> list[instance_pb2.Instance]:
        async with self._lock:
            self._check_open()
            return await _select_instances(self._db, deployment)

    # The node side

    async def add_join_token(self, token_sha256: str, expire_time_us: int | None) -> None:
        async def body(tx: _Transaction) -> None:
            await tx.db.execute(
                "INSERT OR IGNORE INTO join_tokens (token_sha256, create_time_us, "
                "expire_time_us) VALUES (?, ?, ?)",
                (token_sha256, tx.now_us, expire_time_us),
            )

        await self._write(body)

    async def get_join_token(self, token_sha256: str) -> JoinTokenRecord | None:
        async with self._lock:
            self._check_open()
            rows = list(
                await self._db.execute_fetchall(
                    "SELECT token_sha256, create_time_us, expire_time_us FROM join_tokens "
                    "WHERE token_sha256 = ?",
                    (token_sha256,),
                )
            )
        if not rows:
            return None
        token, created, expires = rows[0]
        return JoinTokenRecord(str(token), int(created), None if expires is None else int(expires))

    async def list_node_records(self) -> list[NodeRecord]:
        async with self._lock:
            self._check_open()
            return await _select_node_records(self._db)

    async def update_node_info(self, node: node_pb2.Node) -> bool:
        async def body(tx: _Transaction) -> bool:
            heartbeat = (
                _micros(node.last_heartbeat_time) if node.HasField("last_heartbeat_time") else None
            )
            cursor = await tx.db.execute(
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
        async with self._lock:
            self._check_open()
            rows = await self._db.execute_fetchall(
                f"SELECT {_INSTANCE_RECORD_COLUMNS} FROM instances {where}"
                "ORDER BY deployment, id",
                params,
            )
        return [_instance_record_from_row(row) for row in rows]

    async def cluster_records(self) -> ClusterRecords:
        async with self._lock:
            self._check_open()
            await self._db.execute("BEGIN")
            try:
                revision = await _meta(self._db, "revision")
                deployments = [
                    _deployment_from_row(row)
                    for row in await self._db.execute_fetchall(
                        f"SELECT {_DEPLOYMENT_COLUMNS} FROM deployments ORDER BY name"
                    )
                ]
                instances = [
                    _instance_record_from_row(row)
                    for row in await self._db.execute_fetchall(
                        f"SELECT {_INSTANCE_RECORD_COLUMNS} FROM instances "
                        "ORDER BY deployment, id"
                    )
                ]
                nodes = await _select_node_records(self._db)
            finally:
                await self._db.execute("COMMIT")
        return ClusterRecords(revision, deployments, instances, nodes)

    async def report_instances(self, node_id: str, reports: Sequence[InstanceReport]) -> int:
        async def body(tx: _Transaction) -> int:
            changed = 0
            for report in reports:
                record = await _fetch_instance_record(tx.db, report.instance_id)
                if record is None or record.lost or record.instance.node_id != node_id:
                    continue
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
                if (
                    state == _State.INSTANCE_STATE_READY
                    and current.state != _State.INSTANCE_STATE_READY
                ):
                    new.ready_time.CopyFrom(_timestamp(tx.now_us))
                if new == current:
                    continue
                await tx.db.execute(
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
                        _micros(new.ready_time) if new.HasField("ready_time") else None,
                        tx.now_us,
                        new.id,
                    ),
                )
                await tx.log(ChangeType.UPDATED, ObjectKind.INSTANCE, new.id, new)
                changed += 1
            return changed

        return await self._write(body)

    async def commit_reconcile(self, batch: ReconcileBatch) -> int:
        async def body(tx: _Transaction) -> int:
            for node_id, state in sorted(batch.node_states.items()):
                await tx.db.execute(
                    "UPDATE nodes SET state = ? WHERE id = ?", (int(state), node_id)
                )
            for mark in batch.lost:
                await _mark_instance(tx, mark, lost=True)
            for mark in batch.drain:
                await _mark_instance(tx, mark, lost=False)
            for instance_id in batch.delete:
                await _delete_instance_row(tx, instance_id)
            for new in batch.create:
                await _insert_new_instance(tx, new)
            for name in batch.purge:
                record = await _fetch_deployment(tx.db, name)
                if (
                    record is not None
                    and record.deployment.HasField("delete_time")
                    and await _instance_count(tx.db, name) == 0
                ):
                    await tx.remove_deployment(record.deployment, record)
            for write in batch.status:
                await _write_status(tx, write)
            return tx.revision

        return await self._write(body)

    # Internals

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the store is closed")

    async def _write(self, body: Callable[[_Transaction], Awaitable[_T]]) -> _T:
        # Shielded: once started, the transaction commits (or rolls back) and publishes
        # even if the calling RPC is cancelled meanwhile.
        task = asyncio.ensure_future(self._run_write(body))
        task.add_done_callback(_retrieve_outcome)
        return await asyncio.shield(task)

    async def _run_write(self, body: Callable[[_Transaction], Awaitable[_T]]) -> _T:
        async with self._lock:
            self._check_open()
            await self._db.execute("BEGIN IMMEDIATE")
            try:
                tx = _Transaction(
                    self._db,
                    revision=await _meta(self._db, "revision"),
                    now_us=int(self._clock() * 1_000_000),
                )
                result = await body(tx)
                await tx.finish(self._event_retention)
                await self._db.execute("COMMIT")
            except BaseException:
                await _rollback(self._db)
                raise
            self._hub.publish(tx.events)
            return result


class _Transaction:
    """One write transaction: hands out revisions and collects the events it logs."""

    def __init__(self, db: aiosqlite.Connection, *, revision: int, now_us: int) -> None:
        self.db = db
        self.now_us = now_us
        self.events: list[StoredEvent] = []
        self._start_revision = revision
        self._revision = revision

    @property
    def revision(self) -> int:
        """The latest revision taken so far (the store's revision if none was taken)."""
        return self._revision

    def next_revision(self) -> int:
        """Take the next store revision; the caller must `log` an event with it."""
        self._revision += 1
        return self._revision

    async def log(
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
        await self.db.execute(
            "INSERT INTO events (revision, type, kind, name, payload) VALUES (?, ?, ?, ?, ?)",
            (revision, change.value, kind.value, name, data),
        )
        self.events.append(StoredEvent(revision, change, kind, name, data))
        return revision

    async def save_deployment(
        self, deployment: deployment_pb2.Deployment, invoke_token_sha256: str
    ) -> DeploymentRecord:
        """Write a changed deployment under a new revision and log UPDATED."""
        new = deployment_pb2.Deployment()
        new.CopyFrom(deployment)
        new.revision = self.next_revision()
        new.update_time.CopyFrom(_timestamp(self.now_us))
        await self.db.execute(
            "UPDATE deployments SET labels = ?, spec = ?, revision = ?, generation = ?, "
            "observed_generation = ?, update_time_us = ?, delete_time_us = ?, "
            "invoke_token_sha256 = ?, status = ? WHERE name = ?",
            (
                _labels_json(new.labels),
                new.spec.SerializeToString(),
                new.revision,
                new.generation,
                new.observed_generation,
                self.now_us,
                _micros(new.delete_time) if new.HasField("delete_time") else None,
                invoke_token_sha256,
                new.status.SerializeToString() if new.HasField("status") else None,
                new.name,
            ),
        )
        await self.log(ChangeType.UPDATED, ObjectKind.DEPLOYMENT, new.name, new)
        return DeploymentRecord(new, invoke_token_sha256)

    async def remove_deployment(
        self, deployment: deployment_pb2.Deployment, record: DeploymentRecord
    ) -> DeploymentRecord:
        """Delete the row and log DELETED with the deployment as it was removed."""
        gone = deployment_pb2.Deployment()
        gone.CopyFrom(deployment)
        gone.revision = self.next_revision()
        gone.update_time.CopyFrom(_timestamp(self.now_us))
        await self.db.execute("DELETE FROM deployments WHERE name = ?", (gone.name,))
        await self.log(ChangeType.DELETED, ObjectKind.DEPLOYMENT, gone.name, gone)
        return DeploymentRecord(gone, record.invoke_token_sha256)

    async def finish(self, event_retention: int) -> None:
        """Persist the counter and compact the log, inside the same transaction."""
        if self._revision == self._start_revision:
            return
        await self.db.execute(
            "UPDATE store_meta SET value = ? WHERE key = 'revision'", (self._revision,)
        )
        floor = self._revision - event_retention
        if floor > 0:
            await self.db.execute("DELETE FROM events WHERE revision <= ?", (floor,))
            await self.db.execute(
                "UPDATE store_meta SET value = max(value, ?) WHERE key = 'compacted_revision'",
                (floor,),
            )


def _retrieve_outcome(task: asyncio.Task[Any]) -> None:
    # A write whose caller was cancelled still ends in a result or a domain error that
    # nobody awaits; reading it keeps asyncio from logging "exception never retrieved".
    if not task.cancelled():
        task.exception()


async def _configure(db: aiosqlite.Connection, path: Path) -> None:
    await db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    rows = list(await db.execute_fetchall("PRAGMA journal_mode = WAL"))
    mode = str(rows[0][0]).lower() if rows else ""
    if mode != "wal":
        raise StartupError(
            f"cannot switch {path} to WAL journal mode (got {mode!r}); put the state dir "
            "on a local file system"
        )
    # FULL: with WAL this syncs the log at every commit, so an acknowledged write survives
    # a power cut, not only a killed process.
    await db.execute("PRAGMA synchronous = FULL")
    await db.execute("PRAGMA foreign_keys = ON")


async def _migrate(db: aiosqlite.Connection, path: Path) -> None:
    await db.execute(
        "CREATE TABLE IF NOT EXISTS schema_version ("
        "version INTEGER PRIMARY KEY, applied_time_us INTEGER NOT NULL) STRICT"
    )
    rows = list(await db.execute_fetchall("SELECT max(version) FROM schema_version"))
    current = int(rows[0][0]) if rows and rows[0][0] is not None else 0
    latest = MIGRATIONS[-1].version
    if current > latest:
        raise StartupError(
            f"{path} has schema version {current}, newer than this gpufleet knows "
            f"({latest}); run a newer gpufleet or point --state-dir elsewhere"
        )
    for migration in MIGRATIONS:
        if migration.version > current:
            await _apply(db, migration)
            _log.info("applied schema migration %d: %s", migration.version, migration.description)


async def _apply(db: aiosqlite.Connection, migration: Migration) -> None:
    await db.execute("BEGIN IMMEDIATE")
    try:
        for statement in migration.statements:
            await db.execute(statement)
        await db.execute(
            "INSERT INTO schema_version (version, applied_time_us) VALUES (?, ?)",
            (migration.version, int(time.time() * 1_000_000)),
        )
        await db.execute("COMMIT")
    except BaseException:
        await _rollback(db)
        raise


async def _rollback(db: aiosqlite.Connection) -> None:
    if db.in_transaction:
        await db.execute("ROLLBACK")


async def _meta(db: aiosqlite.Connection, key: str) -> int:
    rows = list(await db.execute_fetchall("SELECT value FROM store_meta WHERE key = ?", (key,)))
    return int(rows[0][0])


async def _fetch_deployment(db: aiosqlite.Connection, name: str) -> DeploymentRecord | None:
    rows = list(
        await db.execute_fetchall(
            f"SELECT {_DEPLOYMENT_COLUMNS} FROM deployments WHERE name = ?", (name,)
        )
    )
    return _deployment_from_row(rows[0]) if rows else None


async def _require_deployment(db: aiosqlite.Connection, name: str) -> DeploymentRecord:
    record = await _fetch_deployment(db, name)
    if record is None:
        raise NotFound(f"deployment {name!r} does not exist", metadata={"name": name})
    return record


async def _require_live_deployment(
    db: aiosqlite.Connection, name: str, action: str
) -> DeploymentRecord:
    record = await _require_deployment(db, name)
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


async def _fetch_instance_record(
    db: aiosqlite.Connection, instance_id: str
) -> InstanceRecord | None:
    rows = list(
        await db.execute_fetchall(
            f"SELECT {_INSTANCE_RECORD_COLUMNS} FROM instances WHERE id = ?", (instance_id,)
        )
    )
    return _instance_record_from_row(rows[0]) if rows else None


async def _mark_instance(tx: _Transaction, mark: InstanceMark, *, lost: bool) -> None:
    """Flag an instance lost (state FAILED) or draining (DRAINING while it still runs)."""
    record = await _fetch_instance_record(tx.db, mark.instance_id)
    if record is None or record.lost or (not lost and record.draining):
        return
    new = instance_pb2.Instance()
    new.CopyFrom(record.instance)
    new.reason = mark.reason
    if lost:
        new.state = _State.INSTANCE_STATE_FAILED
    elif new.state in _RUNNING_STATES:
        new.state = _State.INSTANCE_STATE_DRAINING
    await tx.db.execute(
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
    await tx.log(ChangeType.UPDATED, ObjectKind.INSTANCE, new.id, new)


async def _delete_instance_row(tx: _Transaction, instance_id: str) -> None:
    record = await _fetch_instance_record(tx.db, instance_id)
    if record is None:
        return
    await tx.db.execute("DELETE FROM instances WHERE id = ?", (instance_id,))
    await tx.log(ChangeType.DELETED, ObjectKind.INSTANCE, instance_id, record.instance)


async def _insert_new_instance(tx: _Transaction, new: NewInstance) -> None:
    """Insert a placed instance; skipped if its deployment or node vanished meanwhile (the
    next pass decides again)."""
    instance = instance_pb2.Instance()
    instance.CopyFrom(new.instance)
    deployment = await _fetch_deployment(tx.db, instance.deployment)
    node_rows = list(
        await tx.db.execute_fetchall("SELECT 1 FROM nodes WHERE id = ?", (instance.node_id,))
    )
    if deployment is None or not node_rows:
        return
    instance.create_time.CopyFrom(_timestamp(tx.now_us))
    await tx.db.execute(
        f"INSERT INTO instances ({_INSTANCE_RECORD_COLUMNS}) "
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
    await tx.log(ChangeType.CREATED, ObjectKind.INSTANCE, instance.id, instance)


async def _write_status(tx: _Transaction, write: StatusWrite) -> None:
    record = await _fetch_deployment(tx.db, write.name)
    if record is None:
        return
    new = deployment_pb2.Deployment()
    new.CopyFrom(record.deployment)
    new.observed_generation = write.observed_generation
    new.status.CopyFrom(write.status)
    if new == record.deployment:
        return
    await tx.save_deployment(new, record.invoke_token_sha256)


async def _instance_count(db: aiosqlite.Connection, deployment: str) -> int:
    rows = list(
        await db.execute_fetchall(
            "SELECT count(*) FROM instances WHERE deployment = ?", (deployment,)
        )
    )
    return int(rows[0][0])


async def _select_instances(
    db: aiosqlite.Connection, deployment: str | None
) -> list[instance_pb2.Instance]:
    if deployment is None:
        rows = await db.execute_fetchall(
            f"SELECT {_INSTANCE_COLUMNS} FROM instances ORDER BY deployment, id"
        )
    else:
        rows = await db.execute_fetchall(
            f"SELECT {_INSTANCE_COLUMNS} FROM instances WHERE deployment = ? ORDER BY id",
            (deployment,),
        )
    return [_instance_from_row(row) for row in rows]


def _deployment_from_row(row: Iterable[Any]) -> DeploymentRecord:
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
        create_time=_timestamp(create_us),
        update_time=_timestamp(update_us),
    )
    if delete_us is not None:
        deployment.delete_time.CopyFrom(_timestamp(delete_us))
    if status is not None:
        deployment.status.CopyFrom(deployment_pb2.DeploymentStatus.FromString(status))
    return DeploymentRecord(deployment, str(token_hash))


def _instance_from_row(row: Iterable[Any]) -> instance_pb2.Instance:
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
        create_time=_timestamp(create_us),
    )
    if ready_us is not None:
        instance.ready_time.CopyFrom(_timestamp(ready_us))
    return instance


def _instance_record_from_row(row: Sequence[Any]) -> InstanceRecord:
    values = tuple(row)
    *instance_values, draining, lost = values
    spec = deployment_pb2.DeploymentSpec.FromString(instance_values[-1])
    return InstanceRecord(
        instance=_instance_from_row(instance_values),
        spec=spec,
        draining=bool(draining),
        lost=bool(lost),
    )


async def _select_node_records(db: aiosqlite.Connection) -> list[NodeRecord]:
    rows = await db.execute_fetchall(
        f"SELECT {_NODE_COLUMNS}, secret_sha256 FROM nodes ORDER BY id"
    )
    records: list[NodeRecord] = []
    for row in rows:
        *node_values, secret = tuple(row)
        records.append(NodeRecord(_node_from_row(node_values), str(secret)))
    return records


def _node_from_row(row: Iterable[Any]) -> node_pb2.Node:
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
        node.last_heartbeat_time.CopyFrom(_timestamp(heartbeat_us))
    return node


def _labels_json(labels: Mapping[str, str]) -> str:
    return json.dumps(dict(sorted(labels.items())), separators=(",", ":"))


def _timestamp(micros: int) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromMicroseconds(micros)
    return ts


def _micros(ts: timestamp_pb2.Timestamp) -> int:
    return int(ts.ToMicroseconds())


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
