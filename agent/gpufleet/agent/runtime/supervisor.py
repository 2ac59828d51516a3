"""The agent's instance supervisor: runs the desired set of instances on this node.

Usage by the agent:

    supervisor = Supervisor(state_dir, on_change=send_heartbeat_soon)
    await supervisor.start()            # adopts instances a previous agent left running
    await supervisor.apply(specs)       # whenever the control plane sends DesiredInstances
    supervisor.statuses()               # for each heartbeat
    await supervisor.close()            # agent exit: instances keep running
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from gpufleet.agent.runtime import statefile
from gpufleet.agent.runtime.backoff import RestartPolicy
from gpufleet.agent.runtime.paths import check_instance_id, instances_dir
from gpufleet.agent.runtime.process import LogSettings, pick_free_port
from gpufleet.agent.runtime.runner import InstanceRunner, RunnerSettings
from gpufleet.agent.runtime.spec import InstanceSpec
from gpufleet.agent.runtime.status import InstanceStatusSnapshot

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SupervisorConfig:
    """Tunables of the supervisor; the defaults suit production."""

    restart_policy: RestartPolicy = field(default_factory=RestartPolicy)
    """Backoff and crash-loop rules for crashed instances."""
    log_settings: LogSettings = field(default_factory=LogSettings)
    """Rotation of instance log files."""
    agent_env: Mapping[str, str] | None = None
    """Where PATH, HOME and LANG for instances come from; None means os.environ."""
    cwd: str | None = None
    """Working directory of instances; None means the agent's own."""
    exit_poll_interval: float = 0.5
    """Seconds between checks of adopted processes on kernels without pidfds."""
    stop_poll_interval: float = 0.05
    """Seconds between checks of a stopping process group."""


class Supervisor:
    """Starts, probes, restarts, stops and re-adopts this node's instances."""

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        config: SupervisorConfig | None = None,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self._state_dir = Path(state_dir)
        self._config = config or SupervisorConfig()
        self._on_change_callback = on_change
        self._runners: dict[str, InstanceRunner] = {}
        self._settings = RunnerSettings(
            state_dir=self._state_dir,
            restart_policy=self._config.restart_policy,
            log_settings=self._config.log_settings,
            agent_env=dict(
                self._config.agent_env if self._config.agent_env is not None else os.environ
            ),
            cwd=self._config.cwd,
            exit_poll_interval=self._config.exit_poll_interval,
            stop_poll_interval=self._config.stop_poll_interval,
        )
        self.changed = asyncio.Event()
        """Set whenever an instance's status changes; the agent clears it after reporting."""
        self._started = False
        self._closed = False

    @property
    def state_dir(self) -> Path:
        """The agent state directory this supervisor keeps its instances under."""
        return self._state_dir

    def _notify(self) -> None:
        self.changed.set()
        if self._on_change_callback is not None:
            try:
                self._on_change_callback()
            except Exception:  # noqa: BLE001 - a listener's bug must not stop instances
                log.exception("instance change callback failed")

    def _finished(self, runner: InstanceRunner) -> None:
        if self._runners.get(runner.spec.instance_id) is runner:
            del self._runners[runner.spec.instance_id]
            self._notify()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("supervisor is closed: create a new Supervisor on the state dir")

    async def start(self) -> list[str]:
        """Adopt the instances recorded in the state dir; return problems found there.

        A recorded instance whose process still runs (same pid and start time) is adopted
        as is; one that died is restarted with backoff. Call once, before `apply`.
        """
        self._check_open()
        if self._started:
            return []
        self._started = True
        instances_dir(self._state_dir).mkdir(parents=True, exist_ok=True)
        records, errors = statefile.load_records(self._state_dir)
        for message in errors:
            log.warning("%s", message)
        for record in records:
            runner = self._new_runner(record.spec, record.port, adopt=record)
            runner.start()
        if records:
            self._notify()
        return errors

    def _new_runner(
        self, spec: InstanceSpec, port: int, adopt: statefile.InstanceRecord | None = None
    ) -> InstanceRunner:
        runner = InstanceRunner(
            spec, port, self._settings, self._notify, self._finished, adopt=adopt
        )
        self._runners[spec.instance_id] = runner
        return runner

    async def apply(self, desired: Sequence[InstanceSpec]) -> None:
        """Converge on `desired`, the full set of instances this node must run.

        Starts missing instances, stops (gracefully, in the background) those not listed,
        replaces one whose generation changed, stops and keeps reporting a draining one,
        and leaves the rest alone. Returns without waiting for processes to start or stop.
        Raises ValueError for an invalid instance id or a duplicate one.
        """
        self._check_open()
        if not self._started:
            await self.start()
        wanted: dict[str, InstanceSpec] = {}
        for spec in desired:
            check_instance_id(spec.instance_id)
            if spec.instance_id in wanted:
                raise ValueError(
                    f"instance {spec.instance_id!r} is listed twice in the desired set; "
                    "each instance id must appear once"
                )
            wanted[spec.instance_id] = spec
        for instance_id, runner in list(self._runners.items()):
            if instance_id not in wanted:
                runner.request_stop(forget=True)
        for instance_id, spec in wanted.items():
            existing = self._runners.get(instance_id)
            if existing is not None:
                existing.set_desired(spec)
                continue
            self._new_runner(spec, spec.port or pick_free_port()).start()
            self._notify()

    def statuses(self) -> list[InstanceStatusSnapshot]:
        """The status of every instance this supervisor manages, by instance id."""
        return [self._runners[key].snapshot() for key in sorted(self._runners)]

    def pids(self) -> dict[str, int]:
        """Group leader pid of each running instance (for GPU process attribution)."""
        return {key: runner.pid for key, runner in self._runners.items() if runner.pid > 0}

    def restart(self, instance_id: str, reason: str) -> None:
        """Restart one instance as after a crash (e.g. GPU memory overrun), with `reason`.

        Raises KeyError when the instance is not managed here.
        """
        self._check_open()
        runner = self._runners.get(instance_id)
        if runner is None:
            raise KeyError(f"instance {instance_id!r} is not running on this node")
        runner.request_restart(reason)

    async def stop_all(self) -> None:
        """Stop every instance gracefully and wait until all are stopped and forgotten."""
        runners = list(self._runners.values())
        for runner in runners:
            runner.request_stop(forget=True)
        await asyncio.gather(*(runner.finished.wait() for runner in runners))

    async def close(self) -> None:
        """Stop supervising WITHOUT stopping instances: they keep running, and the next
        Supervisor on this state dir adopts them. Used when the agent exits."""
        self._closed = True
        runners = list(self._runners.values())
        self._runners.clear()
        await asyncio.gather(*(runner.close() for runner in runners))
