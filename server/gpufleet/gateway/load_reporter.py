"""ReportLoad: tells the control plane about queues, calls in flight and demand.

A report goes out every `report_interval_seconds` (as the last response said; 1 s until
then) and at once when a deployment's admission signals demand: a call arrived with no
ready instance (scale from zero) or asked for route rule scale-out. Demand that arrives
while a report is in flight triggers one more report right after it, never a burst.

Wakeup and scale-out counters are marked reported only after the control plane accepted
the report, so a failed report loses no demand: the next one carries it again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Sequence

import grpc

from gpufleet.gateway.admission import DeploymentAdmission, LoadSnapshot
from gpufleet.v1 import routing_service_pb2, routing_service_pb2_grpc

_log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 1.0
"""Report interval until the control plane names one."""
RPC_TIMEOUT_S = 5.0
"""Deadline of one ReportLoad call."""
_MIN_RETRY_S = 0.1

Pending = list[tuple[DeploymentAdmission, LoadSnapshot]]
"""The snapshots a report carried, to mark reported once it was accepted."""


def build_report(
    gateway_id: str, admissions: Iterable[DeploymentAdmission]
) -> tuple[routing_service_pb2.ReportLoadRequest, Pending]:
    """The ReportLoad request for these deployments, and the snapshots it carries."""
    request = routing_service_pb2.ReportLoadRequest(gateway_id=gateway_id)
    pending: Pending = []
    for admission in admissions:
        snapshot = admission.load()
        idle = admission.idle_seconds()
        load = request.loads.add(
            deployment=snapshot.deployment,
            queue_depth=snapshot.queue_depth,
            in_flight=snapshot.in_flight,
            wakeups=snapshot.wakeups,
            scale_out_requests=snapshot.scale_out_requests,
        )
        for view in admission.endpoint_views():
            load.instances.add(
                instance_id=view.instance_id,
                in_flight=view.in_flight,
                idle_seconds=idle.get(view.instance_id, 0.0),
            )
        pending.append((admission, snapshot))
    return request, pending


class LoadReporter:
    """Sends ReportLoad periodically and on demand until cancelled."""

    def __init__(
        self,
        stub: routing_service_pb2_grpc.RoutingServiceAsyncStub,
        admissions: Callable[[], Iterable[DeploymentAdmission]],
        *,
        gateway_id: str,
        metadata: Sequence[tuple[str, str]],
    ) -> None:
        self._stub = stub
        self._admissions = admissions
        self._gateway_id = gateway_id
        self._metadata = tuple(metadata)
        self._wake = asyncio.Event()
        self._interval_s = DEFAULT_INTERVAL_S
        self._reports = 0

    @property
    def reports(self) -> int:
        """Reports the control plane accepted."""
        return self._reports

    @property
    def interval_s(self) -> float:
        """The current report interval."""
        return self._interval_s

    def demand(self) -> None:
        """Report as soon as possible (DeploymentAdmission's on_demand hook)."""
        self._wake.set()

    async def report_once(self) -> None:
        """Send one report now. Raises grpc.aio.AioRpcError if it was not accepted."""
        request, pending = build_report(self._gateway_id, self._admissions())
        response = await self._stub.ReportLoad(
            request, metadata=self._metadata, timeout=RPC_TIMEOUT_S
        )
        for admission, snapshot in pending:
            admission.mark_reported(snapshot)
        self._reports += 1
        if response.report_interval_seconds > 0:
            self._interval_s = float(response.report_interval_seconds)

    async def run(self) -> None:
        """Report forever; returns only by cancellation."""
        failures = 0
        while True:
            self._wake.clear()
            try:
                await self.report_once()
            except grpc.aio.AioRpcError as err:
                if failures == 0:
                    _log.warning(
                        "cannot report load to the control plane (%s: %s); retrying",
                        err.code().name,
                        err.details(),
                    )
                failures += 1
                # Calls keep signalling demand while the control plane is away; without
                # this pause every one of them would trigger another failing report.
                await asyncio.sleep(min(self._interval_s, _MIN_RETRY_S * 2 ** min(failures, 10)))
                continue
            if failures:
                _log.info("load reports reach the control plane again")
                failures = 0
            try:
                await asyncio.wait_for(self._wake.wait(), self._interval_s)
            except TimeoutError:
                pass
