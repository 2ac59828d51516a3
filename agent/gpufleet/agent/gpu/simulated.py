"""Simulated GPUs for nodes without NVML (CI, laptops): ``--simulate-gpus 2x81559``.

A simulated card reports as used exactly what the instances placed on it declared, so the
scheduler and the agent run the same code paths as on real cards.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass

from gpufleet.agent.gpu.readings import GpuHealth, GpuProbeResult, GpuReading, ProcessReading

# Bounds that catch swapped operands ("81559x2") and typos rather than real hardware limits.
MAX_SIMULATED_GPUS = 64
MAX_SIMULATED_MEMORY_MIB = 16 * 1024 * 1024

_GROUP = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")
_EXAMPLE = "COUNTxMIB[,COUNTxMIB...], e.g. 2x81559 or 1x24576,1x81559"


def parse_simulate_gpus(text: str) -> tuple[int, ...]:
    """Memory in MiB of each simulated card, in index order, from "2x81559" or "1x24576,1x81559".

    Raises ValueError saying what is wrong with the text.
    """
    if not text.strip():
        raise ValueError(f"--simulate-gpus is empty: give {_EXAMPLE}")
    cards: list[int] = []
    for group in text.split(","):
        match = _GROUP.match(group)
        if match is None:
            raise ValueError(f"--simulate-gpus: {group.strip()!r} is not COUNTxMIB; give {_EXAMPLE}")
        count, memory_mib = int(match.group(1)), int(match.group(2))
        if count < 1:
            raise ValueError(f"--simulate-gpus: {group.strip()!r} has no cards; the count must be at least 1")
        if memory_mib < 1 or memory_mib > MAX_SIMULATED_MEMORY_MIB:
            raise ValueError(
                f"--simulate-gpus: {group.strip()!r} gives {memory_mib} MiB per card; it must be between "
                f"1 and {MAX_SIMULATED_MEMORY_MIB} MiB (COUNT comes first: 2x81559 is two 80 GB cards)"
            )
        cards.extend([memory_mib] * count)
        if len(cards) > MAX_SIMULATED_GPUS:
            raise ValueError(
                f"--simulate-gpus {text.strip()!r} asks for {len(cards)}+ cards, more than "
                f"{MAX_SIMULATED_GPUS}; COUNT comes first: 2x81559 is two 80 GB cards"
            )
    return tuple(cards)


def _card_name(memory_mib: int) -> str:
    size = f"{round(memory_mib / 1024)}GB" if memory_mib >= 1024 else f"{memory_mib}MiB"
    return f"Simulated GPU {size}"


def simulated_gpu_uuid(node_name: str, index: int) -> str:
    """Deterministic uuid of a simulated card, stable across agent restarts."""
    return f"GPU-sim-{node_name}-{index}"


@dataclass(frozen=True)
class _Declared:
    memory_mib: int
    core_percent: int
    pid: int | None


class SimulatedGpus:
    """GpuProbe over simulated cards; thread-safe."""

    def __init__(self, cards_memory_mib: tuple[int, ...], node_name: str = "local") -> None:
        """cards_memory_mib: memory of each card (parse_simulate_gpus); node_name goes into uuids."""
        self._cards = cards_memory_mib
        self._uuids = tuple(simulated_gpu_uuid(node_name, index) for index in range(len(cards_memory_mib)))
        self._lock = threading.Lock()
        self._declared: dict[str, dict[str, _Declared]] = {uuid: {} for uuid in self._uuids}

    @property
    def uuids(self) -> tuple[str, ...]:
        """Uuids of the simulated cards, in index order."""
        return self._uuids

    def set_declared_usage(
        self, gpu_uuid: str, instance_id: str, memory_mib: int, core_percent: int, pid: int | None = None
    ) -> None:
        """Record what an instance placed on a card declared; replaces its earlier declaration there.

        pid, the instance's root process, makes the instance show up as a process of the card,
        so attribute_to_instances() works on simulated cards as on real ones.
        """
        if gpu_uuid not in self._declared:
            raise ValueError(f"no simulated GPU {gpu_uuid!r}; this node has {', '.join(self._uuids) or 'none'}")
        if memory_mib < 0 or not 0 <= core_percent <= 100:
            raise ValueError(
                f"declared usage of instance {instance_id!r} must have memory_mib >= 0 and core_percent "
                f"in 0..100, got {memory_mib} MiB and {core_percent}%"
            )
        with self._lock:
            self._declared[gpu_uuid][instance_id] = _Declared(memory_mib, core_percent, pid)

    def clear(self, instance_id: str) -> None:
        """Forget an instance's declarations on every card; unknown ids are ignored."""
        with self._lock:
            for by_instance in self._declared.values():
                by_instance.pop(instance_id, None)

    def read(self) -> GpuProbeResult:
        """Every card with the sum of the declarations on it."""
        with self._lock:
            gpus = tuple(self._reading(index) for index in range(len(self._cards)))
        return GpuProbeResult(gpus=gpus, driver_version="", error=None)

    def shutdown(self) -> None:
        """Nothing to release."""

    def _reading(self, index: int) -> GpuReading:
        uuid = self._uuids[index]
        total = self._cards[index]
        declared = self._declared[uuid]
        memory = sum(usage.memory_mib for usage in declared.values())
        core = sum(usage.core_percent for usage in declared.values())
        overcommitted = []
        if memory > total:
            overcommitted.append(f"memory {memory} of {total} MiB")
        if core > 100:
            overcommitted.append(f"SM {core}%")
        message = "simulated GPU: usage is the sum of declared requests"
        if overcommitted:
            message += f"; declared usage exceeds the card ({', '.join(overcommitted)}), capped"
        by_pid: dict[int, tuple[int, int]] = {}
        for usage in declared.values():
            if usage.pid is not None:
                pid_memory, pid_core = by_pid.get(usage.pid, (0, 0))
                by_pid[usage.pid] = (pid_memory + usage.memory_mib, min(100, pid_core + usage.core_percent))
        return GpuReading(
            uuid=uuid,
            index=index,
            name=_card_name(total),
            memory_total_mib=total,
            # A real card never reports more than it has; the message keeps an overcommit visible.
            memory_used_mib=min(memory, total),
            sm_utilization_percent=min(core, 100),
            health=GpuHealth.SIMULATED,
            health_message=message,
            processes=tuple(
                ProcessReading(pid=pid, memory_used_mib=pid_memory, sm_percent=pid_core)
                for pid, (pid_memory, pid_core) in sorted(by_pid.items())
            ),
        )
