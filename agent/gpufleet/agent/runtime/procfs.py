"""Process facts read from /proc (Linux): identity, liveness, process-group members."""

from __future__ import annotations

import os
from dataclasses import dataclass

PROC = "/proc"
# States of a process that has exited: zombie (not reaped yet) and dead.
_EXITED_STATES = frozenset({"Z", "X", "x"})


@dataclass(frozen=True)
class ProcStat:
    """The fields of /proc/<pid>/stat the runtime needs."""

    state: str
    ppid: int
    pgid: int
    start_ticks: int
    """Start time in clock ticks after boot: with the pid, it identifies one process."""


def read_stat(pid: int) -> ProcStat | None:
    """Parse /proc/<pid>/stat; None when there is no such process."""
    try:
        with open(f"{PROC}/{pid}/stat", "rb") as f:
            raw = f.read().decode("ascii", "replace")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) is in parentheses and may itself hold spaces and ')'.
    fields = raw[raw.rfind(")") + 2 :].split()
    try:
        return ProcStat(
            state=fields[0],
            ppid=int(fields[1]),
            pgid=int(fields[2]),
            start_ticks=int(fields[19]),
        )
    except (IndexError, ValueError):
        return None


def start_ticks(pid: int) -> int | None:
    """Start time of `pid` in clock ticks after boot; None when it does not exist."""
    stat = read_stat(pid)
    return stat.start_ticks if stat is not None else None


def is_running(pid: int, expected_start_ticks: int) -> bool:
    """True when `pid` is the same, still running process (not a zombie, not a reused pid)."""
    stat = read_stat(pid)
    return (
        stat is not None
        and stat.state not in _EXITED_STATES
        and stat.start_ticks == expected_start_ticks
    )


def group_members(pgid: int) -> list[int]:
    """Pids of the running (non-zombie) processes in process group `pgid`."""
    try:
        # Cheap check first: no process at all in the group.
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return []
    except PermissionError:
        pass
    members = []
    for name in os.listdir(PROC):
        if not name.isdigit():
            continue
        stat = read_stat(int(name))
        if stat is not None and stat.pgid == pgid and stat.state not in _EXITED_STATES:
            members.append(int(name))
    return members
