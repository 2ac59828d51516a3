"""Reading an instance's logs, as written by the log pump (`logpump.py`).

Used by the agent (to answer log requests) and by `gpufleet logs` on the node.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

from gpufleet.agent.runtime.logpump import rotated_name
from gpufleet.agent.runtime.paths import instance_logs_dir

_BLOCK = 65536


def _tail_of_fd(fd: int, end: int, wanted: int) -> list[bytes]:
    """The last `wanted` lines of the first `end` bytes of `fd` (a partial last line counts)."""
    if wanted <= 0 or end <= 0:
        return []
    chunks: list[bytes] = []
    newlines = 0
    position = end
    # Read backwards until there are more newlines than wanted lines, or the file starts.
    while position > 0 and newlines <= wanted:
        size = min(_BLOCK, position)
        position -= size
        chunk = os.pread(fd, size, position)
        chunks.append(chunk)
        newlines += chunk.count(b"\n")
    data = b"".join(reversed(chunks))
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    if position > 0:
        # The first line is cut off by the block boundary; it is not wanted anyway.
        lines = lines[1:]
    return lines[-wanted:]


def _log_files(directory: Path) -> list[Path]:
    """Existing log files, newest first."""
    files = []
    index = 0
    while True:
        path = directory / rotated_name(index)
        if not path.exists():
            if index > 0:
                break
        else:
            files.append(path)
        index += 1
    return files


def _tail_lines(directory: Path, wanted: int, live_fd: int | None, live_end: int) -> list[bytes]:
    """Last `wanted` lines over the live file (through `live_fd`, up to `live_end`) and
    the rotated files, oldest line first."""
    collected: list[bytes] = []
    live_inode = os.fstat(live_fd).st_ino if live_fd is not None else None
    for path in _log_files(directory):
        if len(collected) >= wanted:
            break
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            # Rotated away between listing and opening: its lines are in the next file.
            continue
        try:
            stat = os.fstat(fd)
            end = stat.st_size
            if live_inode is not None:
                if stat.st_ino == live_inode:
                    # The pinned file, wherever rotation has moved it: only up to live_end.
                    end = min(end, live_end)
                elif path.name == rotated_name(0):
                    # A newer file than the pinned one: the follower reads it later.
                    continue
            lines = _tail_of_fd(fd, end, wanted - len(collected))
        finally:
            os.close(fd)
        collected = lines + collected
    return collected[-wanted:] if wanted > 0 else []


def read_log_tail(state_dir: str | os.PathLike[str], instance_id: str, lines: int) -> str:
    """The last `lines` lines of an instance's output (stdout and stderr interleaved).

    Reads across rotated files. Raises FileNotFoundError when the instance never ran here.
    """
    directory = instance_logs_dir(state_dir, instance_id)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"no logs for instance {instance_id!r} under {directory}: "
            "check the instance id and that it ran on this node"
        )
    tail = _tail_lines(directory, lines, None, 0)
    return "".join(line.decode("utf-8", "replace") + "\n" for line in tail)


def _listing(directory: Path) -> list[int]:
    """Inodes of the live file and the rotated files, newest first, as far as contiguous."""
    inodes = []
    for index in range(1_000_000):
        try:
            inodes.append((directory / rotated_name(index)).stat().st_ino)
        except FileNotFoundError:
            break
    return inodes


def _open_successor(directory: Path, inode: int) -> int | None:
    """Open the file the pump began after the one with `inode`; None if it has not yet.

    Rotation only shifts names (.k becomes .k+1), so the successor of the file now named .k
    is the one named .k-1, and that of .1 is the live file. A file deleted already (the
    reader fell more than `keep` files behind) is succeeded by the oldest file left.
    """
    for _ in range(100):
        before = _listing(directory)
        if inode in before:
            target = before.index(inode) - 1
            if target < 0:
                return None
        elif before:
            target = len(before) - 1
        else:
            return None
        try:
            fd = os.open(directory / rotated_name(target), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        # Trust the choice only if no rotation ran while it was made.
        if _listing(directory) == before and os.fstat(fd).st_ino == before[target]:
            return fd
        os.close(fd)
    return None


async def follow_log(
    state_dir: str | os.PathLike[str],
    instance_id: str,
    *,
    tail_lines: int = 10,
    poll_interval: float = 0.25,
) -> AsyncIterator[str]:
    """Yield the last `tail_lines` lines, then each new line as it is written ("tail -F").

    Follows the pump's files across rotations without losing or repeating lines (unless
    the reader falls more than `keep` files behind). Runs until the caller stops iterating
    (break or cancel); polls every `poll_interval` seconds. Lines come without their
    trailing newline.
    """
    directory = instance_logs_dir(state_dir, instance_id)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"no logs for instance {instance_id!r} under {directory}: "
            "check the instance id and that it ran on this node"
        )
    live_path = directory / rotated_name(0)
    fd: int | None = None
    while fd is None:
        try:
            fd = os.open(live_path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            # The pump creates the file when it starts; wait for it.
            await asyncio.sleep(poll_interval)
    try:
        position = os.fstat(fd).st_size
        for line in _tail_lines(directory, tail_lines, fd, position):
            yield line.decode("utf-8", "replace")
        pending = b""
        while True:
            data = os.pread(fd, _BLOCK, position)
            if data:
                position += len(data)
                pending += data
                *complete, pending = pending.split(b"\n")
                for line in complete:
                    yield line.decode("utf-8", "replace")
                continue
            successor = _open_successor(directory, os.fstat(fd).st_ino)
            if successor is None:
                await asyncio.sleep(poll_interval)
                continue
            # The pump finished our file before it began the successor, but read whatever
            # arrived between our last read and that check.
            data = os.pread(fd, _BLOCK, position)
            if data:
                os.close(successor)
                continue
            os.close(fd)
            fd = successor
            position = 0
    finally:
        if fd is not None:
            os.close(fd)
