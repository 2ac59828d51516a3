"""Benchmark 4's baseline: a bare aiosqlite insert loop with the control plane's pragmas.

One connection in autocommit mode, so each INSERT is its own transaction and its own
durable commit: the floor that any store committing every write must stay above.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiosqlite

# The control plane's settings (gpufleet.server.store.sqlite._configure); read back and
# checked in open_baseline so a silent fallback cannot make the baseline look fast.
PRAGMAS = (
    "PRAGMA busy_timeout = 5000",
    "PRAGMA journal_mode = WAL",
    "PRAGMA synchronous = FULL",
    "PRAGMA foreign_keys = ON",
)
SYNCHRONOUS_FULL = 2


async def open_baseline(path: Path) -> aiosqlite.Connection:
    """A fresh database at `path` with one table, set up like the control plane's."""
    db = await aiosqlite.connect(path, isolation_level=None)
    try:
        for pragma in PRAGMAS:
            await db.execute(pragma)
        mode = list(await db.execute_fetchall("PRAGMA journal_mode"))[0][0]
        synchronous = list(await db.execute_fetchall("PRAGMA synchronous"))[0][0]
        if str(mode).lower() != "wal" or synchronous != SYNCHRONOUS_FULL:
            raise RuntimeError(
                f"baseline database {path} runs journal_mode={mode}, synchronous={synchronous}, "
                "not WAL/FULL; put --dir on a local file system"
            )
        await db.execute(
            "CREATE TABLE writes (name TEXT PRIMARY KEY, payload BLOB NOT NULL) STRICT"
        )
    except BaseException:
        await db.close()
        raise
    return db


async def insert_loop(
    db: aiosqlite.Connection,
    clients: int,
    seconds: float,
    prefix: str,
    payload: bytes,
) -> tuple[float, list[float]]:
    """`clients` writers inserting until `seconds` pass; (elapsed seconds, latency of each
    committed insert)."""
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def writer(client: int) -> None:
        count = 0
        while time.perf_counter() < deadline:
            name = f"{prefix}-{client}-{count}"
            count += 1
            started = time.perf_counter()
            # execute_fetchall: execute and close the cursor in one trip to the thread.
            await db.execute_fetchall(
                "INSERT INTO writes (name, payload) VALUES (?, ?)", (name, payload)
            )
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(writer(client) for client in range(clients)))
    return time.perf_counter() - started, latencies
