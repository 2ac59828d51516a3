"""Benchmark 4: acknowledged Create/Update deployments per second over gRPC, next to a bare
aiosqlite insert loop with the same pragmas, on the same disk.

The control plane runs in its own process (control_plane_process.py), state dir and
baseline database side by side in one temporary directory. Each gRPC client has its own
channel (its own connection) and loops: create a deployment, update its spec with the
revision it got back; every acknowledged call counts as one write. Rounds alternate
between gpufleet and the baseline, and which side goes first alternates too.

    python -m bench control_plane_writes [--clients 1 16] [--rounds 3] [--seconds 2]
        [--dir DIR] [--profile FILE.pstats] [--floor]
"""

from __future__ import annotations

import argparse
import asyncio
import pstats
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import aiosqlite
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gpufleet.server.spec_defaults import with_defaults
from gpufleet.v1 import deployment_pb2, deployment_service_pb2 as pb, deployment_service_pb2_grpc

from bench.control_plane_process import ControlPlaneProcess
from bench.report import median, percentile, print_table, ratio, ratio_line
from bench.sqlite_baseline import insert_loop, open_baseline

GPUFLEET = "gpufleet"
BASELINE = "aiosqlite"
FLOOR = "grpc-floor"
WARMUP_SECONDS = 0.5
CALL_TIMEOUT_SECONDS = 30.0
# Each channel its own subchannel pool, hence its own TCP connection: N clients are N
# connections, as N CLI or SDK processes would be.
CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]

if TYPE_CHECKING:
    # Declared only in the generated .pyi: the runtime class is DeploymentServiceStub.
    from gpufleet.v1.deployment_service_pb2_grpc import DeploymentServiceAsyncStub as Stub


@dataclass(frozen=True)
class Options:
    clients: tuple[int, ...] = (1, 16)
    """Concurrent writers per round, one round per count."""
    rounds: int = 3
    """Rounds per count and side."""
    seconds: float = 2.0
    """Length of one round."""
    directory: Path | None = None
    """Where the temporary state dir and baseline database go (default: the system's)."""
    profile: Path | None = None
    """When set: one more gpufleet round, under cProfile, after the measured ones."""
    floor: bool = False
    """Also measure grpc.health.v1 Check on the same server and channels: what gRPC alone
    costs, to tell the server's write path from the transport."""


@dataclass(frozen=True)
class Round:
    side: str
    clients: int
    index: int
    seconds: float
    latencies: list[float]
    cpu_seconds: float
    """CPU used by the process doing the writes: the server for gpufleet, this one for
    the baseline."""

    @property
    def writes(self) -> int:
        return len(self.latencies)

    @property
    def per_second(self) -> float:
        return self.writes / self.seconds

    @property
    def cpu_per_write(self) -> float:
        return self.cpu_seconds / max(1, self.writes)


def spec(version: int) -> deployment_pb2.DeploymentSpec:
    """A small valid spec; versions differ so every update really changes the spec."""
    return deployment_pb2.DeploymentSpec(
        command="python -m model_server", port=8000, env={"VERSION": str(version)}
    )


async def grpc_round(
    stubs: Sequence[Stub], token: str, seconds: float, prefix: str
) -> tuple[float, list[float]]:
    """Each stub creates then updates deployments until `seconds` pass; (elapsed seconds,
    latency of each acknowledged write)."""
    metadata = (("authorization", f"Bearer {token}"),)
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def client(stub: Stub, number: int) -> None:
        count = 0
        while time.perf_counter() < deadline:
            name = f"{prefix}-c{number}-{count}"
            count += 1
            started = time.perf_counter()
            created = await stub.CreateDeployment(
                pb.CreateDeploymentRequest(
                    deployment=deployment_pb2.Deployment(name=name, spec=spec(1))
                ),
                metadata=metadata,
                timeout=CALL_TIMEOUT_SECONDS,
            )
            done = time.perf_counter()
            latencies.append(done - started)
            if done >= deadline:
                break
            await stub.UpdateDeployment(
                pb.UpdateDeploymentRequest(
                    deployment=deployment_pb2.Deployment(name=name, spec=spec(2)),
                    revision=created.deployment.revision,
                ),
                metadata=metadata,
                timeout=CALL_TIMEOUT_SECONDS,
            )
            latencies.append(time.perf_counter() - done)

    started = time.perf_counter()
    await asyncio.gather(*(client(stub, n) for n, stub in enumerate(stubs)))
    return time.perf_counter() - started, latencies


