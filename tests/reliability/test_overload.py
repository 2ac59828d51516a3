"""Issue 5, fault 6: overload at 5x capacity for 20 s through a real gateway process.

One instance of a slow model (the example `tokens` model, 20 ms per token, 6 tokens: about
100 ms per call) with max_request_concurrency 2 and max_queue_size 4, so the gateway admits
6 calls at a time and serves about 20 calls/s. 30 callers (5 x the 6 admitted) each start
a call every 300 ms, offering about 100 calls/s (5 x the 20 calls/s served) for 20 s.

Checked: every call either succeeds (admitted: 100% of them succeed) or is refused with
RESOURCE_EXHAUSTED, reason QUEUE_FULL and a `grpc-retry-pushback-ms` trailer; refusals
arrive within 50 ms at the 99th percentile (the issue's fast-fail bound, measured at the
client) and within 20 ms at the median; accepted + rejected == calls sent; and the
gateway's resident memory, read from /proc, does not keep growing (at 20 s within a
generous margin of its size at 5 s).

The 50 ms bound is on the gateway's refusal path, not on the scheduling of a shared
machine: on a busy 2-core box a process is sometimes not run for tens of milliseconds.
So, all through the overload, the test also times the cheapest call the same gateway
answers (ServerLive: no token, no admission), one every 20 ms. The bound is 50 ms, or
2x that control call's p99 when the gateway's process is itself delayed by more than a
half of 50 ms. Both figures are printed. On an idle machine the bound is the issue's
50 ms; refusals slower than the gateway's cheapest answer fail either way.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, cast

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from gpufleet.inference import grpc_service_pb2 as oip
from gpufleet.inference import grpc_service_pb2_grpc as oip_grpc
from tests.e2e.conftest import Processes, start_agent, wait_for
from tests.reliability.conftest import (
    MODEL_SERVER,
    PUSHBACK_KEY,
    GatewayProc,
    bearer,
    create,
    deployment,
    metadata_value,
    model_ready,
    ready_instances,
    start_gateway,
    start_plane,
    tokens_request,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

TOKEN_DELAY_MS = 20
TOKENS_PER_CALL = 6  # 5 delays: ~100 ms per call
CONCURRENCY = 2
QUEUE = 4
CALLERS = 5 * (CONCURRENCY + QUEUE)
CALLER_PERIOD_S = 0.3  # 30 callers -> ~100 calls/s offered, 5 x the ~20 calls/s served
DURATION_S = 20.0
EARLY_RSS_AT_S = 5.0
REJECTION_P99_BOUND_S = 0.050
REJECTION_P50_BOUND_S = 0.020
CONTROL_PERIOD_S = 0.020
CONTROL_FACTOR = 2.0
RSS_MARGIN_KIB = 32 * 1024
CALL_TIMEOUT_S = 10.0
STATUS_DETAILS_KEY = "grpc-status-details-bin"


@dataclass
class Outcomes:
    sent: int = 0
    accepted: int = 0
    rejections: list[tuple[float, float]] = field(default_factory=list)
    """(start, seconds to the refusal) of every refused call."""
    pushbacks_ms: list[int] = field(default_factory=list)
    other: list[str] = field(default_factory=list)
    control_latencies: list[float] = field(default_factory=list)
    """Latencies of the gateway's cheapest call (ServerLive), taken meanwhile."""
    rss_kib: dict[str, int] = field(default_factory=dict)

    @property
    def rejected(self) -> int:
        return len(self.rejections)


def _reason(err: grpc.aio.AioRpcError) -> str:
    """The google.rpc.ErrorInfo reason of a refusal."""
    trailers = cast(Iterable[tuple[str, Any]], err.trailing_metadata() or ())
    for key, value in trailers:
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            for detail in status_pb2.Status.FromString(value).details:
                if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    detail.Unpack(info)
                    return str(info.reason)
    return "(no ErrorInfo)"


async def _caller(n: int, stub: oip_grpc.GRPCInferenceServiceAsyncStub, token: str, end: float, out: Outcomes) -> None:
    request = tokens_request("slow", TOKENS_PER_CALL, f"caller-{n}")
    next_start = time.monotonic() + n * CALLER_PERIOD_S / CALLERS  # spread the callers out
    while True:
        await asyncio.sleep(max(0.0, next_start - time.monotonic()))
        started = time.monotonic()
        if started >= end:
            return
        next_start = started + CALLER_PERIOD_S
        out.sent += 1
        try:
            await stub.ModelInfer(request, metadata=bearer(token), timeout=CALL_TIMEOUT_S)
        except grpc.aio.AioRpcError as err:
            elapsed = time.monotonic() - started
            pushback = metadata_value(err.trailing_metadata(), PUSHBACK_KEY)
            if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and pushback is not None:
                out.rejections.append((started, elapsed))
                out.pushbacks_ms.append(int(pushback))
                reason = _reason(err)
                if reason != "QUEUE_FULL":
                    out.other.append(f"RESOURCE_EXHAUSTED with reason {reason}")
            else:
                out.other.append(f"{err.code()} after {elapsed:.3f} s: {err.details()}")
        else:
            out.accepted += 1


