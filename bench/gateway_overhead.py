"""Benchmarks 1 and 2: what the gateway adds to an inference call, unary and streaming.

The same client code (generated stubs over grpc.aio, one channel per target, created once)
calls the example model server's echo model with a 1 KiB tensor, either straight at the
instance ("direct") or through the gateway ("gateway"), with the same number of calls in
flight. Rounds alternate between the two sides, and which side goes first flips every
round; a warm-up of each side comes first. Three processes share the machine: this one
(the client and the static routes), the gateway and the instance; the CPU each of the
two servers used per call is printed with the rates.

With --floor a third side, "bare-proxy" (bench/bare_proxy.py), forwards the same calls
through a grpc.aio proxy that does nothing but forward raw bytes: what any Python gRPC hop
costs. The gateway's CPU per call beyond it is what gpufleet's own data-plane code costs.
With --wire-floors two more sides measure proxies that use no gRPC library:
"h2-proxy" (bench/h2_proxy.py) forwards HTTP/2 frames with hyper-h2, and "tcp-splice"
(bench/tcp_splice.py) copies TCP bytes without parsing them.
With --reference DIR one more side, "gateway-ref", is a second gateway running the code
of the source tree DIR (e.g. `git archive HEAD server protos | tar -x -C DIR`): a before
and after of a gateway change, measured in the same alternating rounds.

    python -m bench gateway_unary  [--in-flight 1 32] [--rounds 3] [--seconds 2]
        [--payload-bytes 1024] [--floor] [--wire-floors] [--reference DIR]
        [--profile FILE.pstats]
    python -m bench gateway_stream [same flags]

Unary: `in_flight` workers call ModelInfer back to back. Streaming: one ModelStreamInfer
stream with up to `in_flight` requests unanswered at a time; each response is matched to
its request by id. With --profile, one more round of the largest in-flight count runs
through a second gateway started under cProfile, and its profile is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import pstats
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from gpufleet.inference import grpc_service_pb2 as pb, grpc_service_pb2_grpc

from bench.gateway_targets import (
    H2_PROXY,
    INVOKE_TOKEN,
    MODEL,
    TCP_SPLICE,
    Targets,
    running_targets,
    start_gateway,
)
from bench.oip_load import (
    CALL_TIMEOUT_SECONDS,
    LoadResult,
    check_echo,
    infer_request,
    stream_load,
    unary_load,
)
from bench.processes import ServerProcess
from bench.report import goal_line, median, percentile, print_table, ratio, ratio_line

if TYPE_CHECKING:
    from gpufleet.inference.grpc_service_pb2_grpc import (
        GRPCInferenceServiceAsyncStub as InferenceStub,
    )

GATEWAY = "gateway"
DIRECT = "direct"
FLOOR = "bare-proxy"
REFERENCE = "gateway-ref"
UNARY = "unary"
STREAM = "stream"
WARMUP_SECONDS = 0.5
METADATA = (("authorization", f"Bearer {INVOKE_TOKEN}"),)
THROUGHPUT_GOAL = 0.5
"""Issue 5: gateway calls (messages) per second >= 0.5 x direct."""
LATENCY_GOAL = 2.0
"""Issue 5 (unary): gateway p50 <= 2 x direct at 1 call in flight."""

Load = Callable[
    ["InferenceStub", pb.ModelInferRequest, Sequence[tuple[str, str]], int, float],
    Awaitable[LoadResult],
]


@dataclass(frozen=True)
class Options:
    kind: str = UNARY
    """UNARY (benchmark 1) or STREAM (benchmark 2)."""
    in_flight: tuple[int, ...] = (1, 32)
    """Calls (unary) or unanswered stream messages in flight; one set of rounds each."""
    rounds: int = 3
    """Rounds per side and in-flight count."""
    seconds: float = 2.0
    """Length of one round."""
    payload_bytes: int = 1024
    """Size of the request tensor (FP32, so a multiple of 4)."""
    directory: Path | None = None
    """Where the servers' stderr logs go (default: a temporary directory)."""
    profile: Path | None = None
    """When set: one more gateway round under cProfile; pstats saved here."""
    floor: bool = False
    """Also measure bench.bare_proxy, the floor of a Python gRPC hop."""
    reference: Path | None = None
    """Also measure a gateway running the code of this source tree."""
    wire_floors: bool = False
    """Also measure bench.h2_proxy and bench.tcp_splice (no gRPC library)."""


