"""`gpufleet logs -f` as a real process: prints the tail, then lines as the log pump writes them,
across a rotation."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)

WAIT_S = 20.0


async def _line(stream: asyncio.StreamReader) -> str:
    return (await asyncio.wait_for(stream.readline(), WAIT_S)).decode()


async def test_logs_follow_prints_new_lines_across_rotation(tmp_path: Path) -> None:
    logs = tmp_path / "instances" / "echo-1" / "logs"
    logs.mkdir(parents=True)
    live = logs / "instance.log"
    live.write_text("old 1\nold 2\n")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gpufleet.client.cli", "logs", "echo-1", "-f", "--tail", "1",
        "--agent-state-dir", str(tmp_path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        assert await _line(process.stdout) == "old 2\n"
        with open(live, "a") as f:
            f.write("new 1\n")
        assert await _line(process.stdout) == "new 1\n"
        # Rotate as the pump does: the live file becomes .1, a fresh one starts.
        with open(live, "a") as f:
            f.write("last of old file\n")
        os.replace(live, logs / "instance.log.1")
        live.write_text("first of new file\n")
        assert await _line(process.stdout) == "last of old file\n"
        assert await _line(process.stdout) == "first of new file\n"
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), WAIT_S)
