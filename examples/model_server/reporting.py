"""What the server tells the outside world about itself: its port and its start-up time."""

from __future__ import annotations

import json
import os
import sys
import time

# Fallback start time: the moment this module was first imported, which misses only the
# interpreter's own start-up.
_IMPORTED_AT = time.monotonic()

# An interpreter takes well under this to reach our first import; a larger /proc reading
# means the clock bases disagree (e.g. a container with a virtualised /proc/uptime).
_MAX_INTERPRETER_START_SECONDS = 60.0


def process_started_at() -> float:
    """The process start as a time.monotonic() value (Linux /proc, else first import)."""
    now = time.monotonic()
    since_import = now - _IMPORTED_AT
    try:
        with open("/proc/self/stat", encoding="ascii") as stat_file:
            # Field 22 (starttime, in clock ticks after boot) counted after the ")" that ends
            # the command name, which may itself contain spaces.
            fields = stat_file.read().rpartition(")")[2].split()
        with open("/proc/uptime", encoding="ascii") as uptime_file:
            uptime = float(uptime_file.read().split()[0])
        elapsed = uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return _IMPORTED_AT
    # /proc/uptime has 10 ms resolution, so allow that much below the import-based bound.
    if not since_import - 0.02 <= elapsed <= since_import + _MAX_INTERPRETER_START_SECONDS:
        return _IMPORTED_AT
    return now - max(elapsed, since_import)


def write_atomically(path: str, text: str) -> None:
    """Writes `text` to `path` so that a reader sees either nothing or all of it."""
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(temporary, path)


def report_listening(host: str, port: int, port_file: str | None) -> None:
    """Announces the bound port on stdout (one line) and in `port_file` when given."""
    print(f"model server listening on {host}:{port}", flush=True)
    if port_file:
        write_atomically(port_file, f"{port}\n")


def report_ready(ready_seconds: float, ready_file: str | None) -> None:
    """Announces the start-to-ready time on stderr (one line) and in `ready_file` as JSON."""
    if ready_file:
        write_atomically(ready_file, json.dumps({"ready_seconds": round(ready_seconds, 3)}) + "\n")
    print(f"model server ready after {ready_seconds:.3f} s", file=sys.stderr, flush=True)