@dataclass(frozen=True)
class Round:
    side: str
    in_flight: int
    index: int
    result: LoadResult
    hop_cpu: float
    """CPU seconds the process between client and instance used in the round: the
    gateway, or the bare proxy; 0 for direct rounds."""
    instance_cpu: float
    """CPU seconds the model server used in the round."""
    client_cpu: float
    """CPU seconds this (client) process used in the round."""

    def per_call_us(self, cpu: float) -> float:
        return cpu / max(1, self.result.calls) * 1e6


class Sides:
    """One channel and stub per target, opened once and reused by every round."""

    def __init__(self, targets: Targets) -> None:
        self.targets = targets
        self.hops: dict[str, ServerProcess | None] = {GATEWAY: targets.gateway, DIRECT: None}
        if targets.reference is not None:
            self.hops[REFERENCE] = targets.reference
        if targets.floor is not None:
            self.hops[FLOOR] = targets.floor
        self.hops.update(targets.wire_floors)
        self._channels = {
            side: grpc.aio.insecure_channel(
                targets.instance.address if hop is None else hop.address
            )
            for side, hop in self.hops.items()
        }
        self.stubs: dict[str, InferenceStub] = {
            side: grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
            for side, channel in self._channels.items()
        }

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close(None)


async def check_both(sides: Sides, request: pb.ModelInferRequest) -> None:
    """Each side echoes the tensor, before anything is timed."""
    for stub in sides.stubs.values():
        check_echo(
            request,
            await stub.ModelInfer(request, metadata=METADATA, timeout=CALL_TIMEOUT_SECONDS),
        )


async def measure(
    load: Load,
    sides: Sides,
    request: pb.ModelInferRequest,
    side: str,
    in_flight: int,
    index: int,
    seconds: float,
) -> Round:
    """One round of `load` on one side, with the CPU time of every process on the path."""
    hop = sides.hops[side]
    instance = sides.targets.instance

    def cpu() -> tuple[float, float, float]:
        hop_cpu = 0.0 if hop is None else hop.cpu_seconds()
        return hop_cpu, instance.cpu_seconds(), time.process_time()

    before = cpu()
    result = await load(sides.stubs[side], request, METADATA, in_flight, seconds)
    after = cpu()
    hop_cpu, instance_cpu, client_cpu = (b - a for a, b in zip(before, after, strict=True))
    return Round(side, in_flight, index, result, hop_cpu, instance_cpu, client_cpu)


async def run(options: Options) -> tuple[list[Round], Path | None]:
    """The measured rounds, then (with --profile) the profiled one; returns the rounds and
    where the profile went."""
    load: Load = unary_load if options.kind == UNARY else stream_load
    request = infer_request(MODEL, options.payload_bytes)
    with tempfile.TemporaryDirectory(prefix="gpufleet-bench-gw-", dir=options.directory) as tmp:
        log_dir = Path(tmp)
        async with running_targets(
            log_dir,
            max(options.in_flight),
            floor=options.floor,
            reference=options.reference,
            wire_floors=options.wire_floors,
        ) as targets:
            sides = Sides(targets)
            try:
                await check_both(sides, request)
                rounds = await _rounds(load, sides, request, options)
                if options.profile is not None:
                    await _profile_round(load, sides, request, options, options.profile)
            finally:
                await sides.close()
    return rounds, options.profile


async def _rounds(
    load: Load, sides: Sides, request: pb.ModelInferRequest, options: Options
) -> list[Round]:
    most = max(options.in_flight)
    names = list(sides.hops)
    for side in names:
        await measure(load, sides, request, side, most, 0, WARMUP_SECONDS)
    measured: list[Round] = []
    for index in range(1, options.rounds + 1):
        for position, in_flight in enumerate(options.in_flight):
            # Which side goes first rotates from round to round for every in-flight count.
            shift = (index + position) % len(names)
            for side in names[shift:] + names[:shift]:
                measured.append(
                    await measure(load, sides, request, side, in_flight, index, options.seconds)
                )
    return measured


async def _profile_round(
    load: Load, sides: Sides, request: pb.ModelInferRequest, options: Options, path: Path
) -> None:
    """A second gateway under cProfile takes one round of the largest in-flight count."""
    targets = sides.targets
    profiled = await start_gateway(
        targets.routes_address, targets.log_dir, name="gateway-profiled", profile=path.resolve()
    )
    try:
        async with grpc.aio.insecure_channel(profiled.address) as channel:
            stub: InferenceStub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
            most = max(options.in_flight)
            await load(stub, request, METADATA, most, WARMUP_SECONDS)
            await load(stub, request, METADATA, most, options.seconds)
    finally:
        # cProfile writes the file when the gateway exits.
        await asyncio.to_thread(profiled.stop)
    if not path.exists():
        raise RuntimeError(f"the profiled gateway wrote no profile to {path}:\n{profiled.stderr()}")


