"""Log pump: copies an instance's output from a pipe into size-rotated files.

Run as a script (`python -I -S logpump.py DIR MAX_BYTES KEEP`) with the pipe as stdin. It
uses only the standard library so it starts fast and needs no site-packages.

Why a separate process and not the agent, and not the instance writing to a file itself:

* The agent cannot pump the pipe: instances must survive an agent restart, and the moment
  the agent died the instance's next write would hit a pipe without a reader (SIGPIPE).
  The pump runs in its own session, is not the agent, and is untouched by agent restarts.
* Letting the instance write to the file directly (O_APPEND) and rotating by copy-truncate
  loses every line written between the copy and the truncate; renaming does not help either
  because the instance keeps writing to the renamed file through its open descriptor.
  With a pipe, only the pump holds the file open, so it can rename and reopen between two
  writes and rotation loses nothing.
The pump exits at end of file, which comes when every process of the instance has exited
(the agent kills the whole process group on stop), so it leaves nothing behind either.
"""

from __future__ import annotations

import os
import signal
import sys

LOG_FILE_NAME = "instance.log"
"""The file being written; rotated files are LOG_FILE_NAME.1 (newest) .. .KEEP (oldest)."""
_READ_SIZE = 65536


def rotated_name(index: int) -> str:
    """File name of the index-th rotated file; 0 is the live file."""
    return LOG_FILE_NAME if index == 0 else f"{LOG_FILE_NAME}.{index}"


class RotatingWriter:
    """Appends bytes to DIR/instance.log, rotating it near max_bytes, keeping `keep` old files.

    Rotation happens at line ends, so no line is split across two files: a line that has
    begun when the size limit is reached is finished first, letting a file grow to at most
    twice max_bytes. Only a line longer than that is split.
    """

    def __init__(self, directory: str, max_bytes: int, keep: int) -> None:
        self._directory = directory
        self._max_bytes = max(1, max_bytes)
        self._keep = max(1, keep)
        self._fd = self._open()
        self._size = os.fstat(self._fd).st_size
        self._mid_line = self._size > 0 and os.pread(self._fd, 1, self._size - 1) != b"\n"

    def _path(self, index: int) -> str:
        return os.path.join(self._directory, rotated_name(index))

    def _open(self) -> int:
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        return os.open(self._path(0), flags, 0o644)

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        if data:
            self._size += len(data)
            self._mid_line = not data.endswith(b"\n")

    def _rotate(self) -> None:
        os.close(self._fd)
        for index in range(self._keep - 1, -1, -1):
            source = self._path(index)
            if os.path.exists(source):
                os.replace(source, self._path(index + 1))
        self._fd = self._open()
        self._size = 0
        self._mid_line = False

    def write(self, data: bytes) -> None:
        """Append `data`, rotating at line ends."""
        while data:
            room = self._max_bytes - self._size
            if len(data) <= room:
                self._write_all(data)
                return
            # The whole lines that still fit go here, the rest to the next file.
            cut = data.rfind(b"\n", 0, max(room, 0)) + 1
            if cut == 0 and self._mid_line:
                # Finish the line begun in this file, within the allowance, before rotating.
                newline = data.find(b"\n")
                end = len(data) if newline < 0 else newline + 1
                allowed = max(0, 2 * self._max_bytes - self._size)
                if end <= allowed:
                    self._write_all(data[:end])
                    data = data[end:]
                    if newline < 0:
                        return
                else:
                    self._write_all(data[:allowed])
                    data = data[allowed:]
                self._rotate()
                continue
            if cut == 0 and self._size == 0:
                # One line longer than a whole file: it has to be split.
                cut = room
            self._write_all(data[:cut])
            data = data[cut:]
            self._rotate()

    def close(self) -> None:
        os.close(self._fd)


def pump(source_fd: int, writer: RotatingWriter) -> None:
    """Copy `source_fd` into `writer` until end of file."""
    while True:
        try:
            data = os.read(source_fd, _READ_SIZE)
        except InterruptedError:
            continue
        if not data:
            return
        writer.write(data)


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        sys.stderr.write("usage: logpump.py DIR MAX_BYTES KEEP (reads the log from stdin)\n")
        return 2
    directory, max_bytes, keep = argv[1], int(argv[2]), int(argv[3])
    # No controlling terminal to lose, but be explicit: only end of file ends the pump.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.makedirs(directory, exist_ok=True)
    writer = RotatingWriter(directory, max_bytes, keep)
    try:
        pump(0, writer)
    finally:
        writer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
