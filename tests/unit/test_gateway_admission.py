from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Sequence
from typing import Any

import pytest

from gpufleet.gateway.admission import (
    MAX_PUSHBACK_MS,
    MIN_PUSHBACK_MS,
    DeploymentAdmission,
    EndpointInfo,
    Lease,
    LoadSnapshot,
    queue_full_pushback_ms,
)
from gpufleet.gateway.clock import ManualClock
from gpufleet.gateway.config import AdmissionConfig
from gpufleet.gateway.errors import Code, GatewayError, Reason
from gpufleet.gateway.route_rules import RouteRule, RuleKind, parse_route_rule

pytestmark = pytest.mark.timeout(20)

SCALE_OUT = RouteRule(RuleKind.SCALE_OUT)
HASH = RouteRule(RuleKind.HASH, hash_key="session")


class Harness:
    def __init__(self, endpoints: Sequence[str] = ("a",), **config: Any) -> None:
        self.clock = ManualClock()
        self.demands = 0
        self.adm = DeploymentAdmission(
            "echo",
            AdmissionConfig(**config),
            clock=self.clock,
            rng=random.Random(0),
            on_demand=self._on_demand,
        )
        self.set(*endpoints)

    def _on_demand(self) -> None:
        self.demands += 1

    def set(self, *ids: str, draining: Sequence[str] = ()) -> None:
        self.adm.set_endpoints(EndpointInfo(i, draining=i in draining) for i in ids)

    def start(self, **kwargs: Any) -> asyncio.Future[Lease]:
        return asyncio.ensure_future(self.adm.acquire(**kwargs))

    def in_flight_by_instance(self) -> dict[str, int]:
        return {v.instance_id: v.in_flight for v in self.adm.endpoint_views()}


async def settle() -> None:
    # Lets woken tasks run; no wall-clock time passes.
    for _ in range(5):
        await asyncio.sleep(0)


async def error_of(task: Awaitable[Lease]) -> GatewayError:
    with pytest.raises(GatewayError) as caught:
        await task
    return caught.value


async def test_grants_at_once_and_release_is_exactly_once() -> None:
    h = Harness(max_request_concurrency=2)
    lease = await h.adm.acquire(connection_id="c1")
    assert lease.instance_id == "a" and lease.connection_id == "c1"
    assert (h.adm.in_flight, h.adm.connection_in_flight("c1")) == (1, 1)
    lease.release()
    lease.release()
    assert lease.released
    assert (h.adm.in_flight, h.adm.connection_in_flight("c1")) == (0, 0)
    assert h.in_flight_by_instance() == {"a": 0}
    with await h.adm.acquire() as held:
        assert h.adm.in_flight == 1
    assert held.released and h.adm.in_flight == 0
    assert "released" in repr(held)


async def test_concurrency_limit_holds_and_the_third_call_waits() -> None:
    h = Harness(max_request_concurrency=2)
    first = await h.adm.acquire()
    second = await h.adm.acquire()
    third = h.start()
    await settle()
    assert not third.done() and h.adm.queue_depth == 1
    assert h.in_flight_by_instance() == {"a": 2}
    first.release()
    lease = await third
    assert lease.instance_id == "a" and h.adm.queue_depth == 0
    assert h.in_flight_by_instance() == {"a": 2}
    second.release()
    lease.release()
    assert h.adm.in_flight == 0


async def test_queue_is_fifo() -> None:
    h = Harness(max_request_concurrency=1)
    holder = await h.adm.acquire()
    waiters = [h.start(connection_id=f"c{n}") for n in range(5)]
    await settle()
    order = []
    current = holder
    for _ in range(5):
        current.release()
        await settle()
        done = [n for n, w in enumerate(waiters) if w.done() and n not in order]
        assert len(done) == 1
        order.append(done[0])
        current = waiters[done[0]].result()
    assert order == [0, 1, 2, 3, 4]
    current.release()


async def test_freed_slot_goes_to_the_head_whichever_instance_frees() -> None:
    h = Harness(endpoints=("a", "b"), max_request_concurrency=1)
    on_a = await h.adm.acquire()
    on_b = await h.adm.acquire()
    assert {on_a.instance_id, on_b.instance_id} == {"a", "b"}
    w1, w2 = h.start(), h.start()
    await settle()
    on_b.release()
    await settle()
    assert w1.done() and not w2.done()
    assert w1.result().instance_id == on_b.instance_id
    on_a.release()
    assert (await w2).instance_id == on_a.instance_id


