"""Servers the benchmarks start as real processes (`python -m ...`), and their CPU time.

A server announces itself with one stdout line ("... listening on HOST:PORT"); the
benchmark waits for that line, then reads the process's CPU time from /proc (Linux only)
around each measured phase. Each server runs in a session of its own so that stopping it
stops everything it started, and its stderr goes to a file that is shown if it fails.
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NoReturn

REPO_ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 15.0
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid`, all its threads, so far."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text(encoding="ascii")
    except OSError as err:
        raise RuntimeError(
            f"cannot read /proc/{pid}/stat ({err.strerror or err}): the process is gone, or "
            "this is not Linux (the benchmarks read CPU time from /proc)"
        ) from None
    # After the ")" that closes the command name (which may hold spaces), field 3 (state)
    # comes first, so utime (field 14) and stime (field 15) sit at 11 and 12.
    fields = text.rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


class ServerProcess:
    """One `python -m MODULE ARGS...` that prints `prefix + address` once it listens (or,
    for a client process, `prefix + whatever it has to say` once it is ready)."""

    def __init__(
        self,
        name: str,
        module_args: Sequence[str],
        prefix: str,
        log_dir: Path,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self._args = [sys.executable, "-m", *module_args]
        self._prefix = prefix
        self._stderr_path = log_dir / f"{name}.stderr"
        self._env = dict(os.environ if env is None else env)
        self._process: subprocess.Popen[bytes] | None = None
        self.address = ""
        self.announced: list[str] = []
        """Every stdout line up to and including the listening line."""

    @property
    def pid(self) -> int:
        return self._started().pid

    def start(self, timeout: float = START_TIMEOUT_SECONDS) -> str:
        """Start the process and return the address it announced."""
        with self._stderr_path.open("wb") as stderr:
            self._process = subprocess.Popen(
                self._args,
                cwd=REPO_ROOT,
                env=self._env,
                stdout=subprocess.PIPE,
                stderr=stderr,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while True:
            line = self._read_line(deadline)
            self.announced.append(line)
            if line.startswith(self._prefix):
                self.address = line[len(self._prefix) :].strip()
                return self.address

    def read_line(self, timeout: float) -> str:
        """The next stdout line after the listening line (RuntimeError after `timeout`)."""
        return self._read_line(time.monotonic() + timeout)

    def cpu_seconds(self) -> float:
        """CPU seconds the process has used so far."""
        return cpu_seconds(self.pid)

    def stderr(self) -> str:
        """What the process wrote to stderr so far."""
        return self._stderr_path.read_text(encoding="utf-8", errors="replace")

    def stop(self, timeout: float = STOP_TIMEOUT_SECONDS) -> int | None:
        """SIGTERM its session, SIGKILL after `timeout`; returns the exit status."""
        process = self._process
        if process is None:
            return None
        if process.poll() is None:
            _signal_session(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                _signal_session(process.pid, signal.SIGKILL)
                process.wait(timeout)
        if process.stdout is not None:
            process.stdout.close()
        return process.returncode

    def _started(self) -> subprocess.Popen[bytes]:
        if self._process is None:
            raise RuntimeError(f"{self.name} was not started; call start() first")
        return self._process

    def _read_line(self, deadline: float) -> str:
        process = self._started()
        if process.stdout is None:
            raise RuntimeError(f"{self.name} has no stdout pipe")
        received = b""
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ)
            while b"\n" not in received:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not selector.select(remaining):
                    self._fail(f"printed no line in time (waiting for '{self._prefix}...')")
                # One byte at a time: whatever follows the line stays in the pipe, unread.
                chunk = os.read(process.stdout.fileno(), 1)
                if not chunk:
                    process.wait(STOP_TIMEOUT_SECONDS)
                    self._fail(f"exited with status {process.returncode} before listening")
                received += chunk
        return received.decode(errors="replace").rstrip("\n")

    def _fail(self, problem: str) -> NoReturn:
        self.stop()
        raise RuntimeError(
            f"{self.name} ({' '.join(self._args[1:])}) {problem}; its stderr:\n{self.stderr()}"
        )


def _signal_session(pid: int, signum: int) -> None:
    try:
        os.killpg(pid, signum)
    except ProcessLookupError:
        pass  # already gone: only the wait matters
