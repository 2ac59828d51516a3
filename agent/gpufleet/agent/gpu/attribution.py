"""Which instance uses how much of which GPU, by process tree.

An instance is started as one root process (the shell running its start command); the
processes that actually touch the GPU are usually its children or grandchildren (a Python
server, its workers). A GPU process belongs to the instance whose root pid is the process
itself or its nearest ancestor.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from gpufleet.agent.gpu.readings import GpuProbeResult

# Far deeper than any real process tree; stops the walk if a parent map ever has a cycle.
_MAX_TREE_DEPTH = 512

ParentOf = Callable[[int], "int | None"]
"""Parent pid of a pid, or None when the process is gone or has no parent."""


@dataclass(frozen=True)
class InstanceGpuUsage:
    """What one instance's processes use of one GPU."""

    gpu_uuid: str
    """The GPU."""
    memory_used_mib: int
    """GPU memory held by the instance's processes on this GPU, MiB."""
    sm_percent: int
    """Share of this GPU's SMs the instance's processes used, 0-100."""


@dataclass(frozen=True)
class InstanceUsage:
    """What one instance's processes use of the node's GPUs."""

    memory_used_mib: int
    """GPU memory over all GPUs, MiB."""
    sm_percent: int
    """SM share summed over GPUs, in percent of one GPU (two busy GPUs read 200)."""
    gpus: tuple[InstanceGpuUsage, ...]
    """Per GPU the instance has processes on, ordered by GPU index."""


def read_parent_pid(pid: int, proc_root: Path = Path("/proc")) -> int | None:
    """Parent pid from /proc/<pid>/stat; None when the process is gone or unreadable."""
    try:
        stat = (proc_root / str(pid) / "stat").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may itself contain spaces and ')';
    # the fields after the last ')' are: state, ppid, ...
    fields = stat[stat.rfind(")") + 1 :].split()
    if len(fields) < 2:
        return None
    try:
        parent = int(fields[1])
    except ValueError:
        return None
    return parent if parent > 0 else None


def _owner_instance(
    pid: int, instance_by_root: Mapping[int, str], parent_of: ParentOf, cache: dict[int, str | None]
) -> str | None:
    """The instance whose root is pid or its nearest ancestor; None if no instance owns it."""
    walked: list[int] = []
    current: int | None = pid
    owner: str | None = None
    while current is not None and len(walked) < _MAX_TREE_DEPTH:
        if current in cache:
            owner = cache[current]
            break
        walked.append(current)
        if current in instance_by_root:
            owner = instance_by_root[current]
            break
        current = parent_of(current)
    for seen in walked:
        cache[seen] = owner
    return owner


def attribute_to_instances(
    result: GpuProbeResult,
    instance_pids: Mapping[str, int],
    parent_of: ParentOf = read_parent_pid,
) -> dict[str, InstanceUsage]:
    """GPU usage per instance id; every instance in instance_pids gets an entry.

    instance_pids maps instance id -> the pid of the instance's root process. Processes no
    instance owns (other users, the MPS daemon) are left out: they still count in each GPU's
    memory_used_mib, which is what placement uses.
    """
    # Two instances cannot share a live root pid; should a stale map say so anyway, the
    # smallest instance id wins so that the answer does not depend on dict order.
    instance_by_root: dict[int, str] = {}
    for instance_id in sorted(instance_pids, reverse=True):
        instance_by_root[instance_pids[instance_id]] = instance_id
    cache: dict[int, str | None] = {}
    per_gpu: dict[str, dict[str, tuple[int, int]]] = {instance_id: {} for instance_id in instance_pids}
    for gpu in sorted(result.gpus, key=lambda reading: reading.index):
        for process in gpu.processes:
            owner = _owner_instance(process.pid, instance_by_root, parent_of, cache)
            if owner is None:
                continue
            memory, sm = per_gpu[owner].get(gpu.uuid, (0, 0))
            per_gpu[owner][gpu.uuid] = (memory + process.memory_used_mib, min(100, sm + process.sm_percent))
    usage: dict[str, InstanceUsage] = {}
    for instance_id, by_gpu in per_gpu.items():
        gpus = tuple(
            InstanceGpuUsage(gpu_uuid=uuid, memory_used_mib=memory, sm_percent=sm)
            for uuid, (memory, sm) in by_gpu.items()
        )
        usage[instance_id] = InstanceUsage(
            memory_used_mib=sum(gpu.memory_used_mib for gpu in gpus),
            sm_percent=sum(gpu.sm_percent for gpu in gpus),
            gpus=gpus,
        )
    return usage
