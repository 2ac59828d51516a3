"""Group commit: the writes that queue up while one transaction commits share the next one.

A durable COMMIT (WAL, synchronous=FULL) waits for the disk; running a write costs far
less. So one writer task takes every queued write, runs them in ONE SQLite transaction on
the database thread, each inside a savepoint of its own, commits once, publishes the
events, and only then answers each caller.

A write that raises (a stale revision, a name already taken) is rolled back to its
savepoint alone; the writes before and after it still commit. When the transaction itself
fails (the COMMIT, or an error after which SQLite has already rolled everything back),
no write of the batch is acknowledged: every caller gets that error.

Outcomes, errors included, are handed out only after the COMMIT: a write may have failed
because of an earlier write in its batch, which is not durable before then.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

from gpufleet.server.store.db_thread import DbThread
from gpufleet.server.store.records import StoredEvent
from gpufleet.server.store.transaction import Transaction, WriteBody

_T = TypeVar("_T")

DEFAULT_MAX_BATCH = 256
"""Most writes in one transaction: bounds how long a batch keeps the thread, and so the
wait of reads queued behind it."""


@dataclass(frozen=True)
class Write:
    """One queued write, as the database thread gets it."""

    body: WriteBody[Any]
    now_us: int
    """The write's timestamp (microseconds since the epoch), taken when it was queued."""


@dataclass(frozen=True)
class Done:
    """A write that committed with the batch, and what it returned."""

    value: Any


@dataclass(frozen=True)
class Failed:
    """A write rolled back to its savepoint, and the error it raised."""

    error: Exception


@dataclass(frozen=True)
class BatchResult:
    """What one committed batch did."""

    outcomes: list[Done | Failed]
    """One per write, in the order given."""
    events: list[StoredEvent]
    """Every committed event of the batch, in revision order."""


def compaction_floor(revision: int, compacted: int, event_retention: int) -> int | None:
    """The revision up to which to delete events now, or None to leave the log as it is.

    The log holds the events after `compacted`. It is cut back to the last
    `event_retention` only once it has grown a tenth beyond that, so the DELETE runs once
    per many writes instead of on each one.
    """
    if revision - compacted > event_retention + event_retention // 10:
        return revision - event_retention
    return None


def apply_batch(db: sqlite3.Connection, writes: Sequence[Write], event_retention: int) -> BatchResult:
    """Run `writes` in one transaction, each in its own savepoint, and commit (on the
    database thread). Raises, with nothing written, when the transaction fails as a whole."""
    db.execute("BEGIN IMMEDIATE")
    try:
        start, compacted = _counters(db)
        revision = start
        outcomes: list[Done | Failed] = []
        events: list[StoredEvent] = []
        for write in writes:
            db.execute("SAVEPOINT write")
            tx = Transaction(db, revision=revision, now_us=write.now_us)
            try:
                value = write.body(tx)
            except Exception as err:
                if not db.in_transaction:
                    raise  # SQLite rolled back the whole transaction: nothing can commit
                db.execute("ROLLBACK TO write")
                db.execute("RELEASE write")
                outcomes.append(Failed(err))
                continue
            db.execute("RELEASE write")
            revision = tx.revision
            events.extend(tx.events)
            outcomes.append(Done(value))
        if revision != start:
            db.execute("UPDATE store_meta SET value = ? WHERE key = 'revision'", (revision,))
            floor = compaction_floor(revision, compacted, event_retention)
            if floor is not None:
                db.execute("DELETE FROM events WHERE revision <= ?", (floor,))
                db.execute(
                    "UPDATE store_meta SET value = max(value, ?) WHERE key = 'compacted_revision'",
                    (floor,),
                )
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    return BatchResult(outcomes, events)


class GroupCommitter:
    """Queues writes and commits them in batches, one batch at a time."""

    def __init__(
        self,
        thread: DbThread,
        *,
        event_retention: int,
        publish: Callable[[Sequence[StoredEvent]], None],
        max_batch: int = DEFAULT_MAX_BATCH,
    ) -> None:
        """publish: called with each batch's events right after its COMMIT, before any of
        its callers is answered."""
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self._thread = thread
        self._event_retention = event_retention
        self._publish = publish
        self._max_batch = max_batch
        self._queue: deque[tuple[Write, asyncio.Future[Any]]] = deque()
        self._writer: asyncio.Task[None] | None = None
        self._closed = False

    async def write(self, body: WriteBody[_T], now_us: int) -> _T:
        """Run `body` in the next batch; returns its result once the batch is durably
        committed, or raises the error it raised.

        Cancelling the caller does not cancel the write: once queued, it commits (or fails)
        and its events are published either way.
        """
        if self._closed:
            raise RuntimeError("the store is closed")
        future: asyncio.Future[_T] = asyncio.get_running_loop().create_future()
        future.add_done_callback(_retrieve_outcome)
        self._queue.append((Write(body, now_us), future))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._drain(), name="gpufleet-store-writer")
        return await asyncio.shield(future)

    async def close(self) -> None:
        """Refuse new writes, and return once the queued ones are committed."""
        self._closed = True
        if self._writer is not None:
            await asyncio.shield(self._writer)

    async def _drain(self) -> None:
        try:
            while self._queue:
                count = min(len(self._queue), self._max_batch)
                await self._commit([self._queue.popleft() for _ in range(count)])
        finally:
            # Jobs are left only when this task was cancelled (the event loop is ending).
            while self._queue:
                self._queue.popleft()[1].cancel()

    async def _commit(self, batch: list[tuple[Write, asyncio.Future[Any]]]) -> None:
        run = partial(
            apply_batch, writes=[write for write, _ in batch], event_retention=self._event_retention
        )
        try:
            result = await self._thread.run(run)
        except BaseException as err:
            for _, future in batch:
                if future.done():
                    continue
                if isinstance(err, asyncio.CancelledError):
                    future.cancel()
                else:
                    future.set_exception(err)
            if not isinstance(err, Exception):
                raise
            return
        self._publish(result.events)
        for (_, future), outcome in zip(batch, result.outcomes, strict=True):
            if future.done():
                continue
            if isinstance(outcome, Failed):
                future.set_exception(outcome.error)
            else:
                future.set_result(outcome.value)


def _counters(db: sqlite3.Connection) -> tuple[int, int]:
    """(revision, compacted_revision) as stored."""
    values = dict(
        db.execute(
            "SELECT key, value FROM store_meta WHERE key IN ('revision', 'compacted_revision')"
        ).fetchall()
    )
    return int(values["revision"]), int(values["compacted_revision"])


def _retrieve_outcome(future: asyncio.Future[Any]) -> None:
    # A write whose caller was cancelled still ends in a result or an error that nobody
    # awaits; reading it keeps asyncio from logging "exception never retrieved".
    if not future.cancelled():
        future.exception()