async def test_queue_full_with_pushback() -> None:
    h = Harness(max_request_concurrency=1, max_queue_size=2)
    await h.adm.acquire()
    queued = [h.start(), h.start()]
    await settle()
    error = await error_of(h.start())
    assert (error.reason, error.code) == (Reason.QUEUE_FULL, Code.RESOURCE_EXHAUSTED)
    assert error.retry_pushback_ms is not None
    assert MIN_PUSHBACK_MS <= error.retry_pushback_ms <= MAX_PUSHBACK_MS
    assert "max_queue_size 2" in error.message
    assert error.metadata == {"deployment": "echo"}
    assert h.adm.queue_depth == 2
    for task in queued:
        task.cancel()
    await settle()


async def test_zero_queue_fails_at_once_when_no_slot() -> None:
    h = Harness(max_request_concurrency=1, max_queue_size=0)
    lease = await h.adm.acquire()
    error = await error_of(h.start())
    assert error.reason is Reason.QUEUE_FULL
    lease.release()
    assert (await h.adm.acquire()).instance_id == "a"


async def test_queue_timeout() -> None:
    h = Harness(max_request_concurrency=1, queue_timeout_s=5)
    await h.adm.acquire()
    waiter = h.start()
    await settle()
    h.clock.advance(4.999)
    await settle()
    assert not waiter.done()
    h.clock.advance(0.001)
    error = await error_of(waiter)
    assert (error.reason, error.code) == (Reason.QUEUE_TIMEOUT, Code.DEADLINE_EXCEEDED)
    assert "queue_timeout is 5s" in error.message
    assert h.adm.queue_depth == 0 and h.clock.pending_timers == 0


async def test_deadline_shorter_than_queue_timeout_wins() -> None:
    h = Harness(max_request_concurrency=1, queue_timeout_s=60)
    await h.adm.acquire()
    waiter = h.start(timeout=2.0)
    await settle()
    h.clock.advance(1.9)
    await settle()
    assert not waiter.done()
    h.clock.advance(0.1)
    error = await error_of(waiter)
    assert error.reason is Reason.QUEUE_TIMEOUT
    assert "deadline" in error.message
    assert h.adm.queue_depth == 0


async def test_expired_deadline_fails_without_queueing_but_a_free_slot_still_serves() -> None:
    h = Harness(max_request_concurrency=1)
    lease = await h.adm.acquire(timeout=0)
    error = await error_of(h.start(timeout=0))
    assert error.reason is Reason.QUEUE_TIMEOUT
    error = await error_of(h.start(timeout=-3))
    assert error.reason is Reason.QUEUE_TIMEOUT
    assert h.adm.queue_depth == 0
    lease.release()


async def test_zero_queue_timeout_means_no_waiting() -> None:
    h = Harness(max_request_concurrency=1, queue_timeout_s=0)
    await h.adm.acquire()
    error = await error_of(h.start())
    assert error.reason is Reason.QUEUE_TIMEOUT and h.adm.queue_depth == 0


async def test_cancelled_waiter_leaves_the_queue_at_once() -> None:
    h = Harness(max_request_concurrency=1, max_queue_size=1)
    holder = await h.adm.acquire()
    waiter = h.start()
    await settle()
    assert h.adm.queue_depth == 1
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert h.adm.queue_depth == 0 and h.clock.pending_timers == 0
    # Its place is free for another call, and the slot was never touched.
    again = h.start()
    await settle()
    assert h.adm.queue_depth == 1
    holder.release()
    assert (await again).instance_id == "a"


async def test_cancelled_waiter_frees_its_queue_place_before_its_task_runs() -> None:
    h = Harness(max_request_concurrency=1, max_queue_size=1)
    holder = await h.adm.acquire()
    first = h.start()
    await settle()
    second = h.start()  # scheduled to run before first's cancellation is processed
    first.cancel()
    await settle()
    assert not second.done() and h.adm.queue_depth == 1
    holder.release()
    assert (await second).instance_id == "a"
    assert first.cancelled()


async def test_cancelled_waiter_is_skipped_before_its_task_runs() -> None:
    h = Harness(max_request_concurrency=1)
    holder = await h.adm.acquire()
    first, second = h.start(), h.start()
    await settle()
    first.cancel()
    # No yield: first's task has not run its cleanup when the slot frees.
    holder.release()
    lease = await second
    assert lease.instance_id == "a"
    with pytest.raises(asyncio.CancelledError):
        await first
    assert h.adm.in_flight == 1 and h.adm.queue_depth == 0


