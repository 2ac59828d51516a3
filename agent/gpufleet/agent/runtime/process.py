"""Starting, watching and stopping one instance process (and its log pump).

An instance runs as `/bin/sh -c <command>` in a new session, so its process group id is its
pid and a stop reaches everything it started. Its stdout and stderr go to one pipe read by
a log pump process (see logpump.py for why). The agent is the parent of processes it
started; after an agent restart the instance is adopted by pid plus start time, and its
exit is detected through a pidfd (or polling /proc) since it cannot be waited for.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from gpufleet.agent.runtime import logpump, procfs

# Seconds to wait for a process group to vanish after SIGKILL before giving up on it.
_KILL_WAIT_S = 10.0
# Seconds to wait for the log pump to drain and exit once the instance is gone.
_PUMP_WAIT_S = 5.0

# Processes this agent started and then stopped watching (Supervisor.close): kept
# referenced so they are neither reported as leaked nor reaped behind an adopter's back,
# and reaped later once they exit.
_detached: list[subprocess.Popen[bytes]] = []


def _reap_detached() -> None:
    _detached[:] = [popen for popen in _detached if popen.poll() is None]


def pick_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True)
class ExitInfo:
    """How the group leader ended."""

    returncode: int | None
    """Exit status as subprocess reports it (negative: killed by that signal); None when
    unknown because the process was adopted and so not a child of this agent."""

    def describe(self) -> str:
        """Reason text: "exit code N", "killed by signal S (SIGKILL)" or "exited (...)"."""
        code = self.returncode
        if code is None:
            return "exited (exit status unknown: adopted after an agent restart)"
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                return f"killed by signal {-code}"
            return f"killed by signal {-code} ({name})"
        return f"exit code {code}"


@dataclass(frozen=True)
class LogSettings:
    """Rotation of an instance's log files."""

    max_bytes: int = 10 * 1024 * 1024
    """Size at which the live file is rotated."""
    keep: int = 5
    """Rotated files kept besides the live one."""


