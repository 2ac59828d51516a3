"""`python -m bench` runs every benchmark with its defaults; `python -m bench NAME [FLAGS]`
runs one (`python -m bench NAME --help` lists its flags); `--list` names them."""

from __future__ import annotations

import sys
import time
import traceback
from collections.abc import Callable, Sequence

from bench import (
    agents_at_scale,
    control_plane_writes,
    gateway_overhead,
    scale_from_zero,
    scheduler,
)

Main = Callable[[Sequence[str] | None], int]

BENCHMARKS: dict[str, tuple[Main, str]] = {
    "scheduler": (scheduler.main, "issue 5 #3: scheduler vs naive first-fit"),
    "control_plane_writes": (
        control_plane_writes.main,
        "issue 5 #4: durable Create/Update over gRPC vs a bare aiosqlite insert loop",
    ),
    "gateway_unary": (
        gateway_overhead.unary_main,
        "issue 5 #1: ModelInfer through the gateway vs straight to the instance",
    ),
    "gateway_stream": (
        gateway_overhead.stream_main,
        "issue 5 #2: ModelStreamInfer messages through the gateway vs direct",
    ),
    "scale_from_zero": (
        scale_from_zero.main,
        "issue 5 #5: cold call through gpufleet up minus the instance's own start, vs a bare start",
    ),
    "agents_at_scale": (
        agents_at_scale.main,
        "issue 5 #6: N agents heartbeating at 1 Hz vs a bare NodeService",
    ),
}


def main(argv: Sequence[str]) -> int:
    if argv and argv[0] in ("-h", "--help", "--list"):
        print(__doc__)
        for name, (_, what) in BENCHMARKS.items():
            print(f"  {name:22} {what}")
        return 0
    if argv:
        name = argv[0].replace("-", "_")
        if name not in BENCHMARKS:
            print(
                f"python -m bench: no benchmark {argv[0]!r}; choose one of "
                f"{', '.join(BENCHMARKS)} (or none to run them all)",
                file=sys.stderr,
            )
            return 2
        return BENCHMARKS[name][0](list(argv[1:]))
    failed = []
    for name, (run, what) in BENCHMARKS.items():
        print(f"=== {name}: {what}", flush=True)
        started = time.perf_counter()
        try:
            code = run([])
        except Exception:
            traceback.print_exc()
            code = 1
        if code != 0:
            failed.append(name)
        print(f"=== {name}: done in {time.perf_counter() - started:.0f} s\n", flush=True)
    if failed:
        print(f"python -m bench: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