async def test_slot_handed_to_a_waiter_as_it_is_cancelled_is_given_back() -> None:
    h = Harness(max_request_concurrency=1)
    holder = await h.adm.acquire()
    unlucky, next_in_line = h.start(), h.start()
    await settle()
    holder.release()  # hands the slot to `unlucky`...
    unlucky.cancel()  # ...which is cancelled before it resumes.
    with pytest.raises(asyncio.CancelledError):
        await unlucky
    lease = await next_in_line
    assert h.adm.in_flight == 1 and h.in_flight_by_instance() == {"a": 1}
    lease.release()
    assert h.adm.in_flight == 0


async def test_timed_out_waiter_cancelled_before_it_resumes_leaks_nothing() -> None:
    h = Harness(max_request_concurrency=1, queue_timeout_s=1)
    holder = await h.adm.acquire()
    waiter = h.start()
    await settle()
    h.clock.advance(1)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    holder.release()
    assert h.adm.in_flight == 0 and h.adm.queue_depth == 0


async def test_no_slot_leak_after_many_cancellations() -> None:
    h = Harness(endpoints=("a", "b"), max_request_concurrency=2, max_queue_size=1000)
    holders = [await h.adm.acquire() for _ in range(4)]
    for round_ in range(50):
        tasks = [h.start(connection_id=f"c{n % 3}") for n in range(10)]
        await settle()
        holders[round_ % 4].release()
        for task in tasks:
            task.cancel()
        for task in tasks:
            try:
                holders[round_ % 4] = await task
            except asyncio.CancelledError:
                pass
        if holders[round_ % 4].released:
            holders[round_ % 4] = await h.adm.acquire()
        assert h.adm.queue_depth == 0
        assert h.adm.in_flight == 4
        assert h.in_flight_by_instance() == {"a": 2, "b": 2}
    for lease in holders:
        lease.release()
    assert h.adm.in_flight == 0 and h.in_flight_by_instance() == {"a": 0, "b": 0}
    assert h.clock.pending_timers == 0


async def test_per_connection_limit() -> None:
    h = Harness(endpoints=("a", "b"), max_request_concurrency=1, max_streams_per_connection=1)
    first = await h.adm.acquire(connection_id="c1")
    blocked = h.start(connection_id="c1")
    await settle()
    # A free slot exists (on b), but c1 is at its limit: it waits.
    assert not blocked.done() and h.adm.queue_depth == 1
    # The blocked head does not hold up another connection.
    other = await h.adm.acquire(connection_id="c2")
    assert {first.instance_id, other.instance_id} == {"a", "b"}
    assert h.adm.connection_in_flight("c1") == 1
    other.release()
    await settle()
    assert not blocked.done()
    first.release()
    second = await blocked
    assert h.adm.connection_in_flight("c1") == 1
    second.release()
    assert h.adm.connection_in_flight("c1") == 0


async def test_sticky_waiter_waits_for_its_instance_and_others_pass_it() -> None:
    h = Harness(endpoints=("a", "b"), max_request_concurrency=1)
    owner = (await h.adm.acquire(rule=HASH, hash_value="user-1")).instance_id
    other = "b" if owner == "a" else "a"
    sticky = h.start(rule=HASH, hash_value="user-1")
    plain = h.start()
    await settle()
    # The sticky call waits although `other` is free; the plain call behind it takes `other`.
    assert not sticky.done()
    assert (await plain).instance_id == other
    assert h.adm.queue_depth == 1
    sticky.cancel()
    await settle()


async def test_sticky_waiter_gets_its_instance_when_it_frees() -> None:
    h = Harness(endpoints=("a", "b"), max_request_concurrency=1)
    first = await h.adm.acquire(rule=HASH, hash_value="user-1")
    owner = first.instance_id
    sticky = h.start(rule=HASH, hash_value="user-1")
    plain_waiter_holder = await h.adm.acquire()
    assert plain_waiter_holder.instance_id != owner
    behind = h.start()
    await settle()
    plain_waiter_holder.release()  # frees the non-owner: the plain call behind gets it
    assert (await behind).instance_id != owner
    assert not sticky.done()
    first.release()
    assert (await sticky).instance_id == owner


