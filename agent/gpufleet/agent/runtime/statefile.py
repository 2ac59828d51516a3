"""Per-instance state files: what a restarted agent needs to adopt a running instance."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpufleet.agent.runtime.paths import STATE_FILE_NAME, instances_dir, state_file
from gpufleet.agent.runtime.spec import InstanceSpec, spec_from_json, spec_to_json

FORMAT_VERSION = 1


@dataclass(frozen=True)
class InstanceRecord:
    """The persisted facts about one instance."""

    spec: InstanceSpec
    """The spec it runs."""
    port: int
    """The port it was given (the picked one when the spec said 0)."""
    pid: int
    """Pid of the process group leader (the shell); 0 when not running."""
    start_ticks: int
    """Start time of `pid` from /proc/<pid>/stat, to tell it from a later process that
    reuses the pid."""
    started_at: float
    """Wall-clock time (time.time()) the process started."""
    restart_count: int
    """Restarts since the instance was placed."""
    ready: bool
    """Readiness had passed: an adopting agent keeps reporting it READY while probes agree."""

    @property
    def pgid(self) -> int:
        """The instance runs in its own session, so its process group id is its pid."""
        return self.pid


def record_to_json(record: InstanceRecord) -> dict[str, Any]:
    """JSON form of a record, with the format version."""
    return {
        "version": FORMAT_VERSION,
        "pid": record.pid,
        "pgid": record.pgid,
        "start_ticks": record.start_ticks,
        "started_at": record.started_at,
        "port": record.port,
        "restart_count": record.restart_count,
        "ready": record.ready,
        "spec": spec_to_json(record.spec),
    }


def record_from_json(data: dict[str, Any]) -> InstanceRecord:
    """Inverse of `record_to_json`; raises ValueError for unknown versions or bad data."""
    version = data.get("version")
    if version != FORMAT_VERSION:
        raise ValueError(f"state file version {version!r} is not {FORMAT_VERSION}")
    try:
        return InstanceRecord(
            spec=spec_from_json(data["spec"]),
            port=int(data["port"]),
            pid=int(data["pid"]),
            start_ticks=int(data["start_ticks"]),
            started_at=float(data["started_at"]),
            restart_count=int(data["restart_count"]),
            ready=bool(data["ready"]),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"malformed state file: {err!r}") from err


def write_record(state_dir: str | os.PathLike[str], record: InstanceRecord) -> None:
    """Write the record atomically: a crash leaves either the old or the new file whole."""
    path = state_file(state_dir, record.spec.instance_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{STATE_FILE_NAME}.tmp")
    payload = json.dumps(record_to_json(record), indent=1, sort_keys=True).encode("utf-8")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, payload)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    # The rename is durable only once the directory entry is on disk.
    fd = os.open(directory, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_record(path: Path) -> InstanceRecord:
    """Read one state file; raises OSError or ValueError."""
    with open(path, "rb") as f:
        data = json.loads(f.read())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a JSON object")
    return record_from_json(data)


def remove_record(state_dir: str | os.PathLike[str], instance_id: str) -> None:
    """Forget an instance: a later agent will not adopt it. Its logs stay."""
    try:
        state_file(state_dir, instance_id).unlink()
    except FileNotFoundError:
        pass


def load_records(
    state_dir: str | os.PathLike[str],
) -> tuple[list[InstanceRecord], list[str]]:
    """Every readable state file, plus one message per unreadable one."""
    records: list[InstanceRecord] = []
    errors: list[str] = []
    root = instances_dir(state_dir)
    if not root.is_dir():
        return records, errors
    for entry in sorted(root.iterdir()):
        path = entry / STATE_FILE_NAME
        if not path.is_file():
            continue
        try:
            record = read_record(path)
        except (OSError, ValueError) as err:
            errors.append(f"{path}: {err}; the instance is not adopted")
            continue
        if record.spec.instance_id != entry.name:
            errors.append(
                f"{path}: names instance {record.spec.instance_id!r}, not {entry.name!r}; "
                "the instance is not adopted"
            )
            continue
        records.append(record)
    return records, errors
