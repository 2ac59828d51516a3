"""The WatchRoutes client: keeps the RouteTable in step with the control plane.

One stream at a time. A broken stream (control plane restarting, network loss) is reopened
after a jittered exponential backoff, and meanwhile the table keeps its last content: the
gateway goes on serving the instances it knows (static stability). The first message of
each new stream is a snapshot, which replaces whatever the table missed.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Sequence

import grpc

from gpufleet.gateway.route_table import RouteTable
from gpufleet.gateway.routing import RandomSource
from gpufleet.v1 import routing_service_pb2, routing_service_pb2_grpc

_log = logging.getLogger(__name__)

_AUTH_CODES = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


def backoff_delay(
    attempt: int, initial_s: float, maximum_s: float, rng: RandomSource
) -> float:
    """Wait before reconnect attempt `attempt` (0 = the first retry after a failure).

    The cap doubles from `initial_s` up to `maximum_s`; the wait is uniform in
    [cap/2, cap], so many gateways that lost the control plane together do not all come
    back in the same instant, and none retries faster than half the cap.
    """
    cap = min(maximum_s, initial_s * 2.0 ** min(attempt, 62))
    return cap / 2 + rng.random() * cap / 2


class RouteWatcher:
    """Runs WatchRoutes until cancelled, feeding every message into `table`."""

    def __init__(
        self,
        stub: routing_service_pb2_grpc.RoutingServiceAsyncStub,
        table: RouteTable,
        *,
        gateway_id: str,
        metadata: Sequence[tuple[str, str]],
        initial_backoff_s: float,
        max_backoff_s: float,
        rng: RandomSource | None = None,
    ) -> None:
        self._stub = stub
        self._table = table
        self._gateway_id = gateway_id
        self._metadata = tuple(metadata)
        self._initial_backoff_s = initial_backoff_s
        self._max_backoff_s = max_backoff_s
        self._rng: RandomSource = rng if rng is not None else random.Random()
        self._connected = False
        self._connections = 0

    @property
    def connected(self) -> bool:
        """True while a stream is open and has delivered its snapshot."""
        return self._connected

    @property
    def connections(self) -> int:
        """Streams that delivered a snapshot since start (1 + reconnections)."""
        return self._connections

    async def run(self) -> None:
        """Watch forever; returns only by cancellation."""
        attempt = 0
        last_problem = ""
        while True:
            problem = await self._watch_once()
            if self._connected:
                self._connected = False
                attempt = 0
                _log.warning(
                    "lost the route watch on the control plane (%s); serving from the last "
                    "routing table until it is back",
                    problem,
                )
            elif problem != last_problem:
                log = _log.error if "token" in problem else _log.warning
                log("cannot watch routes on the control plane: %s; retrying", problem)
            last_problem = problem
            delay = backoff_delay(attempt, self._initial_backoff_s, self._max_backoff_s, self._rng)
            attempt += 1
            await asyncio.sleep(delay)

    async def _watch_once(self) -> str:
        """One stream, until it ends; returns why it ended."""
        request = routing_service_pb2.WatchRoutesRequest(gateway_id=self._gateway_id)
        call = self._stub.WatchRoutes(request, metadata=self._metadata)
        try:
            async for response in call:
                self._table.apply(response)
                if response.snapshot and not self._connected:
                    self._connected = True
                    self._connections += 1
                    _log.info(
                        "route watch open: %d deployment(s) in the table",
                        len(self._table.deployments()),
                    )
            return "the control plane ended the stream"
        except grpc.aio.AioRpcError as err:
            if err.code() in _AUTH_CODES:
                return (
                    f"{err.code().name}: {err.details()} (check the gateway's admin token)"
                )
            return f"{err.code().name}: {err.details()}"
        except asyncio.CancelledError:
            call.cancel()
            raise
        except Exception as err:  # noqa: BLE001 - a bad message must not end the watch
            _log.exception("route update failed; reopening the watch for a fresh snapshot")
            call.cancel()
            return f"route update failed: {err}"