async def test_targeted_instance() -> None:
    h = Harness(endpoints=("a", "b"), max_request_concurrency=1)
    on_b = await h.adm.acquire(rule=parse_route_rule("b"))
    assert on_b.instance_id == "b"
    waiting = h.start(rule=parse_route_rule("b"))
    await settle()
    assert not waiting.done()
    on_b.release()
    assert (await waiting).instance_id == "b"
    error = await error_of(h.start(rule=parse_route_rule("nope-1")))
    assert (error.reason, error.code) == (Reason.ROUTE_TARGET_NOT_FOUND, Code.NOT_FOUND)
    assert error.metadata == {"deployment": "echo", "instance": "nope-1"}
    assert "nope-1" in error.message


async def test_targeted_waiter_fails_when_its_instance_goes_away_or_drains() -> None:
    h = Harness(endpoints=("a", "b"), max_request_concurrency=1)
    await h.adm.acquire(rule=parse_route_rule("a"))
    await h.adm.acquire(rule=parse_route_rule("b"))
    for_a = h.start(rule=parse_route_rule("a"))
    for_b = h.start(rule=parse_route_rule("b"))
    await settle()
    h.set("b", "c", draining=("b",))
    for task in (for_a, for_b):
        error = await error_of(task)
        assert error.reason is Reason.ROUTE_TARGET_NOT_FOUND
    assert h.adm.queue_depth == 0
    error = await error_of(h.start(rule=parse_route_rule("b")))
    assert error.reason is Reason.ROUTE_TARGET_NOT_FOUND


async def test_targeted_waiter_fails_when_its_instance_goes_away_while_all_are_busy() -> None:
    h = Harness(endpoints=("a", "b"), max_request_concurrency=1)
    await h.adm.acquire(rule=parse_route_rule("a"))
    await h.adm.acquire(rule=parse_route_rule("b"))
    for_a = h.start(rule=parse_route_rule("a"))
    plain = h.start()
    await settle()
    h.set("b")
    assert (await error_of(for_a)).reason is Reason.ROUTE_TARGET_NOT_FOUND
    assert not plain.done() and h.adm.queue_depth == 1
    plain.cancel()
    await settle()


async def test_scale_from_zero_queues_until_an_instance_appears() -> None:
    h = Harness(endpoints=())
    waiter = h.start(connection_id="c1")
    await settle()
    assert h.demands == 1 and h.adm.queue_depth == 1
    assert h.adm.load() == LoadSnapshot(
        "echo", queue_depth=1, in_flight=0, wakeups=1, scale_out_requests=0
    )
    h.clock.advance(30)
    h.set("echo-1")
    lease = await waiter
    assert lease.instance_id == "echo-1"
    assert h.adm.load().in_flight == 1


async def test_draining_instance_finishes_calls_and_takes_no_new_ones() -> None:
    h = Harness(endpoints=("a",), max_request_concurrency=2)
    lease = await h.adm.acquire()
    h.set("a", draining=("a",))
    waiter = h.start()
    await settle()
    assert not waiter.done() and h.demands == 1  # no ready instance: a wakeup
    lease.release()
    await settle()
    assert not waiter.done()
    assert h.in_flight_by_instance() == {"a": 0}
    h.set("a", "b", draining=("a",))
    assert (await waiter).instance_id == "b"


async def test_removed_instance_leases_detach_without_breaking_accounting() -> None:
    h = Harness(endpoints=("a",), max_request_concurrency=1)
    old = await h.adm.acquire(connection_id="c1")
    h.set()
    assert old.detached and h.adm.in_flight == 1
    # The same id comes back (route table flap): it starts with all its slots free.
    h.set("a")
    fresh = await h.adm.acquire(connection_id="c2")
    assert fresh.instance_id == "a" and not fresh.detached
    queued = h.start()
    await settle()
    old.release()  # must not free `fresh`'s slot
    await settle()
    assert not queued.done()
    assert h.in_flight_by_instance() == {"a": 1}
    assert h.adm.in_flight == 1 and h.adm.connection_in_flight("c1") == 0
    fresh.release()
    (await queued).release()
    assert h.adm.in_flight == 0


async def test_added_instances_start_queued_calls() -> None:
    h = Harness(endpoints=("a",), max_request_concurrency=1)
    await h.adm.acquire()
    waiters = [h.start() for _ in range(3)]
    await settle()
    h.set("a", "b", "c")
    granted = [await w for w in waiters[:2]]
    assert sorted(lease.instance_id for lease in granted) == ["b", "c"]
    assert not waiters[2].done()
    waiters[2].cancel()
    await settle()


