"""Admission control for one deployment: slots, per-connection limits, the FIFO queue.

Everything here runs on the event loop thread and does no network I/O. The I/O layer calls
`acquire` for each call (a stream too, for its whole life), proxies the call to the lease's
instance, and releases the lease when the call ends, however it ends:

    lease = await admission.acquire(connection_id=peer, rule=rule, timeout=remaining)
    with lease:
        ...  # proxy to lease.instance_id, send deploy-route-target
    # GatewayError from acquire carries the reason, status code and pushback.

Guarantees:

- An instance never has more than max_request_concurrency leases, and a connection never
  more than max_streams_per_connection (0 = no limit) on this deployment.
- A lease frees its slot exactly once: release() is idempotent.
- Queue: FIFO. Whenever a slot or a connection's capacity frees up, or the endpoints
  change, the queue is walked from the head and every waiter that can run now is started,
  so a waiter needing one particular instance (sticky hash, instance id) or blocked by its
  connection's limit lets the ones behind it use other capacity. After every such walk no
  queued call can run, so a new call may take a free slot directly without jumping the
  queue.
- A waiter leaves the queue when its wait ends: queue_timeout or its own deadline,
  whichever is sooner (QUEUE_TIMEOUT), cancellation, or its target instance going away
  (ROUTE_TARGET_NOT_FOUND). A slot handed to a waiter that is cancelled before it resumes
  is released at once.
- Endpoint changes: added instances start queued calls; draining ones finish their calls
  and get no new ones; leases on removed instances stay valid (the call may still finish)
  but no longer hold a slot, and releasing them later is harmless.

Route rule `scale-out` asks for one more instance (counted in `scale_out_requests`, refused
with REPLICA_QUOTA_EXCEEDED when the instances this gateway sees plus the scale-out calls
already waiting reach max_instances) and runs on an instance that appears after the call
arrived. If none appears, the call ends with QUEUE_TIMEOUT.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import TracebackType

from gpufleet.gateway.clock import Clock, LoopClock, TimerHandle
from gpufleet.gateway.config import AdmissionConfig
from gpufleet.gateway.errors import Code, GatewayError, Reason
from gpufleet.gateway.rate_limit import TokenBucket
from gpufleet.gateway.route_rules import DEFAULT_RULE, RouteRule, RuleKind
from gpufleet.gateway.routing import (
    Chosen,
    EndpointView,
    RandomSource,
    RouteDecision,
    TargetNotFound,
    choose_endpoint,
)

MIN_PUSHBACK_MS = 100
"""Smallest QUEUE_FULL pushback: below it clients would just hammer a full queue."""
MAX_PUSHBACK_MS = 30_000
"""Largest QUEUE_FULL pushback; long streams would otherwise suggest waits of hours."""
DEFAULT_HOLD_S = 1.0
"""Assumed slot hold time before any call has finished."""
_HOLD_EWMA_WEIGHT = 0.2


@dataclass(frozen=True, slots=True)
class EndpointInfo:
    """One ready instance from the route table."""

    instance_id: str
    """Instance id."""
    draining: bool = False
    """True: finish calls in flight, send no new ones."""


@dataclass(frozen=True, slots=True)
class LoadSnapshot:
    """What ReportLoad sends for this deployment (routing_service.proto DeploymentLoad)."""

    deployment: str
    """Deployment name."""
    queue_depth: int
    """Calls waiting now. Calls queued while no instance is ready also ask for one."""
    in_flight: int
    """Calls holding a lease now, including leases on instances since removed."""
    wakeups: int
    """Calls that arrived while no instance was ready, since the last mark_reported."""
    scale_out_requests: int
    """Accepted scale-out calls since the last mark_reported."""


def queue_full_pushback_ms(queue_depth: int, slots: int, mean_hold_s: float | None) -> int:
    """Suggested retry delay for a call refused with QUEUE_FULL.

    The estimate is how long the current queue takes to drain: each of the `slots` serving
    slots frees every `mean_hold_s` seconds on average, so `queue_depth + 1` calls take
    (queue_depth + 1) * mean_hold_s / slots. With no slot (instances still starting) one
    slot is assumed. Clamped to [MIN_PUSHBACK_MS, MAX_PUSHBACK_MS].
    """
    hold = DEFAULT_HOLD_S if mean_hold_s is None else max(mean_hold_s, 0.0)
    estimate_s = (queue_depth + 1) * hold / max(slots, 1)
    return max(MIN_PUSHBACK_MS, min(MAX_PUSHBACK_MS, math.ceil(estimate_s * 1000.0)))


class _Endpoint:
    """Mutable per-instance accounting; a lease keeps a reference to the one it holds."""

    __slots__ = ("instance_id", "draining", "present", "in_flight", "idle_since")

    def __init__(self, instance_id: str, draining: bool, now: float) -> None:
        self.instance_id = instance_id
        self.draining = draining
        self.present = True
        self.in_flight = 0
        # The idle clock runs only while the instance is ready (present, not draining) and
        # has no call in flight.
        self.idle_since: float | None = None if draining else now


class Lease:
    """One call's slot on one instance. Release it exactly when the call ends."""

    __slots__ = ("_owner", "_endpoint", "_connection_id", "_granted_at", "_released")

    def __init__(
        self,
        owner: DeploymentAdmission,
        endpoint: _Endpoint,
        connection_id: str,
        granted_at: float,
    ) -> None:
        self._owner = owner
        self._endpoint = endpoint
        self._connection_id = connection_id
        self._granted_at = granted_at
        self._released = False

    @property
    def instance_id(self) -> str:
        """The instance to send the call to (also the `deploy-route-target` value)."""
        return self._endpoint.instance_id

    @property
    def connection_id(self) -> str:
        """The client connection the call came on."""
        return self._connection_id

    @property
    def granted_at(self) -> float:
        """Clock time when the slot was granted."""
        return self._granted_at

    @property
    def released(self) -> bool:
        """True once release() has run."""
        return self._released

    @property
    def detached(self) -> bool:
        """True once the instance left the route table; the lease then holds no slot."""
        return not self._endpoint.present

    def release(self) -> None:
        """Give the slot back; later calls do nothing."""
        if self._released:
            return
        self._released = True
        self._owner._release(self._endpoint, self._connection_id, self._granted_at)

    def __enter__(self) -> Lease:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "released" if self._released else "held"
        return f"Lease(instance_id={self.instance_id!r}, {state})"


