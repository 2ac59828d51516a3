"""Benchmark 3: gpufleet's scheduler against naive first-fit, on the same inputs.

For each seed, both place the same 10,000 mixed requests (whole GPUs, GPU shares, no
GPU) on the same empty 1,000 x 8-GPU cluster, one after the other, in alternating order
from seed to seed. Printed per run: decisions per second (placed or failed requests over
the time of the one scheduling call; building the input is not timed) and GPUs used
against the lower bound ceil(demand / capacity) per resource. Medians over the seeds make
the summary, the goal lines and the closing ratios.

    python -m bench scheduler [--seeds 5] [--nodes 1000] [--instances 10000] ...
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from gpufleet.server.scheduler import schedule

from bench.first_fit import first_fit
from bench.report import goal_line, median, print_table, ratio, ratio_line
from bench.scheduler_workload import (
    Assigned,
    Workload,
    WorkloadShape,
    check_assignments,
    gpu_bound,
    gpus_used,
    make_workload,
)

GOAL_PLACEMENTS_PER_SECOND = 5_000
GOAL_BOUND_RATIO = 1.10
GPUFLEET = "gpufleet"
BASELINE = "first-fit"


@dataclass(frozen=True)
class Outcome:
    """One scheduler on one seed."""

    scheduler: str
    seed: int
    placed: int
    failed: int
    seconds: float
    gpus_used: int
    bound_memory: int
    bound_sm: int

    @property
    def per_second(self) -> float:
        return (self.placed + self.failed) / self.seconds

    @property
    def over_bound(self) -> float:
        return self.gpus_used / max(1, self.bound_memory, self.bound_sm)


def run_gpufleet(workload: Workload) -> tuple[float, list[Assigned], int]:
    """(seconds, assignments, failures) of one schedule() call."""
    gc.collect()
    start = time.perf_counter()
    plan = schedule(workload.snapshot, workload.requests)
    seconds = time.perf_counter() - start
    by_id = {request.instance_id: request for request in workload.requests}
    assigned = [Assigned(by_id[p.instance_id], p.node_id, p.gpu_uuids) for p in plan.placements]
    return seconds, assigned, len(plan.failures)


def run_first_fit(workload: Workload) -> tuple[float, list[Assigned], int]:
    """(seconds, assignments, failures) of one first_fit() call."""
    gc.collect()
    start = time.perf_counter()
    result = first_fit(workload.snapshot, workload.requests)
    seconds = time.perf_counter() - start
    return seconds, result.assigned, result.failed


Runner = Callable[[Workload], tuple[float, list[Assigned], int]]
RUNNERS: dict[str, Runner] = {GPUFLEET: run_gpufleet, BASELINE: run_first_fit}


def measure(name: str, seed: int, workload: Workload) -> Outcome:
    seconds, assigned, failed = RUNNERS[name](workload)
    check_assignments(workload.snapshot, assigned)
    bound = gpu_bound(assigned, workload.gpu_memory_mib)
    return Outcome(
        scheduler=name,
        seed=seed,
        placed=len(assigned),
        failed=failed,
        seconds=seconds,
        gpus_used=gpus_used(assigned),
        bound_memory=bound.memory,
        bound_sm=bound.sm,
    )


def run(seeds: Sequence[int], shape: WorkloadShape) -> list[Outcome]:
    """Both schedulers on every seed, gpufleet first on even positions, last on odd."""
    outcomes: list[Outcome] = []
    for position, seed in enumerate(seeds):
        workload = make_workload(seed, shape)
        order = [GPUFLEET, BASELINE] if position % 2 == 0 else [BASELINE, GPUFLEET]
        outcomes.extend(measure(name, seed, workload) for name in order)
    return outcomes


def print_report(outcomes: Sequence[Outcome], shape: WorkloadShape) -> None:
    print(
        f"scheduler: {shape.instances} requests on {shape.nodes} nodes x "
        f"{shape.gpus_per_node} GPUs of {shape.gpu_memory_mib} MiB; whole "
        f"{shape.whole_fraction:.0%}, no GPU {shape.plain_fraction:.0%}, shares the rest; "
        f"spread {shape.spread_fraction:.0%}, node selector {shape.selector_fraction:.0%}"
    )
    headers = [
        "seed",
        "scheduler",
        "placed",
        "failed",
        "seconds",
        "placements/s",
        "GPUs used",
        "LB memory",
        "LB SM",
        "used/LB",
    ]
    print_table(headers, [_row(o) for o in outcomes])
    ours = [o for o in outcomes if o.scheduler == GPUFLEET]
    theirs = [o for o in outcomes if o.scheduler == BASELINE]
    print()
    print_table(
        ["median over seeds", "placements/s", "GPUs used", "used/LB"],
        [_median_row(GPUFLEET, ours), _median_row(BASELINE, theirs)],
    )
    speed = median([o.per_second for o in ours])
    bound = median([o.over_bound for o in ours])
    print(
        goal_line(
            f"gpufleet >= {GOAL_PLACEMENTS_PER_SECOND:,} placements/s",
            speed >= GOAL_PLACEMENTS_PER_SECOND,
            f"{speed:,.0f}/s",
        )
    )
    print(
        goal_line(
            f"gpufleet GPUs used <= {GOAL_BOUND_RATIO:.2f} x lower bound",
            bound <= GOAL_BOUND_RATIO,
            f"{bound:.3f} x",
        )
    )
    # Ratios per seed, then their median: the two runs of a pair had the same input.
    pairs = [(a, b) for a in ours for b in theirs if a.seed == b.seed]
    used = median([ratio(a.gpus_used, b.gpus_used) for a, b in pairs])
    speedup = median([ratio(a.per_second, b.per_second) for a, b in pairs])
    what = f"{GPUFLEET}/{BASELINE}"
    print(ratio_line(f"{what} GPUs used (median of per-seed ratios, lower is better)", used, 3))
    print(ratio_line(f"{what} placements/s (median of per-seed ratios)", speedup))


def _row(o: Outcome) -> list[str]:
    return [
        str(o.seed),
        o.scheduler,
        str(o.placed),
        str(o.failed),
        f"{o.seconds:.3f}",
        f"{o.per_second:,.0f}",
        str(o.gpus_used),
        str(o.bound_memory),
        str(o.bound_sm),
        f"{o.over_bound:.3f}",
    ]


def _median_row(name: str, group: Sequence[Outcome]) -> list[str]:
    return [
        name,
        f"{median([o.per_second for o in group]):,.0f}",
        f"{median([o.gpus_used for o in group]):.0f}",
        f"{median([o.over_bound for o in group]):.3f}",
    ]


def parse_args(argv: Sequence[str] | None) -> tuple[list[int], WorkloadShape]:
    defaults = WorkloadShape()
    parser = argparse.ArgumentParser(
        prog="python -m bench scheduler",
        description="gpufleet's scheduler vs naive first-fit on the same seeded inputs.",
    )
    parser.add_argument("--seeds", type=int, default=5, help="seeds 1..N (default 5)")
    parser.add_argument("--nodes", type=int, default=defaults.nodes)
    parser.add_argument("--gpus-per-node", type=int, default=defaults.gpus_per_node)
    parser.add_argument("--instances", type=int, default=defaults.instances)
    parser.add_argument("--max-replicas", type=int, default=defaults.max_replicas)
    parser.add_argument("--whole-fraction", type=float, default=defaults.whole_fraction)
    parser.add_argument("--plain-fraction", type=float, default=defaults.plain_fraction)
    parser.add_argument("--spread-fraction", type=float, default=defaults.spread_fraction)
    parser.add_argument("--selector-fraction", type=float, default=defaults.selector_fraction)
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.nodes < 1 or args.instances < 1 or args.max_replicas < 1:
        parser.error("--seeds, --nodes, --instances and --max-replicas must be at least 1")
    shape = WorkloadShape(
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        instances=args.instances,
        max_replicas=args.max_replicas,
        whole_fraction=args.whole_fraction,
        plain_fraction=args.plain_fraction,
        spread_fraction=args.spread_fraction,
        selector_fraction=args.selector_fraction,
    )
    return list(range(1, args.seeds + 1)), shape


def main(argv: Sequence[str] | None = None) -> int:
    seeds, shape = parse_args(argv)
    print_report(run(seeds, shape), shape)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
