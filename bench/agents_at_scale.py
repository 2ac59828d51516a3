"""Benchmark 6: how many agents heartbeating at 1 Hz one control plane holds, and its CPU.

For each step N (100, 250, 500, 750, 1000 by default), side by side:

- gpufleet: a fresh control plane, `python -m gpufleet.server --heartbeat-interval 1` on
  a new state dir, and N simulated agents (bench/agent_pool.py, all in ONE separate
  process, each with its own connection) that register with the join token from
  `<state_dir>/join-token`, connect and heartbeat with two simulated GPUs each;
- floor: the same agent pool against bench/heartbeat_floor.py, a bare grpc.aio
  NodeService that parses and drops the heartbeats.

Which side goes first alternates from step to step. Once all N agents are connected (and,
for gpufleet, ListNodes shows all N READY) and a few seconds have settled the start-up
burst, the hold begins: `--hold` seconds (60 s per the issue; the default run uses 20 s
to stay within the time of `make bench`, and says so). During the hold ListNodes is
checked every few seconds: every node must be READY (none SUSPECT, LOST or missing), and
the pool must lose no stream. The server's CPU share is its CPU time (utime + stime from
/proc, all threads) over the hold, in % of one core.

A step is held when every check passed. The steps stop after the first one gpufleet does
not hold (its floor is still measured); `--keep-going` runs them all.

    python -m bench agents_at_scale [--steps 100 250 500 750 1000] [--hold 20]
        [--check-every 5] [--gpus 2] [--no-floor] [--keep-going] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from gpufleet.v1 import deployment_service_pb2 as pb, deployment_service_pb2_grpc, node_pb2

from bench.agent_pool import CONNECTED, STATS
from bench.heartbeat_floor import LISTENING as FLOOR_LISTENING
from bench.processes import ServerProcess
from bench.report import goal_line, print_table, ratio, ratio_line

GPUFLEET = "gpufleet"
FLOOR = "floor"
CONTROL_PLANE_LISTENING = "gpufleet control plane listening on "
HEARTBEAT_INTERVAL_SECONDS = 1
ISSUE_HOLD_SECONDS = 60.0
DEFAULT_HOLD_SECONDS = 20.0
SETTLE_SECONDS = 3.0
READY_TIMEOUT_SECONDS = 60.0
STATS_TIMEOUT_SECONDS = 30.0
GOAL_AGENTS = 500
CALL_TIMEOUT_SECONDS = 30.0
_STATE_NAMES = {value: name.removeprefix("NODE_STATE_") for name, value in node_pb2.NodeState.items()}


@dataclass(frozen=True)
class Options:
    steps: tuple[int, ...] = (100, 250, 500, 750, 1000)
    """Agent counts, smallest first."""
    hold: float = DEFAULT_HOLD_SECONDS
    """Seconds each step is held and measured."""
    check_every: float = 5.0
    """Seconds between two ListNodes checks during a hold."""
    gpus: int = 2
    """Simulated GPUs per agent."""
    floor: bool = True
    """Also run each step against the bare NodeService."""
    keep_going: bool = False
    """Run every step even after gpufleet failed one."""
    directory: Path | None = None
    """Where the temporary state dirs and logs go (default: the system's temp dir)."""


@dataclass
class Hold:
    """One step on one side."""

    side: str
    agents: int
    connect_seconds: float = 0.0
    """From starting the pool to every agent connected (and, for gpufleet, READY)."""
    seconds: float = 0.0
    server_cpu: float = 0.0
    pool_cpu: float = 0.0
    pool: dict[str, Any] = field(default_factory=dict)
    """The pool's window over the hold (agent_pool.Window as a dict)."""
    checks: int = 0
    not_ready: Counter[str] = field(default_factory=Counter)
    """Per check, nodes not READY by state ("SUSPECT", "LOST", "missing", ...), summed."""
    max_staleness: float | None = None
    """Longest time since a node's last heartbeat seen in any check (gpufleet only)."""
    problem: str = ""
    """Why the step was not held; empty when it was."""

    @property
    def held(self) -> bool:
        return not self.problem

    @property
    def cpu_share(self) -> float:
        """Server CPU in % of one core over the hold."""
        return 100.0 * self.server_cpu / self.seconds if self.seconds else 0.0

    @property
    def cpu_per_heartbeat_us(self) -> float:
        sent = int(self.pool.get("sent", 0))
        return self.server_cpu / sent * 1e6 if sent else 0.0


class NodeChecker:
    """ListNodes on the control plane with the admin token."""

    def __init__(self, address: str, admin_token: str) -> None:
        self._channel = grpc.insecure_channel(address)
        self._stub = deployment_service_pb2_grpc.DeploymentServiceStub(self._channel)
        self._metadata = (("authorization", f"Bearer {admin_token}"),)

    def close(self) -> None:
        self._channel.close()

    def states(self, expected: int) -> tuple[Counter[str], float]:
        """Nodes not READY by state (missing ones too), and the longest silence."""
        response: pb.ListNodesResponse = self._stub.ListNodes(
            pb.ListNodesRequest(), metadata=self._metadata, timeout=CALL_TIMEOUT_SECONDS
        )
        now = time.time()
        not_ready: Counter[str] = Counter()
        staleness = 0.0
        for node in response.nodes:
            if node.state != node_pb2.NODE_STATE_READY:
                not_ready[_STATE_NAMES.get(node.state, str(node.state))] += 1
            if node.HasField("last_heartbeat_time"):
                seen = node.last_heartbeat_time.seconds + node.last_heartbeat_time.nanos / 1e9
                staleness = max(staleness, now - seen)
        if len(response.nodes) < expected:
            not_ready["missing"] += expected - len(response.nodes)
        return not_ready, staleness

    def wait_ready(self, expected: int, timeout: float) -> None:
        """Poll until all `expected` nodes are READY (nothing to await on the server)."""
        deadline = time.monotonic() + timeout
        while True:
            not_ready, _ = self.states(expected)
            if not not_ready:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{sum(not_ready.values())} of {expected} nodes not READY after "
                    f"{timeout:.0f} s: {dict(not_ready)}"
                )
            time.sleep(0.5)