class _Waiter:
    __slots__ = (
        "seq", "future", "connection_id", "rule", "hash_value", "excluded", "timer",
        "wait_s", "limited_by_deadline",
    )

    def __init__(
        self,
        seq: int,
        future: asyncio.Future[Lease],
        connection_id: str,
        rule: RouteRule,
        hash_value: str | bytes | None,
        excluded: frozenset[str],
        wait_s: float,
        limited_by_deadline: bool,
    ) -> None:
        self.seq = seq
        self.future = future
        self.connection_id = connection_id
        self.rule = rule
        self.hash_value = hash_value
        # scale-out: instances present on arrival, which the call must not use.
        self.excluded = excluded
        self.timer: TimerHandle | None = None
        self.wait_s = wait_s
        self.limited_by_deadline = limited_by_deadline


class DeploymentAdmission:
    """Admission control for one deployment on one gateway."""

    def __init__(
        self,
        deployment: str,
        config: AdmissionConfig,
        *,
        clock: Clock | None = None,
        rng: RandomSource | None = None,
        on_demand: Callable[[], None] | None = None,
    ) -> None:
        """`on_demand` runs (synchronously; it must be quick and must not raise) whenever a
        call records a wakeup or a scale-out request, so the I/O layer can report load at
        once instead of at the next report interval."""
        self._deployment = deployment
        self._config = config
        self._clock: Clock = clock if clock is not None else LoopClock()
        self._rng: RandomSource = rng if rng is not None else random.Random()
        self._on_demand = on_demand
        self._endpoints: dict[str, _Endpoint] = {}
        self._views_cache: tuple[EndpointView, ...] | None = None
        self._cursor = ""
        self._connections: dict[str, int] = {}
        self._in_flight = 0
        self._queue: dict[int, _Waiter] = {}
        self._seq = itertools.count()
        self._pending_scale_outs = 0
        self._bucket: TokenBucket | None = None
        self._mean_hold_s: float | None = None
        self._wakeups_total = 0
        self._scale_outs_total = 0
        self._wakeups_reported = 0
        self._scale_outs_reported = 0
        self._closed_message: str | None = None

    # ----- state the I/O layer reads

    @property
    def deployment(self) -> str:
        """Deployment name."""
        return self._deployment

    @property
    def config(self) -> AdmissionConfig:
        """Current admission settings."""
        return self._config

    @property
    def queue_depth(self) -> int:
        """Calls waiting for a slot."""
        return len(self._queue)

    @property
    def in_flight(self) -> int:
        """Calls holding a lease."""
        return self._in_flight

    @property
    def closed(self) -> bool:
        """True after close(): every call is refused."""
        return self._closed_message is not None

    def endpoint_views(self) -> tuple[EndpointView, ...]:
        """The endpoints with their current load, in instance id order."""
        return self._views()

    def connection_in_flight(self, connection_id: str) -> int:
        """Calls the connection holds on this deployment."""
        return self._connections.get(connection_id, 0)

    def idle_seconds(self) -> dict[str, float]:
        """Per ready (present, not draining) instance: seconds idle, 0 while busy."""
        now = self._clock.now()
        return {
            e.instance_id: 0.0 if e.idle_since is None else max(0.0, now - e.idle_since)
            for e in self._endpoints.values()
            if not e.draining
        }

    def load(self) -> LoadSnapshot:
        """Load to report; counters are those not yet passed to mark_reported."""
        return LoadSnapshot(
            deployment=self._deployment,
            queue_depth=len(self._queue),
            in_flight=self._in_flight,
            wakeups=self._wakeups_total - self._wakeups_reported,
            scale_out_requests=self._scale_outs_total - self._scale_outs_reported,
        )

    def mark_reported(self, snapshot: LoadSnapshot) -> None:
        """The control plane accepted `snapshot`: do not report its counters again."""
        self._wakeups_reported += snapshot.wakeups
        self._scale_outs_reported += snapshot.scale_out_requests

    # ----- changes from the route table

    def set_endpoints(self, endpoints: Iterable[EndpointInfo]) -> None:
        """Replace the deployment's endpoints (a duplicate id: the last entry wins)."""
        now = self._clock.now()
        wanted = {info.instance_id: info for info in endpoints}
        for instance_id in [i for i in self._endpoints if i not in wanted]:
            gone = self._endpoints.pop(instance_id)
            gone.present = False
            gone.idle_since = None
        for instance_id, info in wanted.items():
            endpoint = self._endpoints.get(instance_id)
            if endpoint is None:
                self._endpoints[instance_id] = _Endpoint(instance_id, info.draining, now)
                continue
            if info.draining and not endpoint.draining:
                endpoint.idle_since = None
            elif endpoint.draining and not info.draining:
                endpoint.idle_since = now if endpoint.in_flight == 0 else None
            endpoint.draining = info.draining
        self._views_cache = None
        self._fail_lost_targets()
        self._dispatch()

    def update_config(self, config: AdmissionConfig) -> None:
        """Apply new settings. Calls already queued keep their wait and their place even if
        the queue is now over max_queue_size; only new calls see the new bound."""
        old = self._config
        self._config = config
        if (old.rate_limit_per_second, old.rate_limit_burst) != (
            config.rate_limit_per_second,
            config.rate_limit_burst,
        ):
            self._bucket = None
        self._views_cache = None
        self._dispatch()

    def close(self, message: str | None = None) -> None:
        """The deployment is gone or cannot start: fail queued calls and refuse new ones
        with ROUTE_TARGET_NOT_FOUND (UNAVAILABLE). Leases held stay valid."""
        self._closed_message = message or (
            f"deployment {self._deployment!r} is not available on this gateway; "
            "check that it exists with `gpufleet get`"
        )
        for waiter in list(self._queue.values()):
            self._drop(waiter)
            if not waiter.future.done():
                waiter.future.set_exception(self._closed_error())

    # ----- calls

    async def acquire(
        self,
        *,
        connection_id: str = "",
        rule: RouteRule = DEFAULT_RULE,
        hash_value: str | bytes | None = None,
        timeout: float | None = None,
    ) -> Lease:
        """Wait for a slot for one call and return its lease.

        `connection_id` identifies the client connection (for max_streams_per_connection).
        `hash_value` is the value of the metadata key a HASH rule names (None if the call
        lacks it). `timeout` is the time left before the call's deadline in seconds, None
        without a deadline.

        Raises GatewayError: RATE_LIMITED, REPLICA_QUOTA_EXCEEDED, ROUTE_TARGET_NOT_FOUND,
        QUEUE_FULL or QUEUE_TIMEOUT. Cancelling the awaiting task removes the call from the
        queue at once and never leaks a slot.
        """
        admitted = self._admit(connection_id, rule, hash_value, timeout)
        if isinstance(admitted, Lease):
            return admitted
        try:
            return await admitted.future
        except asyncio.CancelledError:
            self._abandon(admitted)
            raise

    def _admit(
        self,
        connection_id: str,
        rule: RouteRule,
        hash_value: str | bytes | None,
        timeout: float | None,
    ) -> Lease | _Waiter:
        """Everything up to the wait, synchronously: refuse, grant at once, or enqueue."""
        if self._closed_message is not None:
            raise self._closed_error()
        now = self._clock.now()
        self._check_rate(now)
        if rule.kind is RuleKind.INSTANCE:
            target = self._endpoints.get(rule.instance_id)
            if target is None or target.draining:
                raise self._target_not_found(rule.instance_id)
        excluded = self._record_demand(rule)
        if not self._connection_full(connection_id):
            decision = self._route(rule, hash_value, excluded)
            if isinstance(decision, Chosen):
                self._cursor = decision.cursor
                return self._grant(decision.instance_id, connection_id, now)
            if isinstance(decision, TargetNotFound):
                raise self._target_not_found(decision.instance_id)
        return self._enqueue(connection_id, rule, hash_value, excluded, timeout, now)

    def _record_demand(self, rule: RouteRule) -> frozenset[str]:
        """Count wakeups and scale-out requests (refusing those over the quota); returns the
        instances a scale-out call must not use."""
        ready = sum(1 for e in self._endpoints.values() if not e.draining)
        demand = False
        if ready == 0:
            self._wakeups_total += 1
            demand = True
        excluded: frozenset[str] = frozenset()
        if rule.kind is RuleKind.SCALE_OUT:
            if ready + self._pending_scale_outs >= self._config.max_instances:
                raise GatewayError(
                    Reason.REPLICA_QUOTA_EXCEEDED,
                    Code.RESOURCE_EXHAUSTED,
                    f"scale-out refused: deployment {self._deployment!r} has {ready} "
                    f"instance(s) and {self._pending_scale_outs} scale-out call(s) waiting, "
                    f"max_instances is {self._config.max_instances}; raise max_instances or "
                    "send the call without the scale-out rule",
                    metadata=self._metadata(),
                )
            self._scale_outs_total += 1
            demand = True
            excluded = frozenset(self._endpoints)
        if demand and self._on_demand is not None:
            self._on_demand()
        return excluded

    def _enqueue(
        self,
        connection_id: str,
        rule: RouteRule,
        hash_value: str | bytes | None,
        excluded: frozenset[str],
        timeout: float | None,
        now: float,
    ) -> _Waiter:
        if len(self._queue) >= self._config.max_queue_size:
            self._purge_done()
        if len(self._queue) >= self._config.max_queue_size:
            raise GatewayError(
                Reason.QUEUE_FULL,
                Code.RESOURCE_EXHAUSTED,
                f"queue of deployment {self._deployment!r} is full "
                f"({len(self._queue)} of max_queue_size {self._config.max_queue_size}); "
                "retry after the pushback or raise max_queue_size/max_instances",
                retry_pushback_ms=queue_full_pushback_ms(
                    len(self._queue), self._capacity(), self._mean_hold_s
                ),
                metadata=self._metadata(),
            )
        wait_s = self._config.queue_timeout_s
        limited_by_deadline = False
        if timeout is not None and timeout < wait_s:
            wait_s = timeout
            limited_by_deadline = True
        if wait_s <= 0:
            raise self._queue_timeout(max(wait_s, 0.0), limited_by_deadline)

        future: asyncio.Future[Lease] = asyncio.get_running_loop().create_future()
        waiter = _Waiter(
            next(self._seq), future, connection_id, rule, hash_value, excluded,
            wait_s, limited_by_deadline,
        )
        self._queue[waiter.seq] = waiter
        if rule.kind is RuleKind.SCALE_OUT:
            self._pending_scale_outs += 1
        waiter.timer = self._clock.call_at(now + wait_s, lambda: self._expire(waiter))
        return waiter

    def _check_rate(self, now: float) -> None:
        if self._config.rate_limit_per_second == 0:
            return
        if self._bucket is None:
            self._bucket = TokenBucket(
                self._config.rate_limit_per_second, self._config.rate_limit_burst, now=now
            )
        decision = self._bucket.try_acquire(now)
        if not decision.allowed:
            raise GatewayError(
                Reason.RATE_LIMITED,
                Code.RESOURCE_EXHAUSTED,
                f"deployment {self._deployment!r} is rate limited to "
                f"{self._config.rate_limit_per_second:g} calls/s; retry after "
                f"{decision.retry_after_ms} ms",
                retry_pushback_ms=decision.retry_after_ms,
                metadata=self._metadata(),
            )

    # ----- accounting

    def _views(self) -> tuple[EndpointView, ...]:
        if self._views_cache is None:
            limit = self._config.max_request_concurrency
            self._views_cache = tuple(
                EndpointView(
                    instance_id=e.instance_id,
                    in_flight=e.in_flight,
                    free_slots=max(0, limit - e.in_flight),
                    draining=e.draining,
                )
                for e in sorted(self._endpoints.values(), key=lambda e: e.instance_id)
            )
        return self._views_cache

    def _capacity(self) -> int:
        ready = sum(1 for e in self._endpoints.values() if not e.draining)
        return ready * self._config.max_request_concurrency

    def _free_slots(self) -> int:
        return sum(v.free_slots for v in self._views() if not v.draining)

    def _connection_full(self, connection_id: str) -> bool:
        limit = self._config.max_streams_per_connection
        return limit > 0 and self._connections.get(connection_id, 0) >= limit

    def _route(
        self, rule: RouteRule, hash_value: str | bytes | None, excluded: frozenset[str]
    ) -> RouteDecision:
        views = self._views()
        if excluded:
            views = tuple(v for v in views if v.instance_id not in excluded)
        return choose_endpoint(
            views, rule, cursor=self._cursor, rng=self._rng, hash_value=hash_value
        )

    def _grant(self, instance_id: str, connection_id: str, now: float) -> Lease:
        endpoint = self._endpoints[instance_id]
        endpoint.in_flight += 1
        endpoint.idle_since = None
        self._connections[connection_id] = self._connections.get(connection_id, 0) + 1
        self._in_flight += 1
        self._views_cache = None
        return Lease(self, endpoint, connection_id, now)

    def _release(self, endpoint: _Endpoint, connection_id: str, granted_at: float) -> None:
        now = self._clock.now()
        self._in_flight -= 1
        remaining = self._connections.get(connection_id, 0) - 1
        if remaining > 0:
            self._connections[connection_id] = remaining
        else:
            self._connections.pop(connection_id, None)
        endpoint.in_flight -= 1
        if endpoint.present:
            self._views_cache = None
            if endpoint.in_flight == 0 and not endpoint.draining:
                endpoint.idle_since = now
        held = max(0.0, now - granted_at)
        self._mean_hold_s = (
            held
            if self._mean_hold_s is None
            else self._mean_hold_s + _HOLD_EWMA_WEIGHT * (held - self._mean_hold_s)
        )
        self._dispatch()

    # ----- the queue

    def _dispatch(self) -> None:
        """Start every queued call that can run now, oldest first."""
        if not self._queue:
            return
        free = self._free_slots()
        now = self._clock.now()
        # Outcomes are applied after the walk: the queue cannot change while it is iterated,
        # and copying it up front would cost O(queue) on every release.
        leaving: list[tuple[_Waiter, Lease | GatewayError | None]] = []
        for waiter in self._queue.values():
            if free <= 0:
                break
            if waiter.future.done():
                # Cancelled; its task has not run its cleanup yet.
                leaving.append((waiter, None))
                continue
            if self._connection_full(waiter.connection_id):
                continue
            decision = self._route(waiter.rule, waiter.hash_value, waiter.excluded)
            if isinstance(decision, Chosen):
                self._cursor = decision.cursor
                lease = self._grant(decision.instance_id, waiter.connection_id, now)
                leaving.append((waiter, lease))
                free -= 1
            elif isinstance(decision, TargetNotFound):
                leaving.append((waiter, self._target_not_found(decision.instance_id)))
        for waiter, outcome in leaving:
            self._drop(waiter)
            if isinstance(outcome, Lease):
                waiter.future.set_result(outcome)
            elif outcome is not None:
                waiter.future.set_exception(outcome)

    def _fail_lost_targets(self) -> None:
        for waiter in list(self._queue.values()):
            if waiter.rule.kind is not RuleKind.INSTANCE:
                continue
            target = self._endpoints.get(waiter.rule.instance_id)
            if target is not None and not target.draining:
                continue
            self._drop(waiter)
            if not waiter.future.done():
                waiter.future.set_exception(self._target_not_found(waiter.rule.instance_id))

    def _drop(self, waiter: _Waiter) -> None:
        if self._queue.pop(waiter.seq, None) is None:
            return
        if waiter.timer is not None:
            waiter.timer.cancel()
        if waiter.rule.kind is RuleKind.SCALE_OUT:
            self._pending_scale_outs -= 1

    def _purge_done(self) -> None:
        for waiter in [w for w in self._queue.values() if w.future.done()]:
            self._drop(waiter)

    def _expire(self, waiter: _Waiter) -> None:
        if waiter.seq not in self._queue:
            return
        self._drop(waiter)
        if not waiter.future.done():
            waiter.future.set_exception(
                self._queue_timeout(waiter.wait_s, waiter.limited_by_deadline)
            )

    def _abandon(self, waiter: _Waiter) -> None:
        """The waiting task was cancelled: leave the queue, or hand back a granted slot."""
        if waiter.seq in self._queue:
            self._drop(waiter)
            return
        future = waiter.future
        if future.done() and not future.cancelled() and future.exception() is None:
            future.result().release()

    # ----- errors

    def _metadata(self) -> dict[str, str]:
        return {"deployment": self._deployment}

    def _target_not_found(self, instance_id: str) -> GatewayError:
        return GatewayError(
            Reason.ROUTE_TARGET_NOT_FOUND,
            Code.NOT_FOUND,
            f"instance {instance_id!r} of deployment {self._deployment!r} is not serving "
            "(unknown, stopped or draining); list instances with `gpufleet get` or drop "
            "the deploy-route-rule",
            metadata={**self._metadata(), "instance": instance_id},
        )

    def _queue_timeout(self, waited_s: float, limited_by_deadline: bool) -> GatewayError:
        if limited_by_deadline:
            why = (
                f"the call's deadline left {waited_s:g}s to wait, less than queue_timeout "
                f"{self._config.queue_timeout_s:g}s; give the call a longer deadline"
            )
        else:
            why = (
                f"queue_timeout is {waited_s:g}s; raise queue_timeout or max_instances, "
                "or retry later"
            )
        return GatewayError(
            Reason.QUEUE_TIMEOUT,
            Code.DEADLINE_EXCEEDED,
            f"no instance of deployment {self._deployment!r} took the call in time: {why}",
            metadata=self._metadata(),
        )

    def _closed_error(self) -> GatewayError:
        return GatewayError(
            Reason.ROUTE_TARGET_NOT_FOUND,
            Code.UNAVAILABLE,
            self._closed_message or f"deployment {self._deployment!r} is not available",
            metadata=self._metadata(),
        )