class InstanceProcess:
    """A running instance: group leader pid, identity, and (if started here) the handles."""

    def __init__(
        self,
        pid: int,
        start_ticks: int,
        started_at: float,
        popen: subprocess.Popen[bytes] | None = None,
        pump: subprocess.Popen[bytes] | None = None,
    ) -> None:
        self.pid = pid
        self.start_ticks = start_ticks
        self.started_at = started_at
        self._popen = popen
        self._pump = pump

    @property
    def pgid(self) -> int:
        """Process group id: the instance runs in its own session."""
        return self.pid

    @classmethod
    def spawn(
        cls,
        command: str,
        env: dict[str, str],
        logs_dir: Path,
        log_settings: LogSettings,
        cwd: str | None = None,
    ) -> InstanceProcess:
        """Start the log pump, then the instance writing into it. Raises OSError."""
        _reap_detached()
        logs_dir.mkdir(parents=True, exist_ok=True)
        read_fd, write_fd = os.pipe()
        try:
            pump = _start_pump(read_fd, logs_dir, log_settings)
        except OSError:
            os.close(write_fd)
            raise
        finally:
            os.close(read_fd)
        try:
            popen = subprocess.Popen(
                ["/bin/sh", "-c", command],
                stdin=subprocess.DEVNULL,
                stdout=write_fd,
                stderr=write_fd,
                env=env,
                cwd=cwd,
                start_new_session=True,
                close_fds=True,
            )
        except OSError:
            os.close(write_fd)
            # The pump sees end of file now that no writer is left.
            _wait_quietly(pump, _PUMP_WAIT_S)
            raise
        os.close(write_fd)
        started_at = time.time()
        ticks = procfs.start_ticks(popen.pid)
        # Fresh child, not reaped yet: /proc has it unless it is already a zombie, in which
        # case it was not reaped either and its stat is still readable.
        return cls(popen.pid, ticks if ticks is not None else 0, started_at, popen, pump)

    @classmethod
    def adopt(cls, pid: int, start_ticks: int, started_at: float) -> InstanceProcess | None:
        """The process recorded as (pid, start_ticks), if it still runs; None otherwise."""
        if pid <= 0 or not procfs.is_running(pid, start_ticks):
            return None
        return cls(pid, start_ticks, started_at)

    @property
    def is_child(self) -> bool:
        """Started by this agent (so its exit status is known)."""
        return self._popen is not None

    def is_running(self) -> bool:
        """The group leader still runs."""
        if self._popen is not None:
            return self._popen.poll() is None
        return procfs.is_running(self.pid, self.start_ticks)

    async def wait_exit(self, poll_interval: float = 0.5) -> ExitInfo:
        """Wait until the group leader exits; reap it if it is a child of this agent."""
        await _wait_pid_exit(self.pid, self.start_ticks, self._popen, poll_interval)
        if self._popen is not None:
            return ExitInfo(self._popen.wait())
        return ExitInfo(None)

    def signal_group(self, sig: signal.Signals) -> None:
        """Send `sig` to every process in the instance's group."""
        try:
            os.killpg(self.pgid, sig)
        except ProcessLookupError:
            pass

    def _group_gone(self) -> bool:
        if self._popen is not None:
            # Reap the leader as soon as it exits, or its zombie keeps the group alive.
            self._popen.poll()
        return not procfs.group_members(self.pgid)

    async def _wait_group_gone(self, timeout: float, poll_interval: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self._group_gone():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            await asyncio.sleep(min(poll_interval, remaining))
        return True

    async def terminate(self, grace_period: float, poll_interval: float = 0.05) -> None:
        """SIGTERM the group, wait up to `grace_period` for all of it to exit, then SIGKILL.

        Waits for the whole group, not just the leader: a child that ignores SIGTERM must
        not outlive the instance.
        """
        if not self._group_gone():
            self.signal_group(signal.SIGTERM)
            if not await self._wait_group_gone(grace_period, poll_interval):
                self.signal_group(signal.SIGKILL)
                await self._wait_group_gone(_KILL_WAIT_S, poll_interval)
        if self._popen is not None and self._popen.poll() is None:
            # The group is gone, so the leader exited; collect it.
            _wait_quietly(self._popen, _KILL_WAIT_S)
        await self.wait_pump()

    async def kill_leftovers(self, poll_interval: float = 0.05) -> None:
        """After the leader exited: SIGKILL what is left of its group, then reap the pump."""
        if not self._group_gone():
            self.signal_group(signal.SIGKILL)
            await self._wait_group_gone(_KILL_WAIT_S, poll_interval)
        await self.wait_pump()

    async def wait_pump(self, timeout: float = _PUMP_WAIT_S) -> None:
        """Let the log pump drain the pipe and exit (it does once no writer is left)."""
        pump = self._pump
        if pump is None:
            return
        deadline = time.monotonic() + timeout
        while pump.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if pump.poll() is None:
            # A process outside the group still holds the pipe; keep the handle to reap it.
            _detached.append(pump)
        self._pump = None

    def detach(self) -> None:
        """Stop tracking the processes without touching them (the agent is going away)."""
        for popen in (self._popen, self._pump):
            if popen is not None and popen.poll() is None:
                _detached.append(popen)
        self._popen = None
        self._pump = None


def _start_pump(read_fd: int, logs_dir: Path, settings: LogSettings) -> subprocess.Popen[bytes]:
    with open(logs_dir / "logpump.err", "ab") as errors:
        return subprocess.Popen(
            [
                sys.executable,
                "-I",
                "-S",
                logpump.__file__,
                str(logs_dir),
                str(settings.max_bytes),
                str(settings.keep),
            ],
            stdin=read_fd,
            stdout=subprocess.DEVNULL,
            stderr=errors,
            # Its own session: signals aimed at the agent or at the instance miss it, so it
            # drains the pipe until the last writer is gone.
            start_new_session=True,
            close_fds=True,
        )


def _wait_quietly(popen: subprocess.Popen[bytes], timeout: float) -> None:
    try:
        popen.wait(timeout)
    except subprocess.TimeoutExpired:
        _detached.append(popen)


async def _wait_pid_exit(
    pid: int,
    start_ticks: int,
    popen: subprocess.Popen[bytes] | None,
    poll_interval: float,
) -> None:
    """Return once `pid` has exited, using a pidfd where the kernel has them."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    except (AttributeError, OSError):
        pidfd = -1
    if pidfd >= 0:
        try:
            # The pidfd pins the process now; check it is still ours (not a reused pid).
            if popen is None and not procfs.is_running(pid, start_ticks):
                return
            loop = asyncio.get_running_loop()
            exited: asyncio.Future[None] = loop.create_future()

            def on_readable() -> None:
                if not exited.done():
                    exited.set_result(None)

            loop.add_reader(pidfd, on_readable)
            try:
                await exited
            finally:
                loop.remove_reader(pidfd)
        finally:
            os.close(pidfd)
        return
    while True:
        if popen is not None:
            if popen.poll() is not None:
                return
        elif not procfs.is_running(pid, start_ticks):
            return
        await asyncio.sleep(poll_interval)