async def health_round(
    stubs: Sequence[health_pb2_grpc.HealthStub], seconds: float
) -> tuple[float, list[float]]:
    """Health checks until `seconds` pass: a call that touches neither auth nor the store."""
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    request = health_pb2.HealthCheckRequest()

    async def client(stub: health_pb2_grpc.HealthStub) -> None:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            await stub.Check(request, timeout=CALL_TIMEOUT_SECONDS)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(client(stub) for stub in stubs))
    return time.perf_counter() - started, latencies


class Bench:
    """Both sides, set up once; `round()` runs one measured round of either."""

    def __init__(
        self,
        server: ControlPlaneProcess,
        token: str,
        channels: Sequence[grpc.aio.Channel],
        db: aiosqlite.Connection,
    ) -> None:
        self._server = server
        self._token = token
        self._stubs: list[Stub] = [
            deployment_service_pb2_grpc.DeploymentServiceStub(c) for c in channels
        ]
        self._health = [health_pb2_grpc.HealthStub(c) for c in channels]
        self._db = db
        # What the store keeps per deployment, so the baseline writes rows of that size.
        self._payload = deployment_pb2.Deployment(
            name="bench-payload", spec=with_defaults(spec(1))
        ).SerializeToString()

    async def round(self, side: str, clients: int, index: int, seconds: float) -> Round:
        prefix = f"r{index}-n{clients}"
        if side in (GPUFLEET, FLOOR):
            cpu_before = self._server.cpu_seconds()
            if side == GPUFLEET:
                elapsed, latencies = await grpc_round(
                    self._stubs[:clients], self._token, seconds, prefix
                )
            else:
                elapsed, latencies = await health_round(self._health[:clients], seconds)
            cpu = self._server.cpu_seconds() - cpu_before
        else:
            cpu_before = time.process_time()
            elapsed, latencies = await insert_loop(
                self._db, clients, seconds, prefix, self._payload
            )
            cpu = time.process_time() - cpu_before
        return Round(side, clients, index, elapsed, latencies, cpu)


async def run(options: Options) -> list[Round]:
    """Warm both sides up, then the alternating measured rounds (and the profile round)."""
    with tempfile.TemporaryDirectory(prefix="gpufleet-bench-", dir=options.directory) as tmp:
        server = ControlPlaneProcess(Path(tmp) / "state")
        channels: list[grpc.aio.Channel] = []
        try:
            endpoint = server.start()
            channels.extend(
                grpc.aio.insecure_channel(endpoint.address, options=CHANNEL_OPTIONS)
                for _ in range(max(options.clients))
            )
            db = await open_baseline(Path(tmp) / "baseline.db")
            try:
                bench = Bench(server, endpoint.admin_token, channels, db)
                return await _rounds(bench, server, options)
            finally:
                await db.close()
        finally:
            for channel in channels:
                await channel.close(None)
            server.stop()


async def _rounds(bench: Bench, server: ControlPlaneProcess, options: Options) -> list[Round]:
    most = max(options.clients)
    for side in (GPUFLEET, BASELINE, FLOOR) if options.floor else (GPUFLEET, BASELINE):
        await bench.round(side, most, 0, WARMUP_SECONDS)
    measured: list[Round] = []
    for index in range(1, options.rounds + 1):
        for position, clients in enumerate(options.clients):
            # Which side goes first flips from round to round for every client count.
            first = (index + position) % 2 == 1
            order = [GPUFLEET, BASELINE] if first else [BASELINE, GPUFLEET]
            if options.floor:
                order.append(FLOOR)
            for side in order:
                measured.append(await bench.round(side, clients, index, options.seconds))
    if options.profile is not None:
        server.profile(True)
        await bench.round(GPUFLEET, most, options.rounds + 1, options.seconds)
        server.profile(False)
        server.dump_profile(options.profile.resolve())
    return measured


