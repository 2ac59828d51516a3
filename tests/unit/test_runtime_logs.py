"""Log rotation by the pump's writer, tail reading across files, following across rotations."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gpufleet.agent.runtime.logpump import RotatingWriter, rotated_name
from gpufleet.agent.runtime.logs import follow_log, read_log_tail
from gpufleet.agent.runtime.paths import instance_logs_dir

INSTANCE = "echo-1"


def _writer(state_dir: Path, max_bytes: int, keep: int) -> RotatingWriter:
    directory = instance_logs_dir(state_dir, INSTANCE)
    directory.mkdir(parents=True)
    return RotatingWriter(str(directory), max_bytes, keep)


def _all_lines(state_dir: Path) -> list[str]:
    return read_log_tail(state_dir, INSTANCE, 1_000_000).splitlines()


def test_rotation_keeps_every_line_whole_and_in_order(tmp_path: Path) -> None:
    writer = _writer(tmp_path, max_bytes=200, keep=100)
    expected = [f"line {i:04d} " + "x" * (i % 13) for i in range(500)]
    payload = "".join(line + "\n" for line in expected).encode()
    # Odd chunk sizes so that chunks end in the middle of lines.
    for start in range(0, len(payload), 77):
        writer.write(payload[start : start + 77])
    writer.close()
    files = sorted(instance_logs_dir(tmp_path, INSTANCE).glob("instance.log*"))
    assert len(files) > 10
    assert all(f.stat().st_size <= 400 for f in files)
    assert _all_lines(tmp_path) == expected


def test_rotation_drops_only_files_beyond_keep(tmp_path: Path) -> None:
    writer = _writer(tmp_path, max_bytes=10, keep=2)
    for i in range(10):
        writer.write(f"{i:08d}\n".encode())  # 9 bytes: one line per file
    writer.close()
    directory = instance_logs_dir(tmp_path, INSTANCE)
    assert sorted(p.name for p in directory.iterdir()) == [
        rotated_name(0),
        rotated_name(1),
        rotated_name(2),
    ]
    assert _all_lines(tmp_path) == ["00000007", "00000008", "00000009"]


def test_line_longer_than_a_file_is_split_not_lost(tmp_path: Path) -> None:
    writer = _writer(tmp_path, max_bytes=8, keep=10)
    writer.write(b"abcdefghijklmnopqrst\nz\n")
    writer.close()
    assert "".join(_all_lines(tmp_path)) == "abcdefghijklmnopqrstz"


def test_tail_reads_back_across_rotated_files(tmp_path: Path) -> None:
    writer = _writer(tmp_path, max_bytes=100, keep=50)
    for i in range(100):
        writer.write(f"n{i}\n".encode())
    writer.close()
    assert read_log_tail(tmp_path, INSTANCE, 3) == "n97\nn98\nn99\n"
    assert read_log_tail(tmp_path, INSTANCE, 40).splitlines() == [f"n{i}" for i in range(60, 100)]
    assert read_log_tail(tmp_path, INSTANCE, 0) == ""


def test_tail_of_large_file_reads_partial_last_line(tmp_path: Path) -> None:
    writer = _writer(tmp_path, max_bytes=10_000_000, keep=1)
    writer.write(b"".join(b"%06d\n" % i for i in range(50_000)) + b"partial")
    writer.close()
    assert read_log_tail(tmp_path, INSTANCE, 2) == "049999\npartial\n"


def test_tail_of_unknown_instance_says_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no logs for instance 'nope-1'"):
        read_log_tail(tmp_path, "nope-1", 10)


async def test_follow_yields_tail_then_new_lines_across_rotations(tmp_path: Path) -> None:
    writer = _writer(tmp_path, max_bytes=64, keep=100)
    for i in range(5):
        writer.write(f"old {i}\n".encode())
    received: list[str] = []
    expected = [f"old {i}" for i in range(3, 5)] + [f"new {i:03d}" for i in range(60)]
    got_tail = asyncio.Event()
    got_all = asyncio.Event()

    async def follow() -> None:
        async for line in follow_log(tmp_path, INSTANCE, tail_lines=2, poll_interval=0.01):
            received.append(line)
            if len(received) == 2:
                got_tail.set()
            if len(received) == len(expected):
                got_all.set()
                return

    task = asyncio.create_task(follow())
    try:
        await asyncio.wait_for(got_tail.wait(), 10)
        for i in range(60):
            writer.write(f"new {i:03d}\n".encode())
            if i % 20 == 0:
                # Let the follower catch up sometimes, and fall several files behind others.
                await asyncio.sleep(0.03)
        writer.close()
        await asyncio.wait_for(got_all.wait(), 10)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert received == expected