def print_report(rounds: Sequence[Round], options: Options) -> None:
    unit = "calls" if options.kind == UNARY else "messages"
    one = unit[:-1]
    what = (
        "unary ModelInfer"
        if options.kind == UNARY
        else "ModelStreamInfer messages on one bidi stream"
    )
    print(
        f"gateway overhead ({options.kind}): {what}, {options.payload_bytes} B tensor, echo "
        f"model, through the gateway vs straight to the instance; {options.rounds} rounds of "
        f"{options.seconds:g} s per side and in-flight count"
    )
    print_table(
        [
            "round",
            "in flight",
            "side",
            unit,
            "seconds",
            f"{unit}/s",
            "p50 ms",
            "p99 ms",
            f"hop CPU us/{one}",
            f"instance CPU us/{one}",
            f"client CPU us/{one}",
        ],
        [_row(r) for r in rounds],
    )
    print()
    sides = [GATEWAY, DIRECT]
    if options.reference is not None:
        sides.append(REFERENCE)
    if options.floor:
        sides.append(FLOOR)
    if options.wire_floors:
        sides.extend((H2_PROXY, TCP_SPLICE))
    summary: list[list[str]] = []
    for in_flight in options.in_flight:
        for side in sides:
            group = [r for r in rounds if r.in_flight == in_flight and r.side == side]
            summary.append(_median_row(in_flight, side, group))
    print_table(
        [
            "in flight",
            "side (median of rounds)",
            f"{unit}/s",
            "p50 ms",
            "p99 ms",
            f"hop CPU us/{one}",
            f"instance CPU us/{one}",
        ],
        summary,
    )
    print("(hop CPU: the process between client and instance, per " + one + ")")
    if options.reference is not None:
        print(f"({REFERENCE}: the gateway code of {options.reference})")
    for in_flight in options.in_flight:
        _print_ratios(rounds, options, in_flight, unit)


def _print_ratios(rounds: Sequence[Round], options: Options, in_flight: int, unit: str) -> None:
    pairs = _pairs(rounds, in_flight, DIRECT)
    throughput = median([ratio(g.result.per_second, d.result.per_second) for g, d in pairs])
    p50 = median([ratio(_p50(g), _p50(d)) for g, d in pairs])
    at = f"at {in_flight} in flight (median of per-round ratios)"
    print(ratio_line(f"gateway/direct {unit}/s {at}", throughput))
    print(ratio_line(f"gateway/direct p50 latency {at}", p50))
    for other, wanted in ((REFERENCE, options.reference is not None), (FLOOR, options.floor)):
        if not wanted:
            continue
        other_pairs = _pairs(rounds, in_flight, other)
        print(
            ratio_line(
                f"gateway/{other} {unit}/s {at}",
                median([ratio(g.result.per_second, o.result.per_second) for g, o in other_pairs]),
            )
        )
        print(
            ratio_line(
                f"gateway/{other} hop CPU per {unit[:-1]} {at}",
                median(
                    [
                        ratio(g.per_call_us(g.hop_cpu), o.per_call_us(o.hop_cpu))
                        for g, o in other_pairs
                    ]
                ),
            )
        )
    floors = [FLOOR] if options.floor else []
    floors += [H2_PROXY, TCP_SPLICE] if options.wire_floors else []
    for floor in floors:
        floor_pairs = _pairs(rounds, in_flight, DIRECT, ours=floor)
        print(
            ratio_line(
                f"{floor}/direct {unit}/s {at}",
                median([ratio(f.result.per_second, d.result.per_second) for f, d in floor_pairs]),
            )
        )
        print(
            ratio_line(
                f"{floor}/direct p50 latency {at}",
                median([ratio(_p50(f), _p50(d)) for f, d in floor_pairs]),
            )
        )
    print(
        goal_line(
            f"gateway {unit}/s >= {THROUGHPUT_GOAL:g} x direct at {in_flight} in flight",
            throughput >= THROUGHPUT_GOAL,
            f"{throughput:.2f} x",
        )
    )
    if options.kind == UNARY and in_flight == 1:
        print(
            goal_line(
                f"gateway p50 <= {LATENCY_GOAL:g} x direct at 1 in flight",
                p50 <= LATENCY_GOAL,
                f"{p50:.2f} x",
            )
        )


def _p50(r: Round) -> float:
    return percentile(r.result.latencies, 0.5)


def _pairs(
    rounds: Sequence[Round], in_flight: int, other: str, ours: str = GATEWAY
) -> list[tuple[Round, Round]]:
    """(`ours`, `other`) rounds that ran back to back."""
    mine = [r for r in rounds if r.in_flight == in_flight and r.side == ours]
    theirs = [r for r in rounds if r.in_flight == in_flight and r.side == other]
    return [(g, d) for g in mine for d in theirs if g.index == d.index]


