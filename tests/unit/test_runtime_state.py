"""State files (atomic, validated) and /proc parsing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from gpufleet.agent.runtime import procfs, statefile
from gpufleet.agent.runtime.paths import check_instance_id, state_file
from gpufleet.agent.runtime.spec import InstanceSpec, ProbeSpec, TcpAction


def _record(instance_id: str = "echo-1") -> statefile.InstanceRecord:
    spec = InstanceSpec(
        instance_id=instance_id,
        deployment="echo",
        generation=3,
        command="serve",
        readiness=ProbeSpec(action=TcpAction(port=5)),
    )
    return statefile.InstanceRecord(
        spec=spec,
        port=4000,
        pid=1234,
        start_ticks=99,
        started_at=1.5,
        restart_count=2,
        ready=True,
    )


def test_record_round_trips_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    record = _record()
    statefile.write_record(tmp_path, record)
    path = state_file(tmp_path, "echo-1")
    assert statefile.read_record(path) == record
    assert json.loads(path.read_text())["pgid"] == 1234
    assert sorted(p.name for p in path.parent.iterdir()) == ["state.json"]
    statefile.write_record(tmp_path, _record())
    statefile.remove_record(tmp_path, "echo-1")
    statefile.remove_record(tmp_path, "echo-1")
    assert not path.exists()


def test_load_records_skips_and_reports_bad_files(tmp_path: Path) -> None:
    statefile.write_record(tmp_path, _record("good-1"))
    bad = state_file(tmp_path, "bad-1")
    bad.parent.mkdir(parents=True)
    bad.write_text("{not json")
    other = state_file(tmp_path, "moved-1")
    other.parent.mkdir(parents=True)
    other.write_text(json.dumps(statefile.record_to_json(_record("elsewhere-1"))))
    future = state_file(tmp_path, "future-1")
    future.parent.mkdir(parents=True)
    future.write_text(json.dumps({"version": 99}))
    records, errors = statefile.load_records(tmp_path)
    assert [r.spec.instance_id for r in records] == ["good-1"]
    assert len(errors) == 3
    assert all("not adopted" in message for message in errors)


def test_load_records_of_empty_state_dir(tmp_path: Path) -> None:
    assert statefile.load_records(tmp_path / "missing") == ([], [])


@pytest.mark.parametrize("bad", ["", "..", ".hidden", "a/b", "x" * 254])
def test_instance_ids_that_are_not_safe_directory_names_are_rejected(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid instance id"):
        check_instance_id(bad)


def test_read_stat_of_this_process() -> None:
    stat = procfs.read_stat(os.getpid())
    assert stat is not None
    assert stat.pgid == os.getpgid(0)
    assert stat.ppid == os.getppid()
    assert procfs.is_running(os.getpid(), stat.start_ticks)
    assert not procfs.is_running(os.getpid(), stat.start_ticks + 1)


def test_read_stat_parses_names_with_spaces_and_parentheses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "42").mkdir()
    fields = ["S", "1", "42", "42"] + ["0"] * 15 + ["777"] + ["0"] * 20
    (tmp_path / "42" / "stat").write_text("42 (a ) (b) " + " ".join(fields) + "\n")
    monkeypatch.setattr(procfs, "PROC", str(tmp_path))
    assert procfs.read_stat(42) == procfs.ProcStat(state="S", ppid=1, pgid=42, start_ticks=777)
    assert procfs.read_stat(43) is None
