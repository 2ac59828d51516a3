"""The lifecycle of one instance: start, probe, restart with backoff, replace, stop.

One asyncio task per instance drives it towards what the supervisor last asked for (run
spec S, or be stopped). Requests only set fields and wake the task, so the task is the only
place that starts or stops processes and there is never more than one process per instance.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpufleet.agent.runtime import procfs, statefile
from gpufleet.agent.runtime.backoff import CrashTracker, RestartPolicy
from gpufleet.agent.runtime.env import build_instance_env
from gpufleet.agent.runtime.paths import instance_logs_dir
from gpufleet.agent.runtime.probes import ProbeResult, ProbeTracker, Verdict, run_check
from gpufleet.agent.runtime.process import ExitInfo, InstanceProcess, LogSettings
from gpufleet.agent.runtime.spec import InstanceSpec, ProbeSpec
from gpufleet.agent.runtime.status import InstanceStateValue, InstanceStatusSnapshot
from gpufleet.v1 import instance_pb2

log = logging.getLogger(__name__)

PENDING = instance_pb2.INSTANCE_STATE_PENDING
STARTING = instance_pb2.INSTANCE_STATE_STARTING
READY = instance_pb2.INSTANCE_STATE_READY
DRAINING = instance_pb2.INSTANCE_STATE_DRAINING
STOPPED = instance_pb2.INSTANCE_STATE_STOPPED
FAILED = instance_pb2.INSTANCE_STATE_FAILED

# Extra seconds a probe check may take beyond its own timeout (e.g. killing an exec probe)
# before it is abandoned as failed.
_CHECK_SLACK_S = 3.0
# Readiness checks before the first pass: 20 ms apart, growing by half each time up to the
# probe's period (see _readiness_loop).
_FIRST_READY_INTERVAL_S = 0.02
_FIRST_READY_BACKOFF = 1.5


@dataclass(frozen=True)
class RunnerSettings:
    """Settings shared by all instances of one supervisor."""

    state_dir: Path
    restart_policy: RestartPolicy
    log_settings: LogSettings
    agent_env: Mapping[str, str]
    cwd: str | None
    exit_poll_interval: float
    """Seconds between liveness checks of adopted processes where pidfds are missing."""
    stop_poll_interval: float
    """Seconds between checks of a stopping process group."""


@dataclass(frozen=True)
class _Exited:
    info: ExitInfo


@dataclass(frozen=True)
class _ProbeFailed:
    reason: str


@dataclass(frozen=True)
class _Woken:
    """The watch ended without an exit or a probe verdict: a request (stop, restart, new
    spec) woke it, or there was no process to watch."""


_Outcome = _Exited | _ProbeFailed | _Woken


class InstanceRunner:
    """Runs one instance; see the module docstring."""

    def __init__(
        self,
        spec: InstanceSpec,
        port: int,
        settings: RunnerSettings,
        on_change: Callable[[], None],
        on_finished: Callable[[InstanceRunner], None],
        adopt: statefile.InstanceRecord | None = None,
    ) -> None:
        self.spec = spec
        self.port = port
        self._settings = settings
        self._on_change = on_change
        self._on_finished = on_finished
        self.state: InstanceStateValue = PENDING
        self.reason = "waiting to start"
        self.restart_count = adopt.restart_count if adopt is not None else 0
        self.crash_loop = False
        self._process: InstanceProcess | None = None
        self._crashes = CrashTracker(settings.restart_policy)
        self._ready_since: float | None = None
        self._backoff_until = 0.0
        self._crashed = False
        # What the supervisor wants; the task converges on it.
        self._desired = spec
        self._want_running = not spec.draining
        self._forget = False
        self._restart_reason: str | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.finished = asyncio.Event()
        # A recorded instance whose process died while no agent watched; its leftovers are
        # killed by the task.
        self._orphaned: statefile.InstanceRecord | None = None
        if adopt is not None:
            self._adopt_record(adopt)

    # --- requests (called by the supervisor) -------------------------------------------

    def start(self) -> None:
        """Start the runner's task."""
        self._task = asyncio.create_task(self._main(), name=f"instance {self.spec.instance_id}")

    def set_desired(self, spec: InstanceSpec) -> None:
        """Run `spec`: a new generation replaces the process; draining stops it."""
        if spec.generation != self._desired.generation:
            self._desired = spec
        self._want_running = not spec.draining
        self._forget = False
        self._wake.set()

    def request_stop(self, forget: bool) -> None:
        """Stop gracefully; with `forget`, end the runner and drop its state file."""
        self._want_running = False
        self._forget = self._forget or forget
        self._wake.set()

    def request_restart(self, reason: str) -> None:
        """Restart the process as after a crash (backoff applies), with `reason`."""
        self._restart_reason = reason
        self._wake.set()

    async def close(self) -> None:
        """Stop the task without touching the process (it keeps running, adoptable)."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._process is not None:
            self._process.detach()
            self._process = None

    def snapshot(self) -> InstanceStatusSnapshot:
        """The instance's current status."""
        return InstanceStatusSnapshot(
            instance_id=self.spec.instance_id,
            deployment=self.spec.deployment,
            generation=self.spec.generation,
            state=self.state,
            reason=self.reason,
            pid=self.pid,
            port=self.port,
            restart_count=self.restart_count,
            crash_loop=self.crash_loop,
        )

    @property
    def pid(self) -> int:
        """Group leader pid; 0 when not running."""
        return self._process.pid if self._process is not None else 0

    # --- state ------------------------------------------------------------------------

    def _set(self, state: InstanceStateValue, reason: str) -> None:
        if (state, reason) == (self.state, self.reason):
            return
        self.state = state
        self.reason = reason
        self._on_change()

    def _set_crash_loop(self, value: bool) -> None:
        if value != self.crash_loop:
            self.crash_loop = value
            self._on_change()

    def _persist(self) -> None:
        process = self._process
        record = statefile.InstanceRecord(
            spec=self.spec,
            port=self.port,
            pid=process.pid if process is not None else 0,
            start_ticks=process.start_ticks if process is not None else 0,
            started_at=process.started_at if process is not None else 0.0,
            restart_count=self.restart_count,
            ready=self.state == READY,
        )
        try:
            statefile.write_record(self._settings.state_dir, record)
        except OSError as err:
            # Running matters more than being adoptable: report and carry on.
            log.error("instance %s: cannot write its state file: %s", self.spec.instance_id, err)

    # --- the task ---------------------------------------------------------------------

    async def _main(self) -> None:
        try:
            await self._converge()
        except Exception as err:  # noqa: BLE001 - a bug here must not leave a silent instance
            log.exception("instance %s: runtime error", self.spec.instance_id)
            self._set(FAILED, f"agent runtime error: {err!r}")
            if self._process is not None:
                await self._process.terminate(
                    self.spec.termination_grace_period, self._settings.stop_poll_interval
                )
                self._process = None
            self.finished.set()
            self._on_finished(self)

    async def _converge(self) -> None:
        if self._orphaned is not None:
            await _kill_orphaned_group(self._orphaned, self._settings.stop_poll_interval)
            self._orphaned = None
        while True:
            self._wake.clear()
            if not self._want_running:
                await self._stop_process("stopping" if self._forget else "draining")
                self._ready_since = None
                self._backoff_until = 0.0
                self._crashed = False
                self._set_crash_loop(False)
                # A stopped instance needs no adoption: if the control plane still lists it
                # as draining, a new runner starts it in STOPPED.
                statefile.remove_record(self._settings.state_dir, self.spec.instance_id)
                if self._forget:
                    self._set(STOPPED, "stopped")
                    self.finished.set()
                    self._on_finished(self)
                    return
                self.spec = self._desired
                self._set(STOPPED, "drained")
                await self._wake.wait()
                continue
            if self._desired.generation != self.spec.generation:
                await self._replace()
                continue
            if self._process is None:
                remaining = self._backoff_until - time.monotonic()
                if remaining > 0:
                    await self._sleep_or_wake(remaining)
                    continue
                if not self._spawn():
                    continue
            outcome = await self._watch()
            await self._handle(outcome)

    async def _handle(self, outcome: _Outcome) -> None:
        if isinstance(outcome, _Exited):
            if self._process is not None:
                await self._process.kill_leftovers(self._settings.stop_poll_interval)
                self._process = None
            self._crash(outcome.info.describe())
        elif isinstance(outcome, _ProbeFailed):
            await self._stop_process(outcome.reason)
            self._crash(outcome.reason)
        elif self._restart_reason is not None and self._want_running:
            reason, self._restart_reason = self._restart_reason, None
            await self._stop_process(reason)
            self._crash(reason)
        else:
            self._restart_reason = None

    async def _sleep_or_wake(self, seconds: float) -> None:
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancellation that
        # arrives just as the awaited call completes, and the runner's task would never end.
        try:
            async with asyncio.timeout(seconds):
                await self._wake.wait()
        except TimeoutError:
            pass

    def _adopt_record(self, record: statefile.InstanceRecord) -> None:
        """Take over the recorded process if it still runs; else count a crash."""
        self.port = record.port
        process = InstanceProcess.adopt(record.pid, record.start_ticks, record.started_at)
        if process is not None:
            self._process = process
            if record.ready:
                self._ready_since = time.monotonic()
                self._set(READY, "adopted after an agent restart")
            else:
                self._set(STARTING, "adopted after an agent restart")
            return
        if record.pid > 0:
            self._orphaned = record
            self._crash("exited while the agent was not running")
        else:
            # It was waiting out a restart backoff when the agent stopped.
            self._crashed = True

    def _spawn(self) -> bool:
        self._restart_reason = None
        if self._crashed:
            self.restart_count += 1
            self._crashed = False
        env = build_instance_env(self.spec, self.port, self._settings.agent_env)
        try:
            self._process = InstanceProcess.spawn(
                self.spec.command,
                env,
                instance_logs_dir(self._settings.state_dir, self.spec.instance_id),
                self._settings.log_settings,
                self._settings.cwd,
            )
        except OSError as err:
            self._crash(f"cannot start: {err}")
            return False
        self._set(STARTING, f"started (pid {self._process.pid})")
        self._persist()
        return True

    def _crash(self, reason: str) -> None:
        ready_for = time.monotonic() - self._ready_since if self._ready_since is not None else 0.0
        self._ready_since = None
        delay = self._crashes.record_crash(ready_for)
        self._backoff_until = time.monotonic() + delay
        self._crashed = True
        log.warning(
            "instance %s: %s; restarting in %.1fs", self.spec.instance_id, reason, delay
        )
        self._persist()
        self._set_crash_loop(self._crashes.crash_loop)
        self._set(FAILED, reason)

    async def _stop_process(self, reason: str) -> None:
        process = self._process
        if process is None:
            return
        self._set(DRAINING, reason)
        await process.terminate(
            self.spec.termination_grace_period, self._settings.stop_poll_interval
        )
        self._process = None

    async def _replace(self) -> None:
        old, new = self.spec.generation, self._desired.generation
        await self._stop_process(f"replacing generation {old} with {new}")
        self._ready_since = None
        self.spec = self._desired
        if self.spec.port:
            self.port = self.spec.port
        # A new generation starts with a clean slate: its predecessor's crashes say nothing.
        self._crashes = CrashTracker(self._settings.restart_policy)
        self._backoff_until = 0.0
        self._crashed = False
        self._set_crash_loop(False)
        self._set(PENDING, f"replacing generation {old} with {new}")

    async def _watch(self) -> _Outcome:
        process = self._process
        if process is None:
            return _Woken()
        exit_task = asyncio.create_task(process.wait_exit(self._settings.exit_poll_interval))
        health_task = asyncio.create_task(self._health(process))
        wake_task = asyncio.create_task(self._wake.wait())
        tasks: list[asyncio.Task[Any]] = [exit_task, health_task, wake_task]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if exit_task in done and not exit_task.cancelled() and exit_task.exception() is None:
            return _Exited(exit_task.result())
        if health_task in done and not health_task.cancelled() and health_task.exception() is None:
            return health_task.result()
        if health_task in done and not health_task.cancelled():
            error = health_task.exception()
            log.error("instance %s: probe task failed: %r", self.spec.instance_id, error)
            return _ProbeFailed(f"probe error: {error!r}")
        return _Woken()

    # --- probes -----------------------------------------------------------------------

    def _started_monotonic(self, process: InstanceProcess) -> float:
        # Wall-clock age, because an adopted process started before this agent did.
        age = max(0.0, time.time() - process.started_at)
        return time.monotonic() - age

    async def _health(self, process: InstanceProcess) -> _ProbeFailed:
        """Run the probes for `process`; return only when it must be restarted."""
        spec = self.spec
        started = self._started_monotonic(process)
        env = build_instance_env(spec, self.port, self._settings.agent_env)
        already_ready = self.state == READY
        if spec.startup is not None and not already_ready:
            result, verdict = await self._probe_until(spec.startup, started, env, stop_on_pass=True)
            if verdict == Verdict.FAILING:
                return _ProbeFailed(f"startup probe failed: {result.message}")
        if spec.readiness is None:
            self._mark_ready()
            readiness_task: asyncio.Task[None] | None = None
        else:
            readiness_task = asyncio.create_task(self._readiness_loop(spec.readiness, started, env))
        try:
            if spec.liveness is not None:
                result, _ = await self._probe_until(spec.liveness, started, env, stop_on_pass=False)
                return _ProbeFailed(f"liveness probe failed: {result.message}")
            # Nothing left that can fail: wait until the process exits or a request comes
            # (the caller cancels this task then).
            if readiness_task is not None:
                await readiness_task
            else:
                await asyncio.Event().wait()
        finally:
            if readiness_task is not None:
                readiness_task.cancel()
                await asyncio.gather(readiness_task, return_exceptions=True)
        return _ProbeFailed("readiness probing ended unexpectedly")

    async def _check(self, probe: ProbeSpec, env: Mapping[str, str]) -> ProbeResult:
        # asyncio.timeout, not wait_for: see _sleep_or_wake.
        try:
            async with asyncio.timeout(probe.timeout + _CHECK_SLACK_S):
                return await run_check(probe, self.port, env)
        except TimeoutError:
            return ProbeResult(False, f"check did not finish within {probe.timeout:g}s")

    async def _wait_initial_delay(self, probe: ProbeSpec, started: float) -> None:
        delay = started + probe.initial_delay - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)

    async def _probe_until(
        self, probe: ProbeSpec, started: float, env: Mapping[str, str], stop_on_pass: bool
    ) -> tuple[ProbeResult, Verdict]:
        """Probe until the verdict is FAILING (or PASSING, with `stop_on_pass`)."""
        await self._wait_initial_delay(probe, started)
        tracker = ProbeTracker(probe.success_threshold, probe.failure_threshold)
        while True:
            began = time.monotonic()
            result = await self._check(probe, env)
            verdict = tracker.observe(result.ok)
            if verdict == Verdict.FAILING or (stop_on_pass and verdict == Verdict.PASSING):
                return result, verdict
            await asyncio.sleep(max(0.0, probe.period - (time.monotonic() - began)))

    async def _readiness_loop(
        self, probe: ProbeSpec, started: float, env: Mapping[str, str]
    ) -> None:
        await self._wait_initial_delay(probe, started)
        tracker = ProbeTracker(probe.success_threshold, probe.failure_threshold)
        previous = Verdict.UNKNOWN
        # A call may be waiting for this instance (scale from zero), so until a check first
        # passes the checks come quickly, then slower and slower up to the period: a model
        # that loads in 150 ms is seen within tens of ms instead of a whole period later,
        # and one that loads for a minute costs only a few dozen extra checks. After the
        # first pass the period applies, so success/failure thresholds keep their meaning.
        interval = min(_FIRST_READY_INTERVAL_S, probe.period)
        passed_once = False
        while True:
            began = time.monotonic()
            result = await self._check(probe, env)
            passed_once = passed_once or result.ok
            verdict = tracker.observe(result.ok)
            if verdict != previous:
                if verdict == Verdict.PASSING:
                    self._mark_ready()
                elif verdict == Verdict.FAILING:
                    self._ready_since = None
                    self._set(STARTING, f"readiness probe failed: {result.message}")
                    self._persist()
                previous = verdict
            if passed_once:
                interval = probe.period
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - began)))
            interval = min(interval * _FIRST_READY_BACKOFF, probe.period)

    def _mark_ready(self) -> None:
        if self.state == READY:
            return
        self._ready_since = time.monotonic()
        self._set_crash_loop(False)
        self._set(READY, "ready")
        self._persist()


async def _kill_orphaned_group(record: statefile.InstanceRecord, poll_interval: float) -> None:
    """The recorded leader is gone; SIGKILL what it left in its group.

    Only while the leader's pid is unused (or still its own zombie): a live process with that
    pid is a newcomer, and its group, if any, is not ours.
    """
    stat = procfs.read_stat(record.pid)
    if stat is not None and stat.start_ticks != record.start_ticks:
        return
    members = procfs.group_members(record.pgid)
    if not members:
        return
    leftover = InstanceProcess(record.pid, record.start_ticks, record.started_at)
    await leftover.kill_leftovers(poll_interval)
