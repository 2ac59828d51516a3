"""Group commit in SqliteStore: writes queued together share one durable transaction, each
in its own savepoint; a failing write is undone alone; revisions stay dense and ordered."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiosqlite
import pytest

from gpufleet.server import errors
from gpufleet.server.store import ChangeType, ObjectKind, SqliteStore, group_commit
from gpufleet.server.store.group_commit import Write, apply_batch, compaction_floor
from gpufleet.server.store.transaction import Transaction
from gpufleet.v1 import deployment_pb2, instance_pb2

HASH = "0" * 64


def spec(command: str = "python -m model") -> deployment_pb2.DeploymentSpec:
    return deployment_pb2.DeploymentSpec(command=command, port=8000)


@pytest.fixture
def batch_sizes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Sizes of the transactions the store commits, in order."""
    sizes: list[int] = []
    real = group_commit.apply_batch

    def counting(db: sqlite3.Connection, writes: Sequence[Write], event_retention: int) -> Any:
        sizes.append(len(writes))
        return real(db, writes, event_retention)

    monkeypatch.setattr(group_commit, "apply_batch", counting)
    return sizes


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    opened = await SqliteStore.open(tmp_path / "state.db")
    yield opened
    await opened.close()


async def outcomes(*calls: Any) -> list[Any]:
    """Start every call in the same event-loop turn, so that all of them queue up before
    the writer runs; their results or errors, in call order."""
    tasks = [asyncio.ensure_future(call) for call in calls]
    return list(await asyncio.gather(*tasks, return_exceptions=True))


def revision_of(outcome: Any) -> int:
    assert not isinstance(outcome, BaseException), outcome
    return int(outcome.deployment.revision)


async def test_a_stale_write_fails_alone_and_the_others_commit_together(
    tmp_path: Path, batch_sizes: list[int]
) -> None:
    path = tmp_path / "state.db"
    store = await SqliteStore.open(path)
    try:
        first = await store.create_deployment("a", {}, spec(), HASH)
        with store.subscribe() as sub:
            results = await outcomes(
                store.create_deployment("b", {}, spec(), HASH),
                store.update_deployment("a", {}, spec("v2"), first.deployment.revision),
                # Stale: the update just before it in the same batch moved "a" on.
                store.update_deployment("a", {}, spec("v3"), first.deployment.revision),
                store.create_deployment("c", {}, spec(), HASH),
                store.create_deployment("b", {}, spec(), HASH),
                store.create_deployment("d", {}, spec(), HASH),
            )
            published = sub.take_pending()
        assert batch_sizes == [1, 6]
        assert [revision_of(results[i]) for i in (0, 1, 3, 5)] == [2, 3, 4, 5]
        stale = results[2]
        assert isinstance(stale, errors.RevisionMismatch)
        assert (stale.expected, stale.actual) == (1, 3)
        assert isinstance(results[4], errors.AlreadyExists)
        expected = [
            (1, ChangeType.CREATED, "a"),
            (2, ChangeType.CREATED, "b"),
            (3, ChangeType.UPDATED, "a"),
            (4, ChangeType.CREATED, "c"),
            (5, ChangeType.CREATED, "d"),
        ]
        logged = await store.list_events_since(0)
        assert [(e.revision, e.type, e.name) for e in logged] == expected
        assert published == logged[1:]
        assert logged[2].deployment().spec.command == "v2"
        assert await store.current_revision() == 5
    finally:
        await store.close()
    reopened = await SqliteStore.open(path)
    try:
        assert (await reopened.get_deployment("a")).deployment.spec.command == "v2"
        names = [r.deployment.name for r in (await reopened.list_deployments(10)).deployments]
        assert names == ["a", "b", "c", "d"]
        assert await reopened.current_revision() == 5
    finally:
        await reopened.close()


