"""The real control plane in a child process, driven over a pipe by a benchmark.

The control plane runs in a process of its own, as `gpufleet server` does, so that the
benchmark's gRPC clients do not share its event loop or its GIL. The pipe carries a few
commands: the server's CPU time so far, turning cProfile on and off around a measured
phase, dumping the profile, and stopping.
"""

from __future__ import annotations

import asyncio
import contextlib
import cProfile
import io
import multiprocessing
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from gpufleet.server.app import start_control_plane
from gpufleet.server.config import ServerConfig

START_TIMEOUT_SECONDS = 60.0
COMMAND_TIMEOUT_SECONDS = 30.0

CPU = "cpu"
PROFILE_ON = "profile-on"
PROFILE_OFF = "profile-off"
DUMP_PROFILE = "dump-profile"
STOP = "stop"


@dataclass(frozen=True)
class Endpoint:
    address: str
    """HOST:PORT the control plane listens on."""
    admin_token: str


class ControlPlaneProcess:
    """Start with start(), query with cpu_seconds()/profile*(), end with stop()."""

    def __init__(self, state_dir: Path) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._child_end = child
        self._process = context.Process(
            target=serve_in_child, args=(str(state_dir), child), name="gpufleet-control-plane"
        )

    def start(self) -> Endpoint:
        """Start the process; returns once the control plane is serving."""
        self._process.start()
        self._child_end.close()
        reply = self._receive(START_TIMEOUT_SECONDS, "start")
        if not (isinstance(reply, tuple) and len(reply) == 2):
            raise RuntimeError(f"control plane process sent {reply!r} instead of its address")
        return Endpoint(address=str(reply[0]), admin_token=str(reply[1]))

    def cpu_seconds(self) -> float:
        """CPU time (user + system, all threads) the server process has used so far."""
        return float(self._command(CPU))

    def profile(self, on: bool) -> None:
        """cProfile the server's event-loop thread from now on (on) or stop (off)."""
        self._command(PROFILE_ON if on else PROFILE_OFF)

    def dump_profile(self, path: Path) -> None:
        """Write what cProfile collected to `path` (pstats format)."""
        self._command((DUMP_PROFILE, str(path)))

    def stop(self) -> None:
        """Stop the control plane gracefully; kill the process if it does not exit."""
        try:
            if self._process.is_alive():
                self._command(STOP)
        except (RuntimeError, OSError, EOFError):
            pass  # already gone: only the join below matters
        finally:
            self._process.join(COMMAND_TIMEOUT_SECONDS)
            if self._process.is_alive():
                self._process.kill()
                self._process.join(COMMAND_TIMEOUT_SECONDS)
            self._conn.close()

    def _command(self, command: object) -> Any:
        self._conn.send(command)
        return self._receive(COMMAND_TIMEOUT_SECONDS, repr(command))

    def _receive(self, timeout: float, what: str) -> Any:
        if not self._conn.poll(timeout):
            raise RuntimeError(f"control plane process did not answer {what} in {timeout:.0f} s")
        try:
            return self._conn.recv()
        except EOFError:
            self._process.join(COMMAND_TIMEOUT_SECONDS)
            raise RuntimeError(
                f"control plane process exited (code {self._process.exitcode}) during {what}; "
                "its traceback is above"
            ) from None


def serve_in_child(state_dir: str, conn: Connection) -> None:
    """Process entry point: serve until told to stop or the parent goes away."""
    asyncio.run(_serve(Path(state_dir), conn))


async def _serve(state_dir: Path, conn: Connection) -> None:
    # The first start prints the new admin token; it would only clutter the report.
    with contextlib.redirect_stdout(io.StringIO()):
        # No reconciler: it writes statuses to new deployments, which would make the
        # benchmark's Update revisions stale; this measures the API's write path alone.
        config = ServerConfig(state_dir=state_dir, listen="127.0.0.1:0", reconcile=False)
        plane = await start_control_plane(config)
    profiler = cProfile.Profile()
    done = asyncio.Event()

    def on_command() -> None:
        try:
            command = conn.recv()
        except (EOFError, OSError):
            done.set()
            return
        if command == CPU:
            conn.send(time.process_time())
        elif command == PROFILE_ON:
            profiler.enable()
            conn.send("ok")
        elif command == PROFILE_OFF:
            profiler.disable()
            conn.send("ok")
        elif isinstance(command, tuple) and command[0] == DUMP_PROFILE:
            profiler.dump_stats(command[1])
            conn.send("ok")
        elif command == STOP:
            done.set()
        else:
            conn.send(f"unknown command {command!r}")

    loop = asyncio.get_running_loop()
    loop.add_reader(conn.fileno(), on_command)
    try:
        conn.send((plane.address, plane.admin_token))
        await done.wait()
    finally:
        loop.remove_reader(conn.fileno())
        await plane.stop(grace=1.0)
    with contextlib.suppress(OSError):
        conn.send("stopped")
