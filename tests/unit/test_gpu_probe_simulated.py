"""Simulated GPUs: --simulate-gpus parsing and usage as the sum of declared requests."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpufleet.agent.gpu import (
    GpuHealth,
    ProcessReading,
    SimulatedGpus,
    attribute_to_instances,
    parse_simulate_gpus,
)
from gpufleet.agent.gpu.simulated import MAX_SIMULATED_GPUS


def test_parse_uniform_and_mixed_cards() -> None:
    assert parse_simulate_gpus("2x81559") == (81559, 81559)
    assert parse_simulate_gpus("1x24576,1x81559") == (24576, 81559)
    assert parse_simulate_gpus(" 1 X 24576 , 2x1024 ") == (24576, 1024, 1024)


@pytest.mark.parametrize(
    ("text", "hint"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("2x", "is not COUNTxMIB"),
        ("81559", "is not COUNTxMIB"),
        ("2x81559,", "is not COUNTxMIB"),
        ("twoxbig", "is not COUNTxMIB"),
        ("-1x100", "is not COUNTxMIB"),
        ("0x81559", "count must be at least 1"),
        ("2x0", "between 1 and"),
        ("81559x2", "COUNT comes first"),
        ("1x99999999999", "COUNT comes first"),
    ],
)
def test_parse_rejects_bad_text_with_a_reason(text: str, hint: str) -> None:
    with pytest.raises(ValueError, match="--simulate-gpus") as info:
        parse_simulate_gpus(text)
    assert hint in str(info.value)


@given(st.lists(st.tuples(st.integers(1, 8), st.integers(1, 200_000)), min_size=1, max_size=8))
def test_parse_round_trips_any_valid_spec(groups: list[tuple[int, int]]) -> None:
    text = ",".join(f"{count}x{memory}" for count, memory in groups)
    expected = tuple(memory for count, memory in groups for _ in range(count))
    assert parse_simulate_gpus(text) == expected
    assert len(expected) <= MAX_SIMULATED_GPUS


def test_cards_are_deterministic_and_idle_at_start() -> None:
    result = SimulatedGpus(parse_simulate_gpus("1x24576,1x81559"), "node-a").read()
    assert result.error is None
    assert [(gpu.uuid, gpu.index, gpu.name, gpu.memory_total_mib) for gpu in result.gpus] == [
        ("GPU-sim-node-a-0", 0, "Simulated GPU 24GB", 24576),
        ("GPU-sim-node-a-1", 1, "Simulated GPU 80GB", 81559),
    ]
    for gpu in result.gpus:
        assert (gpu.memory_used_mib, gpu.sm_utilization_percent, gpu.processes) == (0, 0, ())
        assert gpu.health is GpuHealth.SIMULATED
    assert SimulatedGpus((81559,), "node-a").uuids == ("GPU-sim-node-a-0",)
    assert SimulatedGpus((512,)).read().gpus[0].name == "Simulated GPU 512MiB"


def test_usage_is_the_sum_of_declared_requests() -> None:
    gpus = SimulatedGpus((81559, 81559), "n")
    first, second = gpus.uuids
    gpus.set_declared_usage(first, "i-1", memory_mib=20000, core_percent=25)
    gpus.set_declared_usage(first, "i-2", memory_mib=10000, core_percent=50)
    gpus.set_declared_usage(second, "i-3", memory_mib=5000, core_percent=10)
    gpus.set_declared_usage(first, "i-1", memory_mib=21000, core_percent=30)  # replaces

    a, b = gpus.read().gpus
    assert (a.memory_used_mib, a.sm_utilization_percent) == (31000, 80)
    assert (b.memory_used_mib, b.sm_utilization_percent) == (5000, 10)

    gpus.clear("i-1")
    gpus.clear("never-placed")
    a, b = gpus.read().gpus
    assert (a.memory_used_mib, a.sm_utilization_percent) == (10000, 50)
    assert b.memory_used_mib == 5000


def test_overcommit_is_capped_and_named() -> None:
    gpus = SimulatedGpus((1000,), "n")
    (uuid,) = gpus.uuids
    gpus.set_declared_usage(uuid, "i-1", 800, 70)
    gpus.set_declared_usage(uuid, "i-2", 800, 70)
    reading = gpus.read().gpus[0]
    assert (reading.memory_used_mib, reading.sm_utilization_percent) == (1000, 100)
    assert "memory 1600 of 1000 MiB" in reading.health_message and "SM 140%" in reading.health_message


def test_declared_pid_makes_attribution_work_like_on_real_cards() -> None:
    gpus = SimulatedGpus((81559, 81559), "n")
    gpus.set_declared_usage(gpus.uuids[0], "i-1", 20000, 25, pid=4242)
    gpus.set_declared_usage(gpus.uuids[1], "i-2", 1000, 5)
    result = gpus.read()
    assert result.gpus[0].processes == (ProcessReading(4242, 20000, 25),)
    assert result.gpus[1].processes == ()
    usage = attribute_to_instances(result, {"i-1": 4242}, lambda pid: None)
    assert (usage["i-1"].memory_used_mib, usage["i-1"].sm_percent) == (20000, 25)


def test_bad_declarations_are_refused() -> None:
    gpus = SimulatedGpus((81559,), "n")
    with pytest.raises(ValueError, match="no simulated GPU 'GPU-nope'; this node has GPU-sim-n-0"):
        gpus.set_declared_usage("GPU-nope", "i-1", 1, 1)
    with pytest.raises(ValueError, match="core_percent"):
        gpus.set_declared_usage(gpus.uuids[0], "i-1", 1, 101)
    with pytest.raises(ValueError, match="memory_mib"):
        gpus.set_declared_usage(gpus.uuids[0], "i-1", -1, 1)
    assert gpus.read().gpus[0].memory_used_mib == 0