def start_server(side: str, step_dir: Path) -> tuple[ServerProcess, Path, str]:
    """The side's NodeService; returns it, the join token file and the admin token."""
    if side == GPUFLEET:
        state = step_dir / "state"
        server = ServerProcess(
            "control-plane",
            [
                "gpufleet.server",
                "--state-dir",
                str(state),
                "--listen",
                "127.0.0.1:0",
                "--heartbeat-interval",
                str(HEARTBEAT_INTERVAL_SECONDS),
            ],
            CONTROL_PLANE_LISTENING,
            step_dir,
        )
        server.start()
        admin = (state / "admin-token").read_text(encoding="utf-8").strip()
        return server, state / "join-token", admin
    server = ServerProcess(
        "heartbeat-floor",
        ["bench.heartbeat_floor", "--heartbeat-interval", str(HEARTBEAT_INTERVAL_SECONDS)],
        FLOOR_LISTENING,
        step_dir,
    )
    server.start()
    token_file = step_dir / "join-token"
    token_file.write_text("floor-takes-any-token\n", encoding="utf-8")
    return server, token_file, ""


def pool_stats(pool: ServerProcess) -> dict[str, Any]:
    """Ask the pool for its window (SIGUSR1) and read the answer."""
    os.kill(pool.pid, signal.SIGUSR1)
    line = pool.read_line(STATS_TIMEOUT_SECONDS)
    if not line.startswith(STATS):
        raise RuntimeError(f"the agent pool answered {line!r} instead of its stats")
    stats: dict[str, Any] = json.loads(line[len(STATS) :])
    return stats


