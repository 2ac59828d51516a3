"""The store's one SQLite connection, owned by aiosqlite, and a way to run a whole
synchronous function on the connection's thread.

aiosqlite runs every call on one thread per connection, one at a time, in the order they
were submitted. A transaction sent as separate aiosqlite calls pays one thread hand-off
(and one event-loop turn) per statement, and nothing else may touch the connection in
between; the same transaction as one function pays one hand-off and is atomic with
respect to every other call by construction.

aiosqlite has no public method for submitting a function. `Connection._execute(fn, *args)`
is the method each of its own public calls goes through; it is used here and nowhere
else, and checked when the store opens, so that an aiosqlite without it fails at startup
with a clear message instead of mid-write.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

import aiosqlite

from gpufleet.server.errors import StartupError

_T = TypeVar("_T")

_SUBMIT = "_execute"
# aiosqlite's own default for cursors it iterates; the store never iterates cursors.
_ITER_CHUNK_SIZE = 64


class DbThread:
    """One SQLite connection whose functions all run, in order, on aiosqlite's thread."""

    def __init__(self, db: aiosqlite.Connection, conn: sqlite3.Connection) -> None:
        self._db = db
        self._conn = conn
        self._submit: Callable[..., Any] = getattr(db, _SUBMIT)

    @classmethod
    async def open(cls, path: Path) -> DbThread:
        """Connect to `path` in autocommit mode (the store issues BEGIN/COMMIT itself).

        Raises StartupError when the file cannot be opened or aiosqlite lacks what this
        module relies on.
        """
        if not callable(getattr(aiosqlite.Connection, _SUBMIT, None)):
            raise StartupError(
                f"aiosqlite {aiosqlite.__version__} has no Connection.{_SUBMIT}, which the "
                "store uses to run a transaction on the connection's thread; install the "
                "aiosqlite release the store is tested with (0.22)"
            )
        opened: list[sqlite3.Connection] = []

        def connector() -> sqlite3.Connection:
            conn = sqlite3.connect(path, isolation_level=None)
            opened.append(conn)
            return conn

        try:
            db = await aiosqlite.Connection(connector, _ITER_CHUNK_SIZE)
        except sqlite3.Error as err:
            raise StartupError(f"cannot open the database {path}: {err}") from err
        return cls(db, opened[0])

    async def run(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run `fn(connection)` on the connection's thread and return what it returns (or
        raise what it raises). Calls run one at a time, in the order of `run` calls."""
        return cast(_T, await self._submit(fn, self._conn))

    async def close(self) -> None:
        """Finish the calls already submitted, then close the connection and its thread."""
        await self._db.close()
