"""The reconciler's thin async loop: read the store, decide (planner.plan_pass), commit.

A pass runs when the store changes (every committed event wakes it), when a heartbeat or a
gateway report asks for one (`wake`), and at least every `tick` seconds (node liveness is a
matter of time passing). Each pass reads everything afresh, so a failed pass (logged) is
simply retried by the next one. After a commit, the Connect streams of the nodes whose
desired set may have changed are woken.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from gpufleet.server.errors import Unavailable
from gpufleet.server.load_reports import LoadBoard
from gpufleet.server.node_hub import NodeHub
from gpufleet.server.nodes import NodeTracker
from gpufleet.server.placement_adapter import NodeResources
from gpufleet.server.reconciler.liveness import (
    LivenessSettings,
    LivenessVerdict,
    NodeSighting,
    NodeStateValue,
    assess,
)
from gpufleet.server.reconciler.planner import PassInput, PassResult, plan_pass
from gpufleet.server.reconciler.scaling import ScaleMemory
from gpufleet.server.store import (
    ClusterRecords,
    NodeRecord,
    ReconcileBatch,
    StatusWrite,
    Store,
    Subscription,
    SubscriptionLagged,
)
from gpufleet.v1 import deployment_pb2

_log = logging.getLogger(__name__)

DEFAULT_NODE_TTL_S = 15.0
DEFAULT_HEARTBEAT_INTERVAL_S = 2.0
DEFAULT_TICK_S = 0.5
DEFAULT_LOAD_STATUS_INTERVAL_S = 2.0
# Bursts of store events (a heartbeat updating several instances) make one pass, not many.
_COALESCE_S = 0.01


@dataclass(frozen=True)
class ReconcilerSettings:
    """Timing of the reconciler."""

    node_ttl: float = DEFAULT_NODE_TTL_S
    """Seconds without a heartbeat after which a node is lost and its instances replaced."""
    heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL_S
    """Seconds between an agent's heartbeats; three missed ones make a node SUSPECT."""
    tick: float = DEFAULT_TICK_S
    """Longest time between two passes."""
    load_status_interval: float = DEFAULT_LOAD_STATUS_INTERVAL_S
    """A status change of queue depth / in-flight alone is written at most this often per
    deployment, so busy gateways do not turn into a write per report."""