def hold_step(side: str, agents: int, options: Options, workdir: Path) -> Hold:
    """Start the side's server and a pool of `agents`, hold, measure, stop both."""
    step_dir = workdir / f"{side}-{agents}"
    step_dir.mkdir()
    result = Hold(side, agents)
    server, join_token_file, admin_token = start_server(side, step_dir)
    checker = NodeChecker(server.address, admin_token) if side == GPUFLEET else None
    pool = ServerProcess(
        "agent-pool",
        [
            "bench.agent_pool",
            "--server",
            server.address,
            "--join-token-file",
            str(join_token_file),
            "--agents",
            str(agents),
            "--gpus",
            str(options.gpus),
        ],
        CONNECTED,
        step_dir,
    )
    try:
        started = time.monotonic()
        try:
            pool.start(timeout=READY_TIMEOUT_SECONDS + agents * 0.2)
            if checker is not None:
                checker.wait_ready(agents, READY_TIMEOUT_SECONDS)
        except RuntimeError as err:
            # Not reaching N connected and READY is this step's failure, not the run's.
            result.problem = f"did not start: {err}"
            return result
        result.connect_seconds = time.monotonic() - started
        # Registration and the first heartbeats' store writes are start-up, not the hold.
        time.sleep(SETTLE_SECONDS)
        pool_stats(pool)
        _measure_hold(result, server, pool, checker, options)
    finally:
        if checker is not None:
            checker.close()
        pool.stop()
        server.stop()
    return result


def _measure_hold(
    result: Hold,
    server: ServerProcess,
    pool: ServerProcess,
    checker: NodeChecker | None,
    options: Options,
) -> None:
    cpu_before = (server.cpu_seconds(), pool.cpu_seconds())
    started = time.monotonic()
    end = started + options.hold
    while (remaining := end - time.monotonic()) > 0:
        time.sleep(min(options.check_every, remaining))
        if checker is None:
            continue
        not_ready, staleness = checker.states(result.agents)
        result.checks += 1
        result.not_ready.update(not_ready)
        result.max_staleness = max(result.max_staleness or 0.0, staleness)
    result.seconds = time.monotonic() - started
    result.server_cpu = server.cpu_seconds() - cpu_before[0]
    result.pool_cpu = pool.cpu_seconds() - cpu_before[1]
    result.pool = pool_stats(pool)
    problems = []
    if result.not_ready:
        problems.append(f"nodes not READY in checks: {dict(result.not_ready)}")
    if int(result.pool.get("failures", 0)):
        problems.append(
            f"{result.pool['failures']} agent streams failed ({result.pool['first_failure']})"
        )
    if int(result.pool.get("connected", 0)) != result.agents:
        problems.append(f"only {result.pool.get('connected')} of {result.agents} connected")
    result.problem = "; ".join(problems)


def run(options: Options) -> list[Hold]:
    holds: list[Hold] = []
    with tempfile.TemporaryDirectory(prefix="gpufleet-bench-agents-", dir=options.directory) as tmp:
        workdir = Path(tmp)
        for position, agents in enumerate(options.steps):
            sides = [GPUFLEET, FLOOR] if options.floor else [GPUFLEET]
            if position % 2:
                sides.reverse()
            step: list[Hold] = []
            for side in sides:
                print(f"  step {agents} agents, {side}: starting", flush=True)
                hold = hold_step(side, agents, options, workdir)
                print(
                    f"  step {agents} agents, {side}: {'held' if hold.held else 'NOT held'}, "
                    f"server CPU {hold.cpu_share:.1f} % of a core",
                    flush=True,
                )
                step.append(hold)
            holds.extend(sorted(step, key=lambda h: h.side != GPUFLEET))
            ours = next(h for h in step if h.side == GPUFLEET)
            if not ours.held and not options.keep_going:
                break
    return holds