async def test_revisions_stay_dense_and_ordered_across_many_batches(tmp_path: Path) -> None:
    store = await SqliteStore.open(tmp_path / "state.db", max_batch=4)
    try:
        with store.subscribe() as sub:

            async def writer(number: int) -> list[int]:
                name = f"w{number}"
                record = await store.create_deployment(name, {}, spec(), HASH)
                revisions = [record.deployment.revision]
                for version in range(3):
                    record = await store.update_deployment(
                        name, {"v": str(version)}, spec(), record.deployment.revision
                    )
                    revisions.append(record.deployment.revision)
                return revisions

            per_writer = await asyncio.gather(*(writer(n) for n in range(10)))
            published = sub.take_pending()
        for revisions in per_writer:
            assert revisions == sorted(revisions)
        every = sorted(r for revisions in per_writer for r in revisions)
        assert every == list(range(1, 41))
        logged = await store.list_events_since(0)
        assert [e.revision for e in logged] == every
        assert published == logged
        for revisions, number in zip(per_writer, range(10), strict=True):
            mine = [e for e in logged if e.name == f"w{number}"]
            assert [e.revision for e in mine] == revisions
            assert [e.deployment().revision for e in mine] == revisions
    finally:
        await store.close()


async def test_a_cancelled_caller_does_not_stop_its_write(store: SqliteStore) -> None:
    with store.subscribe() as sub:
        task = asyncio.ensure_future(store.create_deployment("a", {}, spec(), HASH))
        await asyncio.sleep(0)  # the call is queued now
        task.cancel()
        event = await asyncio.wait_for(sub.next(), timeout=10)
    assert (event.revision, event.type, event.name) == (1, ChangeType.CREATED, "a")
    assert task.cancelled()
    assert (await store.get_deployment("a")).deployment.revision == 1