def print_report(rounds: Sequence[Round], options: Options) -> None:
    print(
        "control plane writes: acknowledged CreateDeployment/UpdateDeployment over gRPC vs a "
        "bare aiosqlite INSERT loop (WAL, synchronous=FULL, one commit per write); "
        f"{options.rounds} rounds of {options.seconds:g} s per side and client count"
    )
    headers = [
        "round",
        "clients",
        "side",
        "writes",
        "seconds",
        "writes/s",
        "p50 ms",
        "p99 ms",
        "writer CPU ms/write",
    ]
    print_table(headers, [_row(r) for r in rounds])
    print()
    summary: list[list[str]] = []
    ratios: list[tuple[int, float]] = []
    for clients in options.clients:
        ours = [r for r in rounds if r.clients == clients and r.side == GPUFLEET]
        theirs = [r for r in rounds if r.clients == clients and r.side == BASELINE]
        # Ratios per round, then their median: the two halves of a round ran back to back.
        per_round = [
            ratio(a.per_second, b.per_second) for a in ours for b in theirs if a.index == b.index
        ]
        ratios.append((clients, median(per_round)))
        summary.append(_median_row(clients, GPUFLEET, ours))
        summary.append(_median_row(clients, BASELINE, theirs))
        floor = [r for r in rounds if r.clients == clients and r.side == FLOOR]
        if floor:
            summary.append(_median_row(clients, FLOOR, floor))
    print_table(
        ["clients", "side (median of rounds)", "writes/s", "p50 ms", "writer CPU ms/write"],
        summary,
    )
    if options.floor:
        print(f"({FLOOR}: grpc.health.v1 Check calls, not writes, on the same server)")
    for clients, value in ratios:
        plural = "s" if clients > 1 else ""
        what = f"{GPUFLEET}/baseline writes/s with {clients} client{plural}"
        print(ratio_line(f"{what} (median of per-round ratios)", value))


def _row(r: Round) -> list[str]:
    return [
        str(r.index),
        str(r.clients),
        r.side,
        str(r.writes),
        f"{r.seconds:.2f}",
        f"{r.per_second:,.0f}",
        f"{percentile(r.latencies, 0.5) * 1e3:.2f}",
        f"{percentile(r.latencies, 0.99) * 1e3:.2f}",
        f"{r.cpu_per_write * 1e3:.3f}",
    ]


def _median_row(clients: int, side: str, group: Sequence[Round]) -> list[str]:
    return [
        str(clients),
        side,
        f"{median([r.per_second for r in group]):,.0f}",
        f"{median([percentile(r.latencies, 0.5) for r in group]) * 1e3:.2f}",
        f"{median([r.cpu_per_write for r in group]) * 1e3:.3f}",
    ]


def print_profile(path: Path, limit: int = 25) -> None:
    print(f"\nprofile of the server's event-loop thread in the extra round, saved to {path}:")
    stats = pstats.Stats(str(path))
    stats.sort_stats(pstats.SortKey.TIME).print_stats(limit)


def parse_args(argv: Sequence[str] | None) -> Options:
    defaults = Options()
    parser = argparse.ArgumentParser(
        prog="python -m bench control_plane_writes",
        description="Durable Create/Update writes over gRPC vs a bare aiosqlite insert loop.",
    )
    parser.add_argument(
        "--clients",
        type=int,
        nargs="+",
        default=list(defaults.clients),
        help="concurrent writers, one set of rounds per value (default: 1 16)",
    )
    parser.add_argument("--rounds", type=int, default=defaults.rounds)
    parser.add_argument("--seconds", type=float, default=defaults.seconds)
    parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="directory for the temporary databases (default: the system temp dir)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        metavar="FILE",
        help="after measuring, profile one more gpufleet round and save pstats to FILE",
    )
    parser.add_argument(
        "--floor",
        action="store_true",
        help="also time grpc.health.v1 Check on the same server: the cost of gRPC alone",
    )
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.seconds <= 0 or min(args.clients) < 1:
        parser.error("--rounds and every --clients value must be at least 1, --seconds > 0")
    return Options(
        clients=tuple(args.clients),
        rounds=args.rounds,
        seconds=args.seconds,
        directory=args.dir,
        profile=args.profile,
        floor=args.floor,
    )


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    rounds = asyncio.run(run(options))
    print_report(rounds, options)
    if options.profile is not None:
        print_profile(options.profile)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
