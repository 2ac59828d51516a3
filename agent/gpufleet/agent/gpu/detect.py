"""Choose the node's GPU probe: simulated cards when asked, else NVML, else no GPUs."""

from __future__ import annotations

import logging
from typing import Any

from gpufleet.agent.gpu.nvml import NvmlProbe
from gpufleet.agent.gpu.readings import GpuProbe
from gpufleet.agent.gpu.simulated import SimulatedGpus, parse_simulate_gpus

_log = logging.getLogger(__name__)


def detect_probe(
    simulate: str | None,
    node_name: str = "local",
    fallback_simulate: str | None = None,
    nvml: Any = None,
) -> GpuProbe:
    """The probe the agent reads its GPUs with.

    - simulate ("2x81559", from --simulate-gpus): simulated cards, NVML is not touched.
      Raises ValueError for malformed text, so a typo stops the agent at start.
    - else NVML, when it initialises and finds at least one GPU.
    - else fallback_simulate when given (``gpufleet up`` passes one so that a laptop gets
      cards to place on), and otherwise a probe with zero GPUs: a node without a driver
      still runs CPU-only deployments, and it never advertises cards it does not have, so
      GPU deployments are not placed there only to fail. One warning line says why.

    node_name goes into simulated uuids; nvml replaces the pynvml module (tests).
    """
    if simulate is not None:
        cards = parse_simulate_gpus(simulate)
        _log.info("using %d simulated GPU(s) from --simulate-gpus %s", len(cards), simulate)
        return SimulatedGpus(cards, node_name)
    fallback = parse_simulate_gpus(fallback_simulate) if fallback_simulate is not None else ()
    probe = NvmlProbe(nvml)
    error = probe.init()
    if error is None:
        result = probe.read()
        if result.gpus:
            _log.info("NVML: %d GPU(s), driver %s", len(result.gpus), result.driver_version or "unknown")
            return probe
        probe.shutdown()
        error = result.error or "NVML works but finds no GPU on this node"
    if fallback:
        _log.warning("no GPU through NVML (%s); simulating %d GPU(s) (%s)", error, len(fallback), fallback_simulate)
        return SimulatedGpus(fallback, node_name)
    _log.warning("no GPU through NVML (%s); this node offers no GPUs", error)
    return SimulatedGpus((), node_name)
