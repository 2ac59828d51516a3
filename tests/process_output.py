"""Reading a child process's stdout without blocking past a deadline (tests start real
servers that announce their port on their first stdout line)."""

from __future__ import annotations

import os
import selectors
import subprocess
import time


def read_stdout_line(process: subprocess.Popen[bytes], timeout: float) -> str:
    """The first stdout line of `process`, waiting at most `timeout` seconds for it."""
    if process.stdout is None:
        raise ValueError("the process was started without stdout=PIPE")
    deadline = time.monotonic() + timeout
    received = b""
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while b"\n" not in received:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not selector.select(remaining):
                raise TimeoutError(f"no stdout line within {timeout} s (got {received!r})")
            chunk = os.read(process.stdout.fileno(), 4096)
            if not chunk:
                raise EOFError(f"stdout closed before a full line (got {received!r})")
            received += chunk
    return received.split(b"\n", 1)[0].decode()
