"""LoadReporter and RouteWatcher against fake stubs (no network)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import pytest

from gpufleet.gateway.admission import DeploymentAdmission, EndpointInfo
from gpufleet.gateway.config import AdmissionConfig
from gpufleet.gateway.load_reporter import LoadReporter, build_report
from gpufleet.gateway.route_table import RouteTable
from gpufleet.gateway.route_watch import RouteWatcher, backoff_delay
from gpufleet.gateway.upstreams import UpstreamPool
from gpufleet.v1 import routing_service_pb2 as rs

pytestmark = pytest.mark.timeout(20)


def _rpc_error(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), "scripted", None)


class FakeReportStub:
    def __init__(self, outcomes: Sequence[rs.ReportLoadResponse | grpc.StatusCode]) -> None:
        self.outcomes = list(outcomes)
        self.requests: list[rs.ReportLoadRequest] = []
        self.metadata: list[Any] = []
        self.called = asyncio.Event()

    async def ReportLoad(  # noqa: N802 - gRPC method name
        self, request: rs.ReportLoadRequest, metadata: Any = None, timeout: float | None = None
    ) -> rs.ReportLoadResponse:
        self.requests.append(request)
        self.metadata.append(metadata)
        self.called.set()
        outcome = self.outcomes.pop(0) if self.outcomes else rs.ReportLoadResponse()
        if isinstance(outcome, grpc.StatusCode):
            raise _rpc_error(outcome)
        return outcome


def _cold_admission() -> DeploymentAdmission:
    """A deployment with no instance and one queued call (one wakeup)."""
    return DeploymentAdmission("echo", AdmissionConfig(queue_timeout_s=30))


async def test_build_report_has_per_instance_load() -> None:
    admission = DeploymentAdmission("echo", AdmissionConfig(max_request_concurrency=2))
    admission.set_endpoints([EndpointInfo("e-1"), EndpointInfo("e-2", draining=True)])
    lease = await admission.acquire(connection_id="c")
    request, pending = build_report("gw", [admission])
    (load,) = request.loads
    assert (request.gateway_id, load.deployment, load.in_flight, load.queue_depth) == (
        "gw", "echo", 1, 0
    )
    assert [(i.instance_id, i.in_flight) for i in load.instances] == [("e-1", 1), ("e-2", 0)]
    assert all(i.idle_seconds == 0 for i in load.instances)
    assert pending[0][0] is admission
    lease.release()


async def test_counters_are_marked_reported_only_after_success() -> None:
    admission = _cold_admission()
    waiting = asyncio.ensure_future(admission.acquire(timeout=30))
    await asyncio.sleep(0)
    stub = FakeReportStub(
        [grpc.StatusCode.UNAVAILABLE, rs.ReportLoadResponse(report_interval_seconds=7)]
    )
    reporter = LoadReporter(
        stub,  # type: ignore[arg-type]
        lambda: [admission],
        gateway_id="gw",
        metadata=(("authorization", "Bearer a"),),
    )
    with pytest.raises(grpc.aio.AioRpcError):
        await reporter.report_once()
    assert admission.load().wakeups == 1 and reporter.reports == 0
    await reporter.report_once()
    assert [r.loads[0].wakeups for r in stub.requests] == [1, 1]
    assert admission.load().wakeups == 0
    assert (reporter.reports, reporter.interval_s) == (1, 7.0)
    assert stub.metadata[0] == (("authorization", "Bearer a"),)
    waiting.cancel()


async def test_demand_reports_at_once() -> None:
    stub = FakeReportStub([rs.ReportLoadResponse(report_interval_seconds=3600)])
    admission = _cold_admission()
    reporter = LoadReporter(
        stub, lambda: [admission], gateway_id="gw", metadata=()  # type: ignore[arg-type]
    )
    task = asyncio.create_task(reporter.run())
    try:
        await asyncio.wait_for(stub.called.wait(), 5)
        await asyncio.sleep(0)
        stub.called.clear()
        reporter.demand()
        await asyncio.wait_for(stub.called.wait(), 5)
        assert len(stub.requests) == 2
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_backoff_doubles_up_to_the_cap_with_jitter() -> None:
    rng = random.Random(1)
    for attempt, cap in [(0, 0.2), (1, 0.4), (2, 0.8), (10, 5.0), (500, 5.0)]:
        for _ in range(20):
            delay = backoff_delay(attempt, 0.2, 5.0, rng)
            assert cap / 2 <= delay <= cap


class FakeWatchCall:
    def __init__(self, messages: Sequence[rs.WatchRoutesResponse], end: grpc.StatusCode | None):
        self._messages = list(messages)
        self._end = end
        self.cancelled = False

    def cancel(self) -> bool:
        self.cancelled = True
        return True

    async def _iterate(self) -> AsyncIterator[rs.WatchRoutesResponse]:
        for message in self._messages:
            yield message
        if self._end is not None:
            raise _rpc_error(self._end)
        await asyncio.Event().wait()  # stays open

    def __aiter__(self) -> AsyncIterator[rs.WatchRoutesResponse]:
        return self._iterate()


class FakeWatchStub:
    def __init__(self, calls: Sequence[FakeWatchCall]) -> None:
        self.calls = list(calls)
        self.requests: list[rs.WatchRoutesRequest] = []
        self.opened = asyncio.Event()

    def WatchRoutes(  # noqa: N802 - gRPC method name
        self, request: rs.WatchRoutesRequest, metadata: Any = None
    ) -> FakeWatchCall:
        self.requests.append(request)
        self.opened.set()
        return self.calls.pop(0)


def _snapshot(*names: str) -> rs.WatchRoutesResponse:
    return rs.WatchRoutesResponse(
        snapshot=True, routes=[rs.DeploymentRoute(deployment=n) for n in names]
    )


async def test_watch_keeps_the_table_while_down_and_takes_the_next_snapshot() -> None:
    table = RouteTable(UpstreamPool())
    stub = FakeWatchStub(
        [
            FakeWatchCall([_snapshot("a", "b")], grpc.StatusCode.UNAVAILABLE),
            FakeWatchCall([], grpc.StatusCode.UNAUTHENTICATED),
            FakeWatchCall([_snapshot("c"), rs.WatchRoutesResponse(routes=[
                rs.DeploymentRoute(deployment="d")])], None),
        ]
    )
    watcher = RouteWatcher(
        stub,  # type: ignore[arg-type]
        table,
        gateway_id="gw",
        metadata=(),
        initial_backoff_s=0.01,
        max_backoff_s=0.02,
    )
    task = asyncio.create_task(watcher.run())
    try:
        deadline = asyncio.get_running_loop().time() + 5
        while not (watcher.connections == 2 and table.deployment("d") is not None):
            assert asyncio.get_running_loop().time() < deadline, "watch did not reconnect"
            # Between the streams the first snapshot stays in place.
            if watcher.connections == 1:
                assert {s.name for s in table.deployments()} == {"a", "b"}
            await asyncio.sleep(0.005)
        assert {s.name for s in table.deployments()} == {"c", "d"}
        assert watcher.connected
        assert [r.gateway_id for r in stub.requests] == ["gw", "gw", "gw"]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