def _row(r: Round) -> list[str]:
    return [
        str(r.index),
        str(r.in_flight),
        r.side,
        str(r.result.calls),
        f"{r.result.seconds:.2f}",
        f"{r.result.per_second:,.0f}",
        f"{_p50(r) * 1e3:.3f}",
        f"{percentile(r.result.latencies, 0.99) * 1e3:.3f}",
        "-" if r.side == DIRECT else f"{r.per_call_us(r.hop_cpu):.0f}",
        f"{r.per_call_us(r.instance_cpu):.0f}",
        f"{r.per_call_us(r.client_cpu):.0f}",
    ]


def _median_row(in_flight: int, side: str, group: Sequence[Round]) -> list[str]:
    hop_cpu = "-" if side == DIRECT else f"{median([r.per_call_us(r.hop_cpu) for r in group]):.0f}"
    return [
        str(in_flight),
        side,
        f"{median([r.result.per_second for r in group]):,.0f}",
        f"{median([_p50(r) for r in group]) * 1e3:.3f}",
        f"{median([percentile(r.result.latencies, 0.99) for r in group]) * 1e3:.3f}",
        hop_cpu,
        f"{median([r.per_call_us(r.instance_cpu) for r in group]):.0f}",
    ]


def print_profile(path: Path, limit: int = 30) -> None:
    print(f"\nprofile of the gateway's main thread (the profiled round), saved to {path}:")
    stats = pstats.Stats(str(path))
    stats.sort_stats(pstats.SortKey.TIME).print_stats(limit)


def parse_args(argv: Sequence[str] | None, kind: str) -> Options:
    defaults = Options()
    parser = argparse.ArgumentParser(
        prog=f"python -m bench gateway_{kind}",
        description=(
            "ModelInfer" if kind == UNARY else "ModelStreamInfer messages"
        )
        + " through the gateway vs straight to the instance.",
    )
    parser.add_argument(
        "--in-flight",
        type=int,
        nargs="+",
        default=list(defaults.in_flight),
        help="calls in flight (unary) or unanswered messages (stream), one set of rounds per "
        "value (default: 1 32)",
    )
    parser.add_argument("--rounds", type=int, default=defaults.rounds)
    parser.add_argument("--seconds", type=float, default=defaults.seconds)
    parser.add_argument("--payload-bytes", type=int, default=defaults.payload_bytes)
    parser.add_argument(
        "--dir", type=Path, default=None, help="directory for the servers' logs (default: temp)"
    )
    parser.add_argument(
        "--floor",
        action="store_true",
        help="also measure a bare grpc.aio raw-bytes proxy (bench.bare_proxy): the cost of "
        "any Python gRPC hop",
    )
    parser.add_argument(
        "--wire-floors",
        action="store_true",
        help="also measure proxies without a gRPC library: HTTP/2 frames with hyper-h2 "
        "(bench.h2_proxy) and a plain TCP splice (bench.tcp_splice)",
    )
    parser.add_argument(
        "--reference",
        type=Path,
        default=None,
        metavar="DIR",
        help="also measure a gateway running the code of source tree DIR (make one with "
        "`git archive REF server protos | tar -x -C DIR`)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        metavar="FILE",
        help="after measuring, run one more round through a gateway under cProfile and save "
        "its pstats to FILE",
    )
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.seconds <= 0 or min(args.in_flight) < 1:
        parser.error("--rounds and every --in-flight value must be at least 1, --seconds > 0")
    if args.payload_bytes < 4 or args.payload_bytes % 4:
        parser.error("--payload-bytes must be a positive multiple of 4 (an FP32 tensor)")
    return Options(
        kind=kind,
        in_flight=tuple(args.in_flight),
        rounds=args.rounds,
        seconds=args.seconds,
        payload_bytes=args.payload_bytes,
        directory=args.dir,
        profile=args.profile,
        floor=args.floor,
        reference=args.reference,
        wire_floors=args.wire_floors,
    )


def _main(argv: Sequence[str] | None, kind: str) -> int:
    options = parse_args(argv, kind)
    rounds, profile = asyncio.run(run(options))
    print_report(rounds, options)
    if profile is not None:
        print_profile(profile)
    return 0


def unary_main(argv: Sequence[str] | None = None) -> int:
    """Benchmark 1: unary ModelInfer."""
    return _main(argv, UNARY)


def stream_main(argv: Sequence[str] | None = None) -> int:
    """Benchmark 2: ModelStreamInfer messages."""
    return _main(argv, STREAM)