async def test_scale_out() -> None:
    h = Harness(endpoints=("a",), max_request_concurrency=4, max_instances=2)
    # The existing instance has room, but a scale-out call waits for a new one.
    waiter = h.start(rule=SCALE_OUT)
    await settle()
    assert not waiter.done() and h.demands == 1
    # The scale-out already waiting uses the last instance of the quota.
    error = await error_of(h.start(rule=SCALE_OUT))
    assert (error.reason, error.code) == (Reason.REPLICA_QUOTA_EXCEEDED, Code.RESOURCE_EXHAUSTED)
    assert "max_instances is 2" in error.message
    assert h.adm.load().scale_out_requests == 1
    h.set("a", "b")
    assert (await waiter).instance_id == "b"
    error = await error_of(h.start(rule=SCALE_OUT))
    assert error.reason is Reason.REPLICA_QUOTA_EXCEEDED


async def test_scale_out_beyond_max_instances_fails_at_once() -> None:
    h = Harness(endpoints=("a",), max_instances=1)
    error = await error_of(h.start(rule=SCALE_OUT))
    assert error.reason is Reason.REPLICA_QUOTA_EXCEEDED
    assert h.adm.load().scale_out_requests == 0


async def test_timed_out_scale_out_returns_its_quota() -> None:
    h = Harness(endpoints=("a",), max_instances=2, queue_timeout_s=1)
    waiter = h.start(rule=SCALE_OUT)
    await settle()
    h.clock.advance(1)
    assert (await error_of(waiter)).reason is Reason.QUEUE_TIMEOUT
    again = h.start(rule=SCALE_OUT)
    await settle()
    assert not again.done()
    again.cancel()
    await settle()


async def test_rate_limit() -> None:
    h = Harness(max_request_concurrency=10, rate_limit_per_second=2, rate_limit_burst=1)
    (await h.adm.acquire()).release()
    error = await error_of(h.start())
    assert (error.reason, error.code) == (Reason.RATE_LIMITED, Code.RESOURCE_EXHAUSTED)
    assert error.retry_pushback_ms == 500
    h.clock.advance(0.5)
    (await h.adm.acquire()).release()
    # A new rate takes effect with a fresh bucket.
    h.adm.update_config(AdmissionConfig(max_request_concurrency=10))
    for _ in range(20):
        (await h.adm.acquire()).release()


async def test_load_counters_are_reported_once() -> None:
    h = Harness(endpoints=())
    tasks = [h.start() for _ in range(3)]
    await settle()
    snapshot = h.adm.load()
    assert (snapshot.queue_depth, snapshot.wakeups) == (3, 3)
    extra = h.start()
    await settle()
    h.adm.mark_reported(snapshot)
    assert h.adm.load() == LoadSnapshot(
        "echo", queue_depth=4, in_flight=0, wakeups=1, scale_out_requests=0
    )
    for task in [*tasks, extra]:
        task.cancel()
    await settle()
    assert h.adm.load().queue_depth == 0


async def test_close_fails_waiters_and_refuses_new_calls() -> None:
    h = Harness(max_request_concurrency=1)
    lease = await h.adm.acquire()
    waiter = h.start()
    await settle()
    h.adm.close()
    error = await error_of(waiter)
    assert (error.reason, error.code) == (Reason.ROUTE_TARGET_NOT_FOUND, Code.UNAVAILABLE)
    error = await error_of(h.start())
    assert error.code is Code.UNAVAILABLE and h.adm.closed
    lease.release()
    assert h.adm.in_flight == 0 and h.clock.pending_timers == 0


async def test_idle_clock_runs_only_while_ready_and_idle() -> None:
    h = Harness(endpoints=("a", "b"), max_request_concurrency=1)
    h.clock.advance(10)
    assert h.adm.idle_seconds() == {"a": 10.0, "b": 10.0}
    lease = await h.adm.acquire(rule=parse_route_rule("a"))
    h.clock.advance(5)
    assert h.adm.idle_seconds() == {"a": 0.0, "b": 15.0}
    lease.release()
    h.clock.advance(2)
    h.set("a", "b", draining=("b",))
    assert h.adm.idle_seconds() == {"a": 2.0}
    h.clock.advance(3)
    h.set("a", "b")
    assert h.adm.idle_seconds() == {"a": 5.0, "b": 0.0}


async def test_raising_concurrency_starts_queued_calls() -> None:
    h = Harness(max_request_concurrency=1)
    await h.adm.acquire()
    waiter = h.start()
    await settle()
    h.adm.update_config(AdmissionConfig(max_request_concurrency=2))
    assert (await waiter).instance_id == "a"