async def _time_control_calls(stub: oip_grpc.GRPCInferenceServiceAsyncStub, end: float, out: Outcomes) -> None:
    """Time the gateway's cheapest call, ServerLive, every CONTROL_PERIOD_S."""
    while time.monotonic() < end:
        started = time.monotonic()
        await stub.ServerLive(oip.ServerLiveRequest(), timeout=CALL_TIMEOUT_S)
        out.control_latencies.append(time.monotonic() - started)
        await asyncio.sleep(max(0.0, started + CONTROL_PERIOD_S - time.monotonic()))


async def _sample_rss(gateway: GatewayProc, start: float, out: Outcomes) -> None:
    out.rss_kib["before"] = gateway.rss_kib()
    await asyncio.sleep(max(0.0, start + EARLY_RSS_AT_S - time.monotonic()))
    out.rss_kib["at 5 s"] = gateway.rss_kib()


async def _overload(gateway: GatewayProc, token: str) -> Outcomes:
    out = Outcomes()
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        await stub.ModelInfer(tokens_request("slow", 1), metadata=bearer(token), timeout=CALL_TIMEOUT_S)
        start = time.monotonic()
        end = start + DURATION_S
        watchers = [
            asyncio.ensure_future(_sample_rss(gateway, start, out)),
            asyncio.ensure_future(_time_control_calls(stub, end, out)),
        ]
        await asyncio.gather(*(_caller(n, stub, token, end, out) for n in range(CALLERS)))
        out.rss_kib["at 20 s"] = gateway.rss_kib()
        await asyncio.gather(*watchers)
    return out


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def test_overload_5x_for_20s_fails_fast_and_loses_no_admitted_call(processes: Processes) -> None:
    plane = start_plane(processes, processes.tmp_path / "server", "--heartbeat-interval", "1")
    start_agent(processes, plane, "a")
    gateway = start_gateway(processes, plane)
    token = create(
        plane,
        deployment(
            "slow",
            command=f"{MODEL_SERVER} --model slow=tokens --token-delay-ms {TOKEN_DELAY_MS}",
            max_request_concurrency=CONCURRENCY,
            max_queue_size=QUEUE,
        ),
    )
    ready_instances(plane, "slow", 1)
    wait_for("slow routed by the gateway", lambda: model_ready(gateway.address, "slow", token))

    out = asyncio.run(_overload(gateway, token))

    assert out.other == [], f"{len(out.other)} calls neither succeeded nor were refused: {out.other[:5]}"
    assert out.accepted + out.rejected == out.sent
    # Overloaded for real: most calls were refused, and the instance stayed busy.
    assert out.rejected > out.sent / 2 and out.accepted >= DURATION_S * 5, out
    assert min(out.pushbacks_ms) >= 1
    latencies = [elapsed for _, elapsed in out.rejections]
    p50, p99 = _percentile(latencies, 0.5), _percentile(latencies, 0.99)
    control_p99 = _percentile(out.control_latencies, 0.99)
    bound = max(REJECTION_P99_BOUND_S, CONTROL_FACTOR * control_p99)
    summary = (
        f"refusals in {p50 * 1000:.1f} ms p50, {p99 * 1000:.1f} ms p99 (bound {bound * 1000:.0f} ms; "
        f"the gateway's ServerLive meanwhile: {control_p99 * 1000:.1f} ms p99 "
        f"over {len(out.control_latencies)} calls)"
    )
    assert p99 <= bound, summary
    assert p50 <= REJECTION_P50_BOUND_S, summary
    early, late = out.rss_kib["at 5 s"], out.rss_kib["at 20 s"]
    assert late <= early * 1.25 + RSS_MARGIN_KIB, out.rss_kib
    assert gateway.alive()
    print(
        f"overload {DURATION_S:g} s: {out.sent} calls sent, {out.accepted} accepted (100% ok), "
        f"{out.rejected} rejected (QUEUE_FULL, pushback {min(out.pushbacks_ms)}-{max(out.pushbacks_ms)} ms); "
        f"{summary}; gateway RSS {out.rss_kib} KiB"
    )
