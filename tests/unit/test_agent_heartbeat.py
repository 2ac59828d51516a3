"""Pure parts of the agent: heartbeat contents, simulated usage, overrun restarts, backoff."""

from __future__ import annotations

import dataclasses

import pytest

from gpufleet.agent.gpu.attribution import InstanceGpuUsage, InstanceUsage
from gpufleet.agent.gpu.readings import GpuHealth, GpuProbeResult, GpuReading
from gpufleet.agent.heartbeat import (
    DeclaredUsage,
    HostCapacity,
    build_heartbeat,
    declared_usage,
    overrun_restarts,
    parse_meminfo_total_mib,
    with_gpu_usage,
)
from gpufleet.agent.reconnect import ReconnectBackoff
from gpufleet.agent.runtime.spec import InstanceSpec
from gpufleet.agent.runtime.status import InstanceStatusSnapshot
from gpufleet.v1 import instance_pb2, node_pb2

READY = instance_pb2.INSTANCE_STATE_READY
STOPPED = instance_pb2.INSTANCE_STATE_STOPPED
CARDS = {"GPU-0": 81559, "GPU-1": 40960}


def spec(instance_id: str = "i-1", **fields: object) -> InstanceSpec:
    return dataclasses.replace(InstanceSpec(instance_id, "echo", 1, "true"), **fields)  # type: ignore[arg-type]


def status(instance_id: str = "i-1", state: int = READY, pid: int = 100, **fields: object) -> InstanceStatusSnapshot:
    base = InstanceStatusSnapshot(instance_id, "echo", 1, state, "ready", pid, 8000, 0, False)  # type: ignore[arg-type]
    return dataclasses.replace(base, **fields)  # type: ignore[arg-type]


def usage(memory: int, sm: int) -> InstanceUsage:
    return InstanceUsage(memory, sm, (InstanceGpuUsage("GPU-0", memory, sm),))


def test_declared_usage_of_a_share() -> None:
    share = spec(gpu_uuids=("GPU-0",), mps_core_percent=25, mps_memory_limit_mib=2048, gpu_memory_mib=2048)
    assert declared_usage(share, CARDS) == [DeclaredUsage("GPU-0", 2048, 25)]
    # Without an explicit request the MPS limit is the declaration; no SM limit declares 0.
    assert declared_usage(spec(gpu_uuids=("GPU-1",), mps_memory_limit_mib=512), CARDS) == [
        DeclaredUsage("GPU-1", 512, 0)
    ]


def test_declared_usage_of_whole_cards_and_unknown_gpus() -> None:
    whole = spec(gpu_uuids=("GPU-0", "GPU-1", "GPU-other-node"))
    assert declared_usage(whole, CARDS) == [DeclaredUsage("GPU-0", 81559, 100), DeclaredUsage("GPU-1", 40960, 100)]
    assert declared_usage(spec(), CARDS) == []


def test_with_gpu_usage_fills_measurements_and_flags_overruns() -> None:
    statuses = [status("a"), status("b"), status("c"), status("d")]
    specs = {"a": spec("a", gpu_memory_mib=2048), "b": spec("b", gpu_memory_mib=1024), "c": spec("c")}
    measured = {"a": usage(2000, 30), "b": usage(1025, 5), "c": usage(9999, 90)}
    a, b, c, d = with_gpu_usage(statuses, measured, specs)
    assert (a.gpu_memory_used_mib, a.sm_utilization_percent, a.gpu_memory_overrun) == (2000, 30, False)
    assert (b.gpu_memory_used_mib, b.gpu_memory_overrun) == (1025, True)
    # No request means no limit to overrun; no measurement leaves the status as it was.
    assert (c.gpu_memory_used_mib, c.gpu_memory_overrun) == (9999, False)
    assert d == statuses[3]


def test_overrun_restarts_once_per_process_and_only_when_asked() -> None:
    specs = {
        "a": spec("a", gpu_memory_mib=1024, restart_on_gpu_memory_overrun=True),
        "b": spec("b", gpu_memory_mib=1024),
        "c": spec("c", gpu_memory_mib=1024, restart_on_gpu_memory_overrun=True),
    }
    statuses = [
        status("a", gpu_memory_overrun=True, gpu_memory_used_mib=1500),
        status("b", gpu_memory_overrun=True),
        status("c", state=STOPPED, pid=0, gpu_memory_overrun=True),
    ]
    [(instance_id, reason)] = overrun_restarts(statuses, specs, {})
    assert instance_id == "a"
    assert reason == "GPU memory overrun: uses 1500 MiB, requested 1024 MiB"
    assert overrun_restarts(statuses, specs, {"a": 100}) == []
    assert [i for i, _ in overrun_restarts(statuses, specs, {"a": 99})] == ["a"]


def test_build_heartbeat() -> None:
    reading = GpuReading("GPU-0", 0, "Simulated GPU 80GB", 81559, 4096, 50, GpuHealth.SIMULATED, "sim", ())
    heartbeat = build_heartbeat(
        GpuProbeResult((reading,), "", None),
        [status("b", gpu_memory_used_mib=7), status("a")],
        HostCapacity(cpu_millis=4000, memory_mib=16000),
        "0.1.0",
        "10.0.0.5",
    )
    assert [i.instance_id for i in heartbeat.instances] == ["a", "b"]
    assert heartbeat.instances[1].gpu_memory_used_mib == 7
    assert heartbeat.instances[0].pid == 100 and heartbeat.instances[0].state == READY
    [gpu] = heartbeat.gpus
    assert (gpu.uuid, gpu.memory_total_mib, gpu.memory_used_mib, gpu.health) == (
        "GPU-0", 81559, 4096, node_pb2.GPU_HEALTH_SIMULATED
    )
    assert (heartbeat.cpu_millis, heartbeat.memory_mib) == (4000, 16000)
    assert (heartbeat.agent_version, heartbeat.advertise_host) == ("0.1.0", "10.0.0.5")


def test_parse_meminfo() -> None:
    assert parse_meminfo_total_mib("MemFree: 10 kB\nMemTotal:       16384000 kB\n") == 16000
    assert parse_meminfo_total_mib("MemFree: 10 kB\n") == 0
    assert parse_meminfo_total_mib("MemTotal: lots\n") == 0


def test_backoff_grows_to_the_cap_with_jitter_and_resets() -> None:
    draws: list[tuple[float, float]] = []

    def uniform(low: float, high: float) -> float:
        draws.append((low, high))
        return high

    backoff = ReconnectBackoff(base=0.5, cap=5.0, uniform=uniform)
    delays = [backoff.next_delay() for _ in range(6)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]
    assert draws[0] == (0.25, 0.5) and draws[-1] == (2.5, 5.0)
    assert backoff.attempt == 6
    backoff.reset()
    assert backoff.next_delay() == 0.5
    for _ in range(200):
        backoff.next_delay()
    assert backoff.next_delay() == 5.0


def test_backoff_default_jitter_stays_in_range() -> None:
    backoff = ReconnectBackoff(base=0.2, cap=5.0)
    for attempt in range(50):
        ceiling = min(5.0, 0.2 * 2**attempt)
        assert ceiling / 2 <= backoff.next_delay() <= ceiling


def test_backoff_rejects_bad_bounds() -> None:
    with pytest.raises(ValueError, match="0 < base <= cap"):
        ReconnectBackoff(base=0, cap=1)
    with pytest.raises(ValueError, match="0 < base <= cap"):
        ReconnectBackoff(base=2, cap=1)