async def test_default_rule_rotates_between_idle_instances() -> None:
    h = Harness(endpoints=("a", "b", "c"), max_request_concurrency=5)
    picks = []
    for _ in range(6):
        lease = await h.adm.acquire()
        picks.append(lease.instance_id)
        lease.release()
    assert picks == ["a", "b", "c", "a", "b", "c"]


async def test_real_loop_clock_times_out() -> None:
    adm = DeploymentAdmission("echo", AdmissionConfig(queue_timeout_s=0.01))
    adm.set_endpoints([])
    with pytest.raises(GatewayError) as caught:
        await asyncio.wait_for(adm.acquire(), timeout=10)
    assert caught.value.reason is Reason.QUEUE_TIMEOUT


@pytest.mark.parametrize(
    ("depth", "slots", "hold", "expected"),
    [
        (0, 1, None, 1000),
        (9, 2, 0.5, 2500),
        (0, 10, 0.001, MIN_PUSHBACK_MS),
        (10_000, 1, 60.0, MAX_PUSHBACK_MS),
        (3, 0, 1.0, 4000),
    ],
)
def test_queue_full_pushback(depth, slots, hold, expected):
    assert queue_full_pushback_ms(depth, slots, hold) == expected


@pytest.mark.parametrize("seed", range(6))
async def test_limits_hold_under_random_interleavings(seed):
    rng = random.Random(seed)
    limit, per_conn = 2, 3
    h = Harness(
        endpoints=("a", "b"),
        max_request_concurrency=limit,
        max_streams_per_connection=per_conn,
        max_queue_size=8,
        queue_timeout_s=5,
    )
    pool = ["a", "b", "c", "d"]
    tasks: list[asyncio.Future[Lease]] = []
    leases: list[Lease] = []
    outcomes = {"granted": 0, "refused": 0, "cancelled": 0}

    def check() -> None:
        views = h.adm.endpoint_views()
        assert all(v.in_flight <= limit for v in views)
        held = [lease for lease in leases if not lease.released]
        for conn in {lease.connection_id for lease in held}:
            mine = sum(1 for x in held if x.connection_id == conn)
            assert h.adm.connection_in_flight(conn) == mine
            assert h.adm.connection_in_flight(conn) <= per_conn
        assert h.adm.in_flight == len(held)
        attached = [lease for lease in held if not lease.detached]
        assert sum(v.in_flight for v in views) == len(attached)
        assert h.adm.queue_depth <= 8

    for _ in range(400):
        action = rng.random()
        if action < 0.35:
            rule = rng.choice(
                [None, RouteRule(RuleKind.ROUND_ROBIN), HASH, RouteRule(RuleKind.LEAST_REQUEST)]
            )
            kwargs: dict[str, Any] = {
                "connection_id": f"c{rng.randrange(3)}",
                "hash_value": str(rng.randrange(5)),
            }
            if rule is not None:
                kwargs["rule"] = rule
            if rng.random() < 0.2:
                kwargs["timeout"] = rng.choice([0.5, 2.0, 10.0])
            tasks.append(h.start(**kwargs))
        elif action < 0.6 and leases:
            rng.choice(leases).release()
        elif action < 0.7 and tasks:
            rng.choice(tasks).cancel()
        elif action < 0.8:
            h.clock.advance(rng.choice([0.1, 0.5, 1.0, 3.0]))
        elif action < 0.85:
            present = [i for i in pool if rng.random() < 0.7]
            draining = tuple(i for i in present if rng.random() < 0.2)
            h.set(*present, draining=draining)
        else:
            # Release and cancel in the same step, before any task runs.
            if leases:
                rng.choice(leases).release()
            if tasks:
                rng.choice(tasks).cancel()
        await settle()
        still = []
        for task in tasks:
            if not task.done():
                still.append(task)
            elif task.cancelled():
                outcomes["cancelled"] += 1
            elif task.exception() is not None:
                assert isinstance(task.exception(), GatewayError)
                outcomes["refused"] += 1
            else:
                leases.append(task.result())
                outcomes["granted"] += 1
        tasks = still
        check()

    for task in tasks:
        task.cancel()
    await settle()
    for task in tasks:
        if not task.cancelled() and task.exception() is None:
            leases.append(task.result())
    for lease in leases:
        lease.release()
    check()
    assert h.adm.in_flight == 0 and h.adm.queue_depth == 0
    assert all(v.in_flight == 0 for v in h.adm.endpoint_views())
    assert h.clock.pending_timers == 0
    assert min(outcomes.values()) > 0, outcomes