class Reconciler:
    """Keeps deployments at their desired instances; see the reconciler package."""

    def __init__(
        self,
        store: Store,
        tracker: NodeTracker,
        loads: LoadBoard,
        hub: NodeHub,
        settings: ReconcilerSettings,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        on_pass: Callable[[float, bool], None] | None = None,
    ) -> None:
        """`on_pass(seconds, failed)` runs after each background pass (the metrics)."""
        self._on_pass = on_pass
        self._store = store
        self._tracker = tracker
        self._loads = loads
        self._hub = hub
        self._settings = settings
        self._monotonic = monotonic
        self._wall = wall
        self._liveness = LivenessSettings.for_heartbeat(
            settings.node_ttl, settings.heartbeat_interval, monotonic()
        )
        self._started_wall = wall()
        self._memory: dict[str, ScaleMemory] = {}
        self._verdict = LivenessVerdict(states={}, newly_lost=(), returned=(), held_back=())
        self._status_written: dict[str, float] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    @property
    def node_states(self) -> Mapping[str, NodeStateValue]:
        """Node states of the latest pass."""
        return self._verdict.states

    def start(self) -> None:
        """Run passes in the background until `stop`."""
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        """Stop after the pass in progress (its commit, if started, completes)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def wake(self) -> None:
        """Run a pass soon."""
        self._wake.set()

    async def reconcile_once(self) -> PassResult:
        """Run one pass now and return what it decided (committed before returning)."""
        async with self._lock:
            return await self._pass()

    async def _pass(self) -> PassResult:
        records = await self._store.cluster_records()
        now = self._monotonic()
        now_wall = self._wall()
        verdict = assess(
            [
                NodeSighting(
                    node_id=n.node.id,
                    last_heartbeat=self._tracker.last_heartbeat(n.node.id),
                    persisted_state=n.node.state,
                )
                for n in records.nodes
            ],
            now,
            self._liveness,
        )
        self._log_verdict(verdict)
        result = plan_pass(
            PassInput(
                records=records,
                verdict=verdict,
                resources={n.node.id: self._resources(n) for n in records.nodes},
                reported=self._tracker.reported(),
                demand=self._loads.demand(now),
                memory=self._memory,
                node_ttl=self._settings.node_ttl,
                now=now_wall,
                started_wall=self._started_wall,
            ),
            _IdFactory(records),
        )
        batch = self._throttle(result.batch, records, now)
        if not batch.empty:
            await self._store.commit_reconcile(batch)
        self._verdict = verdict
        self._memory = result.memory
        self._loads.forget(batch.purge)
        self._hub.notify(result.touched_nodes)
        return PassResult(batch=batch, memory=result.memory, touched_nodes=result.touched_nodes)

    def _resources(self, record: NodeRecord) -> NodeResources:
        node = record.node
        live = self._tracker.get(node.id)
        if live is None:
            return NodeResources(
                node_id=node.id,
                labels=dict(node.labels),
                cpu_millis=node.cpu_millis,
                memory_mib=node.memory_mib,
                gpus=tuple(node.gpus),
            )
        return NodeResources(
            node_id=node.id,
            labels=dict(node.labels),
            cpu_millis=live.cpu_millis,
            memory_mib=live.memory_mib,
            gpus=live.gpus,
        )

    def _throttle(
        self, batch: ReconcileBatch, records: ClusterRecords, now: float
    ) -> ReconcileBatch:
        stored = {d.deployment.name: d.deployment for d in records.deployments}
        kept: list[StatusWrite] = []
        for write in batch.status:
            old = stored.get(write.name)
            last = self._status_written.get(write.name)
            if (
                old is not None
                and last is not None
                and now - last < self._settings.load_status_interval
                and old.observed_generation == write.observed_generation
                and _only_load_differs(old.status, write.status)
            ):
                continue
            self._status_written[write.name] = now
            kept.append(write)
        if len(kept) == len(batch.status):
            return batch
        return ReconcileBatch(
            node_states=batch.node_states,
            lost=batch.lost,
            drain=batch.drain,
            delete=batch.delete,
            create=batch.create,
            purge=batch.purge,
            status=tuple(kept),
        )

    def _log_verdict(self, verdict: LivenessVerdict) -> None:
        if verdict.held_back and verdict.held_back != self._verdict.held_back:
            _log.warning(
                "%d of %d nodes are silent at once (%s): not rescheduling their instances; "
                "they stay SUSPECT until they report again or fewer nodes are silent",
                len(verdict.held_back),
                len(verdict.states),
                ", ".join(verdict.held_back),
            )
        for node_id in verdict.newly_lost:
            _log.warning(
                "node %s lost: no heartbeat for %g s; replacing its instances",
                node_id,
                self._settings.node_ttl,
            )
        for node_id in verdict.returned:
            _log.info("node %s reports again after it was lost; its old instances stop", node_id)

    async def _run(self) -> None:
        watcher = asyncio.ensure_future(self._watch_store())
        try:
            while True:
                self._wake.clear()
                started = time.perf_counter()
                failed = False
                try:
                    await self.reconcile_once()
                except asyncio.CancelledError:
                    raise
                except Exception:  # noqa: BLE001 - a pass must never end the loop
                    failed = True
                    _log.exception("reconcile pass failed; the next pass retries")
                if self._on_pass is not None:
                    self._on_pass(time.perf_counter() - started, failed)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._settings.tick)
                await asyncio.sleep(_COALESCE_S)
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    async def _watch_store(self) -> None:
        subscription: Subscription = self._store.subscribe()
        try:
            while True:
                try:
                    await subscription.next()
                except SubscriptionLagged:
                    subscription.close()
                    subscription = self._store.subscribe()
                except Unavailable:
                    return
                self._wake.set()
        finally:
            subscription.close()


def _only_load_differs(
    old: deployment_pb2.DeploymentStatus, new: deployment_pb2.DeploymentStatus
) -> bool:
    a = deployment_pb2.DeploymentStatus()
    a.CopyFrom(old)
    b = deployment_pb2.DeploymentStatus()
    b.CopyFrom(new)
    for status in (a, b):
        status.ClearField("queue_depth")
        status.ClearField("in_flight")
    return a == b


class _IdFactory:
    """New instance ids "<deployment>-<8 hex>", unique among the known ones."""

    def __init__(self, records: ClusterRecords) -> None:
        self._taken = {r.instance.id for r in records.instances}

    def __call__(self, deployment: str) -> str:
        while True:
            candidate = f"{deployment}-{secrets.token_hex(4)}"
            if candidate not in self._taken:
                self._taken.add(candidate)
                return candidate