def print_report(holds: Sequence[Hold], options: Options) -> None:
    hold_note = (
        f"{options.hold:g} s per step (the issue asks for {ISSUE_HOLD_SECONDS:g} s: "
        f"--hold {ISSUE_HOLD_SECONDS:g})"
        if options.hold < ISSUE_HOLD_SECONDS
        else f"{options.hold:g} s per step"
    )
    print(
        f"agents at scale: N simulated agents in one process, heartbeat every "
        f"{HEARTBEAT_INTERVAL_SECONDS} s with {options.gpus} simulated GPUs each; hold "
        f"{hold_note}; ListNodes every {options.check_every:g} s"
    )
    print_table(
        [
            "agents",
            "side",
            "connect s",
            "hold s",
            "heartbeats",
            "server CPU %",
            "server CPU us/hb",
            "pool CPU %",
            "max gap s",
            "late hb",
            "max silence s",
            "checks",
            "held",
        ],
        [_row(h) for h in holds],
    )
    if any(h.problem for h in holds):
        print()
        for h in holds:
            if h.problem:
                print(f"not held: {h.agents} agents, {h.side}: {h.problem}")
    print()
    print(
        "(server CPU %: of one core over the hold; max gap: longest time between two "
        "heartbeats of one agent, as the pool sent them; max silence: longest time since a "
        "node's last heartbeat seen by ListNodes)"
    )
    ours = [h for h in holds if h.side == GPUFLEET]
    held = [h for h in ours if h.held]
    for h in ours:
        floor = next((f for f in holds if f.side == FLOOR and f.agents == h.agents), None)
        if floor is not None:
            print(
                ratio_line(
                    f"gpufleet/floor server CPU at {h.agents} agents",
                    ratio(h.server_cpu, floor.server_cpu),
                )
            )
    if held:
        best = max(held, key=lambda h: h.agents)
        print(
            f"largest N held: {best.agents} agents for {best.seconds:.0f} s, control plane CPU "
            f"{best.cpu_share:.1f} % of one core ({best.cpu_per_heartbeat_us:.0f} us per "
            "heartbeat)"
        )
    else:
        best = None
        print("largest N held: none (the smallest step already failed)")
    largest = best.agents if best is not None else 0
    tried_enough = max(options.steps) >= GOAL_AGENTS
    print(
        goal_line(
            f"N >= {GOAL_AGENTS} agents held",
            largest >= GOAL_AGENTS,
            f"{largest} held" + ("" if tried_enough else f", steps stop at {max(options.steps)}"),
        )
    )


def _row(h: Hold) -> list[str]:
    staleness = "-" if h.max_staleness is None else f"{h.max_staleness:.2f}"
    pool_share = 100.0 * h.pool_cpu / h.seconds if h.seconds else 0.0
    return [
        str(h.agents),
        h.side,
        f"{h.connect_seconds:.1f}",
        f"{h.seconds:.0f}",
        f"{int(h.pool.get('sent', 0)):,}",
        f"{h.cpu_share:.1f}",
        f"{h.cpu_per_heartbeat_us:.0f}",
        f"{pool_share:.1f}",
        f"{float(h.pool.get('max_gap_s', 0.0)):.2f}",
        str(h.pool.get("late", 0)),
        staleness,
        str(h.checks) if h.side == GPUFLEET else "-",
        "yes" if h.held else "NO",
    ]


def parse_args(argv: Sequence[str] | None) -> Options:
    defaults = Options()
    parser = argparse.ArgumentParser(
        prog="python -m bench agents_at_scale",
        description="Simulated agents heartbeating at 1 Hz into one control plane, stepped up.",
    )
    parser.add_argument("--steps", type=int, nargs="+", default=list(defaults.steps))
    parser.add_argument(
        "--hold",
        type=float,
        default=defaults.hold,
        help=f"seconds to hold each step (default {defaults.hold:g}; the issue asks for "
        f"{ISSUE_HOLD_SECONDS:g})",
    )
    parser.add_argument("--check-every", type=float, default=defaults.check_every)
    parser.add_argument("--gpus", type=int, default=defaults.gpus)
    parser.add_argument(
        "--no-floor", action="store_true", help="skip the bare NodeService baseline"
    )
    parser.add_argument(
        "--keep-going", action="store_true", help="run every step even after one failed"
    )
    parser.add_argument("--dir", type=Path, default=None, help="directory for state and logs")
    args = parser.parse_args(argv)
    if min(args.steps) < 1 or args.hold <= 0 or args.check_every <= 0 or args.gpus < 0:
        parser.error("--steps must be >= 1, --hold and --check-every > 0, --gpus >= 0")
    return Options(
        steps=tuple(sorted(args.steps)),
        hold=args.hold,
        check_every=args.check_every,
        gpus=args.gpus,
        floor=not args.no_floor,
        keep_going=args.keep_going,
        directory=args.dir,
    )


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    holds = run(options)
    print()
    print_report(holds, options)
    return 0
