"""The state dir and its lock: one control plane per state dir."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from gpufleet.server.errors import StartupError

LOCK_FILE = "server.lock"
DATABASE_FILE = "gpufleet.db"


class StateDirLock:
    """An exclusive flock on `<state_dir>/server.lock`, held while the server runs.

    The kernel drops it when the process dies (kill -9 included), so no stale lock
    survives a crash.
    """

    def __init__(self, fd: int, path: Path) -> None:
        self._fd: int | None = fd
        self.path = path

    @classmethod
    def acquire(cls, state_dir: Path) -> StateDirLock:
        """Create the state dir (0700) if needed and lock it; StartupError if it is in use."""
        try:
            state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as err:
            raise StartupError(
                f"cannot create the state dir {state_dir}: {err.strerror or err}; pick "
                "another --state-dir"
            ) from err
        path = state_dir / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as err:
            raise StartupError(f"cannot open {path}: {err.strerror or err}") from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StartupError(
                f"another gpufleet server is using the state dir {state_dir}; stop it or "
                "pick another --state-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return cls(fd, path)

    def release(self) -> None:
        """Unlock (idempotent)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
