"""Attribution of GPU processes to instances by process tree."""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpufleet.agent.gpu import (
    GpuHealth,
    GpuProbeResult,
    GpuReading,
    InstanceGpuUsage,
    InstanceUsage,
    NvmlProbe,
    ProcessReading,
    attribute_to_instances,
    read_parent_pid,
)
from tests.fakes.fake_pynvml import MIB, FakeGpu, FakeProcess, FakePynvml, FakeSample


def gpu(uuid: str, index: int, *processes: ProcessReading) -> GpuReading:
    return GpuReading(
        uuid=uuid,
        index=index,
        name="NVIDIA H100 80GB HBM3",
        memory_total_mib=81559,
        memory_used_mib=sum(process.memory_used_mib for process in processes),
        sm_utilization_percent=0,
        health=GpuHealth.OK,
        health_message="",
        processes=processes,
    )


def result(*gpus: GpuReading) -> GpuProbeResult:
    return GpuProbeResult(gpus=gpus, driver_version="550.54.15", error=None)


class ScriptedParents:
    """A parent map standing in for /proc, counting lookups."""

    def __init__(self, parents: dict[int, int]) -> None:
        self.parents = parents
        self.lookups: list[int] = []

    def __call__(self, pid: int) -> int | None:
        self.lookups.append(pid)
        return self.parents.get(pid)


# 1 (init) -> 10 (agent) -> 100 (instance a root, sh) -> 101 (python) -> 102 (worker)
#                        -> 200 (instance b root)
#          -> 50 (someone else's job)
TREE = {10: 1, 100: 10, 101: 100, 102: 101, 200: 10, 50: 1}


def test_children_and_grandchildren_belong_to_their_instance() -> None:
    probe_result = result(
        gpu(
            "GPU-a",
            0,
            ProcessReading(pid=101, memory_used_mib=1000, sm_percent=20),
            ProcessReading(pid=102, memory_used_mib=500, sm_percent=5),
            ProcessReading(pid=200, memory_used_mib=300, sm_percent=7),
            ProcessReading(pid=50, memory_used_mib=9999, sm_percent=60),
        )
    )
    usage = attribute_to_instances(probe_result, {"a": 100, "b": 200}, ScriptedParents(TREE))
    assert usage == {
        "a": InstanceUsage(1500, 25, (InstanceGpuUsage("GPU-a", 1500, 25),)),
        "b": InstanceUsage(300, 7, (InstanceGpuUsage("GPU-a", 300, 7),)),
    }


def test_instance_without_gpu_processes_reads_zero() -> None:
    probe_result = result(gpu("GPU-a", 0, ProcessReading(50, 10, 1)))
    usage = attribute_to_instances(probe_result, {"idle": 100}, ScriptedParents(TREE))
    assert usage == {"idle": InstanceUsage(0, 0, ())}


def test_usage_on_several_gpus_is_summed_per_gpu_and_in_total() -> None:
    probe_result = result(
        gpu("GPU-b", 1, ProcessReading(102, 2000, 80), ProcessReading(101, 100, 40)),
        gpu("GPU-a", 0, ProcessReading(101, 1000, 90)),
    )
    usage = attribute_to_instances(probe_result, {"a": 100}, ScriptedParents(TREE))
    # Shares on one GPU never exceed that GPU; the total is in percent of one GPU.
    assert usage["a"] == InstanceUsage(
        memory_used_mib=3100,
        sm_percent=190,
        gpus=(InstanceGpuUsage("GPU-a", 1000, 90), InstanceGpuUsage("GPU-b", 2100, 100)),
    )


def test_nearest_instance_root_owns_a_nested_process() -> None:
    probe_result = result(gpu("GPU-a", 0, ProcessReading(102, 10, 0), ProcessReading(101, 20, 0)))
    usage = attribute_to_instances(probe_result, {"outer": 100, "inner": 101}, ScriptedParents(TREE))
    assert usage["inner"].memory_used_mib == 30
    assert usage["outer"].memory_used_mib == 0


def test_parent_lookups_are_shared_within_one_attribution() -> None:
    parents = ScriptedParents(TREE)
    probe_result = result(gpu("GPU-a", 0, ProcessReading(102, 1, 0)), gpu("GPU-b", 1, ProcessReading(102, 1, 0)))
    attribute_to_instances(probe_result, {"b": 200}, parents)
    assert sorted(parents.lookups) == [1, 10, 100, 101, 102]


def test_a_cycle_in_the_parent_map_ends() -> None:
    usage = attribute_to_instances(
        result(gpu("GPU-a", 0, ProcessReading(7, 10, 0))), {"a": 100}, ScriptedParents({7: 8, 8: 7})
    )
    assert usage["a"].memory_used_mib == 0


def test_same_root_twice_goes_to_the_smallest_instance_id() -> None:
    usage = attribute_to_instances(
        result(gpu("GPU-a", 0, ProcessReading(101, 10, 0))), {"z": 100, "m": 100}, ScriptedParents(TREE)
    )
    assert (usage["m"].memory_used_mib, usage["z"].memory_used_mib) == (10, 0)


def test_read_parent_pid_parses_names_with_spaces_and_parens(tmp_path: Path) -> None:
    (tmp_path / "42").mkdir()
    (tmp_path / "42" / "stat").write_text("42 (my (odd) name) S 17 42 42 0 -1 4194560 100 0 0 0\n")
    (tmp_path / "43").mkdir()
    (tmp_path / "43" / "stat").write_text("43 (kthreadd) S 0 0 0 0\n")
    assert read_parent_pid(42, tmp_path) == 17
    assert read_parent_pid(43, tmp_path) is None
    assert read_parent_pid(44, tmp_path) is None


@pytest.fixture
def instance_with_grandchild() -> Iterator[tuple[int, int]]:
    """A real root process whose child is a real sleeping grandchild: (root pid, grandchild pid)."""
    # root (python) -> sh -> sleep; sh prints the pid of sleep.
    code = "import subprocess; subprocess.run(['sh', '-c', 'sleep 60 & echo $!; wait'])"
    root = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        assert root.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(root.stdout, selectors.EVENT_READ)
            assert selector.select(timeout=30), "the test's child process did not report its own child"
        grandchild = int(root.stdout.readline())
        yield root.pid, grandchild
    finally:
        os.killpg(root.pid, signal.SIGKILL)
        root.wait(timeout=30)


def test_real_process_tree_from_proc(instance_with_grandchild: tuple[int, int]) -> None:
    root, grandchild = instance_with_grandchild
    # The probe reads the GPU processes through the fake NVML, parents come from the real /proc.
    fake = FakePynvml(
        [
            FakeGpu(
                uuid="GPU-real",
                processes=[FakeProcess(grandchild, 700 * MIB), FakeProcess(os.getpid(), 100 * MIB)],
                samples=[FakeSample(grandchild, 10, 33)],
            )
        ]
    )
    probe_result = NvmlProbe(fake).read()

    usage = attribute_to_instances(probe_result, {"inst": root})

    assert read_parent_pid(grandchild) != root  # the GPU process really is a grandchild
    assert usage == {"inst": InstanceUsage(700, 33, (InstanceGpuUsage("GPU-real", 700, 33),))}
