"""Print this node's GPU readings as JSON: ``python -m gpufleet.agent.gpu.selftest``.

Reads through NVML (or --simulate-gpus) several times, so that the incremental per-process
SM readings are exercised, and attributes GPU processes to the process trees of --pid.
Exits 1 when NVML could not be read at all.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import sys
import time
from collections.abc import Sequence

from gpufleet.agent.gpu.attribution import attribute_to_instances
from gpufleet.agent.gpu.nvml import NvmlProbe
from gpufleet.agent.gpu.readings import GpuProbe
from gpufleet.agent.gpu.simulated import SimulatedGpus, parse_simulate_gpus


def _json_default(value: object) -> object:
    if isinstance(value, enum.Enum):
        return value.value
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpufleet.agent.gpu.selftest", description=__doc__)
    parser.add_argument("--simulate-gpus", help="read simulated cards instead of NVML, e.g. 2x81559")
    parser.add_argument("--reads", type=int, default=3, help="how many readings to take (default 3)")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between readings (default 1)")
    parser.add_argument(
        "--pid", type=int, action="append", default=[], help="attribute GPU processes to this pid's tree (repeatable)"
    )
    args = parser.parse_args(argv)
    if args.reads < 1 or args.interval < 0:
        parser.error("--reads must be at least 1 and --interval at least 0")

    probe: GpuProbe
    init_error: str | None = None
    if args.simulate_gpus is not None:
        try:
            probe = SimulatedGpus(parse_simulate_gpus(args.simulate_gpus), "selftest")
        except ValueError as err:
            parser.error(str(err))
    else:
        nvml_probe = NvmlProbe()
        init_error = nvml_probe.init()
        probe = nvml_probe

    readings = []
    try:
        for number in range(args.reads):
            if number:
                time.sleep(args.interval)
            result = probe.read()
            entry = dataclasses.asdict(result)
            entry["attribution"] = {
                instance: dataclasses.asdict(usage)
                for instance, usage in attribute_to_instances(
                    result, {f"pid-{pid}": pid for pid in args.pid}
                ).items()
            }
            readings.append(entry)
    finally:
        probe.shutdown()
    report = {"probe": type(probe).__name__, "init_error": init_error, "readings": readings}
    json.dump(report, sys.stdout, indent=2, default=_json_default)
    sys.stdout.write("\n")
    return 1 if readings[-1]["error"] is not None else 0


if __name__ == "__main__":
    sys.exit(main())