async def test_close_commits_the_queued_writes_then_refuses_new_ones(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = await SqliteStore.open(path)
    writes = [
        asyncio.ensure_future(store.create_deployment(f"d{n}", {}, spec(), HASH)) for n in range(5)
    ]
    await asyncio.sleep(0)
    await store.close()
    assert [revision_of(w.result()) for w in writes] == [1, 2, 3, 4, 5]
    with pytest.raises(RuntimeError, match="closed"):
        await store.create_deployment("late", {}, spec(), HASH)
    with pytest.raises(RuntimeError, match="closed"):
        await store.current_revision()
    await store.close()  # closing twice is harmless
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT count(*) FROM deployments").fetchone()[0] == 5


async def test_the_event_log_is_compacted_in_batches(tmp_path: Path) -> None:
    store = await SqliteStore.open(tmp_path / "state.db", event_retention=20)
    try:
        kept: list[int] = []
        record = await store.create_deployment("a", {}, spec(), HASH)
        for i in range(59):
            record = await store.update_deployment(
                "a", {"i": str(i)}, spec(), record.deployment.revision
            )
            events = await store.list_events_since(max(0, record.deployment.revision - 20))
            assert [e.revision for e in events][-1] == record.deployment.revision
            kept.append(len(await _all_kept_events(tmp_path / "state.db")))
        # Never fewer than the retention; cut back once it holds a tenth more (22 > 20 + 2).
        assert min(kept[19:]) == 20 and max(kept) == 22
        with pytest.raises(errors.OutOfRange, match="compacted"):
            await store.list_events_since(0)
    finally:
        await store.close()


async def _all_kept_events(path: Path) -> list[int]:
    with sqlite3.connect(path) as db:
        return [int(r[0]) for r in db.execute("SELECT revision FROM events")]


@pytest.mark.parametrize(
    ("revision", "compacted", "retention", "floor"),
    [
        (5, 0, 5, None),
        (6, 0, 5, 1),
        (110, 0, 100, None),
        (111, 0, 100, 11),
        (121, 11, 100, None),
        (122, 11, 100, 22),
    ],
)
def test_compaction_floor(revision: int, compacted: int, retention: int, floor: int | None) -> None:
    assert compaction_floor(revision, compacted, retention) == floor


# apply_batch on a raw connection: what one transaction does with failing writes.


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[sqlite3.Connection]:
    path = tmp_path / "state.db"
    await (await SqliteStore.open(path)).close()  # creates the schema
    conn = sqlite3.connect(path, isolation_level=None)
    yield conn
    conn.close()


def log_instance(name: str) -> Any:
    def body(tx: Transaction) -> int:
        return tx.log(ChangeType.CREATED, ObjectKind.INSTANCE, name, instance_pb2.Instance(id=name))

    return body


def fail_after_logging(name: str) -> Any:
    def body(tx: Transaction) -> int:
        log_instance(name)(tx)
        raise errors.NotFound(f"{name} is gone")

    return body


def logged(db: sqlite3.Connection) -> list[tuple[int, str]]:
    return [(int(r[0]), str(r[1])) for r in db.execute("SELECT revision, name FROM events")]


def test_a_failing_write_is_undone_to_its_savepoint(db: sqlite3.Connection) -> None:
    result = apply_batch(
        db,
        [Write(log_instance("x"), 1), Write(fail_after_logging("y"), 2), Write(log_instance("z"), 3)],
        event_retention=100,
    )
    assert [type(o).__name__ for o in result.outcomes] == ["Done", "Failed", "Done"]
    assert [o.value for o in result.outcomes if isinstance(o, group_commit.Done)] == [1, 2]
    assert [(e.revision, e.type, e.kind, e.name) for e in result.events] == [
        (1, ChangeType.CREATED, ObjectKind.INSTANCE, "x"),
        (2, ChangeType.CREATED, ObjectKind.INSTANCE, "z"),
    ]
    assert logged(db) == [(1, "x"), (2, "z")]
    assert db.execute("SELECT value FROM store_meta WHERE key = 'revision'").fetchone()[0] == 2
    assert not db.in_transaction


def test_a_write_that_ends_the_transaction_fails_the_whole_batch(db: sqlite3.Connection) -> None:
    def ends_transaction(tx: Transaction) -> None:
        tx.db.execute("ROLLBACK")  # as SQLite does itself on a full disk or an I/O error
        raise sqlite3.OperationalError("database or disk is full")

    with pytest.raises(sqlite3.OperationalError, match="disk is full"):
        apply_batch(
            db,
            [Write(log_instance("x"), 1), Write(ends_transaction, 2), Write(log_instance("z"), 3)],
            event_retention=100,
        )
    assert logged(db) == []
    assert db.execute("SELECT value FROM store_meta WHERE key = 'revision'").fetchone()[0] == 0
    assert not db.in_transaction


async def test_a_failed_transaction_fails_every_caller_of_its_batch(
    store: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = group_commit.apply_batch

    def failing_commit(db: sqlite3.Connection, writes: Sequence[Write], event_retention: int) -> Any:
        def fail(tx: Transaction) -> None:
            tx.db.execute("ROLLBACK")
            raise sqlite3.OperationalError("disk I/O error")

        return real(db, [*writes, Write(fail, 0)], event_retention)

    monkeypatch.setattr(group_commit, "apply_batch", failing_commit)
    results = await outcomes(
        store.create_deployment("a", {}, spec(), HASH),
        store.create_deployment("b", {}, spec(), HASH),
    )
    assert all(isinstance(r, sqlite3.OperationalError) for r in results)
    monkeypatch.setattr(group_commit, "apply_batch", real)
    assert await store.current_revision() == 0
    assert (await store.create_deployment("a", {}, spec(), HASH)).deployment.revision == 1


async def test_an_aiosqlite_without_function_submission_is_refused_at_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delattr(aiosqlite.Connection, "_execute")
    with pytest.raises(errors.StartupError, match="aiosqlite .* has no Connection._execute"):
        await SqliteStore.open(tmp_path / "state.db")
