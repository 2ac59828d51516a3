"""What the agent must run for one instance, independent of the wire format.

The caller builds an `InstanceSpec` from an `InstanceAssignment`; the runtime never looks at
protos again. Specs are also persisted in each instance's state file, so they round-trip
through plain JSON (`spec_to_json` / `spec_from_json`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gpufleet.v1 import deployment_pb2, node_service_pb2

# Defaults documented on gpufleet.v1.Probe and DeploymentSpec.
DEFAULT_PROBE_PERIOD_S = 1.0
DEFAULT_PROBE_TIMEOUT_S = 1.0
DEFAULT_FAILURE_THRESHOLD = 3
DEFAULT_SUCCESS_THRESHOLD = 1
DEFAULT_TERMINATION_GRACE_S = 30.0


@dataclass(frozen=True)
class GrpcAction:
    """grpc.health.v1.Health/Check against 127.0.0.1."""

    port: int = 0
    """Port to check; 0 means the instance port."""
    service: str = ""
    """Service name in the request; empty checks the whole server."""


@dataclass(frozen=True)
class HttpGetAction:
    """GET http://127.0.0.1:<port><path>; 2xx and 3xx pass."""

    port: int = 0
    """Port to check; 0 means the instance port."""
    path: str = "/"
    """Request path, starting with '/'."""


@dataclass(frozen=True)
class TcpAction:
    """A TCP connect to 127.0.0.1 passes."""

    port: int = 0
    """Port to check; 0 means the instance port."""


@dataclass(frozen=True)
class ExecAction:
    """A command run on the node (argv, no shell); exit status 0 passes."""

    command: tuple[str, ...]
    """Program and arguments; at least one element."""


ProbeAction = GrpcAction | HttpGetAction | TcpAction | ExecAction


@dataclass(frozen=True)
class ProbeSpec:
    """One probe: an action plus its timing, with the proto's defaults applied."""

    action: ProbeAction
    """The check to run."""
    initial_delay: float = 0.0
    """Seconds after the process starts before the first check."""
    period: float = DEFAULT_PROBE_PERIOD_S
    """Seconds between the starts of two checks."""
    timeout: float = DEFAULT_PROBE_TIMEOUT_S
    """Seconds a single check may take; a slower check fails."""
    failure_threshold: int = DEFAULT_FAILURE_THRESHOLD
    """Consecutive failures that make the probe fail."""
    success_threshold: int = DEFAULT_SUCCESS_THRESHOLD
    """Consecutive successes that make the probe pass."""

    @classmethod
    def from_proto(cls, probe: deployment_pb2.Probe) -> ProbeSpec:
        """Convert a `gpufleet.v1.Probe`; raises ValueError when it has no usable action."""
        kind = probe.WhichOneof("action")
        action: ProbeAction
        if kind == "grpc":
            action = GrpcAction(port=probe.grpc.port, service=probe.grpc.service)
        elif kind == "http_get":
            action = HttpGetAction(port=probe.http_get.port, path=probe.http_get.path or "/")
        elif kind == "tcp_socket":
            action = TcpAction(port=probe.tcp_socket.port)
        elif kind == "exec":
            if not probe.exec.command:
                raise ValueError(
                    "exec probe has an empty command: give the program and its arguments"
                )
            action = ExecAction(command=tuple(probe.exec.command))
        else:
            raise ValueError("probe has no action: set one of grpc, http_get, tcp_socket, exec")
        period = probe.period.ToTimedelta().total_seconds() if probe.HasField("period") else 0.0
        timeout = probe.timeout.ToTimedelta().total_seconds() if probe.HasField("timeout") else 0.0
        return cls(
            action=action,
            initial_delay=max(0.0, probe.initial_delay.ToTimedelta().total_seconds()),
            period=period if period > 0 else DEFAULT_PROBE_PERIOD_S,
            timeout=timeout if timeout > 0 else DEFAULT_PROBE_TIMEOUT_S,
            failure_threshold=probe.failure_threshold or DEFAULT_FAILURE_THRESHOLD,
            success_threshold=probe.success_threshold or DEFAULT_SUCCESS_THRESHOLD,
        )


DEFAULT_READINESS_PROBE = ProbeSpec(action=GrpcAction())
"""Readiness probe used when a deployment names none (gpufleet.v1.DeploymentSpec)."""


@dataclass(frozen=True)
class InstanceSpec:
    """Everything needed to run, probe and stop one instance."""

    instance_id: str
    """Cluster-unique instance id; names the state and log directory."""
    deployment: str
    """Deployment name."""
    generation: int
    """Deployment generation; a new generation replaces the running process."""
    command: str
    """Shell command, run as `/bin/sh -c <command>`."""
    port: int = 0
    """Port passed as $PORT; 0 lets the supervisor pick a free port on 127.0.0.1."""
    env: Mapping[str, str] = field(default_factory=dict)
    """Environment from the deployment; PORT, CUDA_* and GPUFLEET_* override it."""
    gpu_uuids: tuple[str, ...] = ()
    """GPUs given to the instance; empty means CUDA sees none."""
    mps_core_percent: int = 0
    """CUDA_MPS_ACTIVE_THREAD_PERCENTAGE for a GPU share; 0 means not limited."""
    mps_memory_limit_mib: int = 0
    """CUDA_MPS_PINNED_DEVICE_MEM_LIMIT per visible GPU for a share; 0 means not limited."""
    gpu_memory_mib: int = 0
    """GPU memory request, for overrun checks; 0 if none."""
    readiness: ProbeSpec | None = None
    """Readiness probe; None means ready as soon as the process runs."""
    liveness: ProbeSpec | None = None
    """Liveness probe; failing it restarts the instance."""
    startup: ProbeSpec | None = None
    """Startup probe; readiness and liveness start only after it passes."""
    termination_grace_period: float = DEFAULT_TERMINATION_GRACE_S
    """Seconds between SIGTERM and SIGKILL when the instance stops."""
    draining: bool = False
    """True: stop gracefully but keep reporting the instance until told to forget it."""
    restart_on_gpu_memory_overrun: bool = False
    """The deployment asks for a restart when measured GPU memory exceeds the request."""


def instance_spec_from_assignment(
    assignment: node_service_pb2.InstanceAssignment, picked_port: int = 0
) -> InstanceSpec:
    """Build the runtime's spec from the control plane's assignment.

    `picked_port` is used when the assignment leaves the port to the agent (port 0); when it
    is 0 too, the supervisor picks a free port itself when it first starts the instance.
    Raises ValueError for assignments this agent cannot run.
    """
    spec = assignment.spec
    command = assignment.command or spec.command
    if not command:
        if spec.image:
            raise ValueError(
                f"instance {assignment.instance_id}: deployment {assignment.deployment!r} "
                "uses an image, but this agent runs commands only: set spec.command"
            )
        raise ValueError(
            f"instance {assignment.instance_id}: assignment has no command: set spec.command"
        )
    is_share = spec.gpu.count == 0 and spec.gpu.memory_mib > 0
    grace = DEFAULT_TERMINATION_GRACE_S
    if spec.HasField("termination_grace_period"):
        grace = max(0.0, spec.termination_grace_period.ToTimedelta().total_seconds())
    return InstanceSpec(
        instance_id=assignment.instance_id,
        deployment=assignment.deployment,
        generation=assignment.generation,
        command=command,
        port=assignment.port or spec.port or picked_port,
        # The assignment's env is the server's full view; the deployment's is the fallback.
        env={**spec.env, **assignment.env},
        gpu_uuids=tuple(assignment.gpu_uuids),
        mps_core_percent=spec.gpu.core_percent if is_share else 0,
        mps_memory_limit_mib=spec.gpu.memory_mib if is_share else 0,
        gpu_memory_mib=assignment.gpu_memory_mib,
        readiness=(
            ProbeSpec.from_proto(spec.readiness_probe)
            if spec.HasField("readiness_probe")
            else DEFAULT_READINESS_PROBE
        ),
        liveness=(
            ProbeSpec.from_proto(spec.liveness_probe) if spec.HasField("liveness_probe") else None
        ),
        startup=(
            ProbeSpec.from_proto(spec.startup_probe) if spec.HasField("startup_probe") else None
        ),
        termination_grace_period=grace,
        draining=assignment.draining,
        restart_on_gpu_memory_overrun=spec.restart_on_gpu_memory_overrun,
    )


# --- JSON codec for the state file -------------------------------------------------------


def _action_to_json(action: ProbeAction) -> dict[str, Any]:
    if isinstance(action, GrpcAction):
        return {"kind": "grpc", "port": action.port, "service": action.service}
    if isinstance(action, HttpGetAction):
        return {"kind": "http_get", "port": action.port, "path": action.path}
    if isinstance(action, TcpAction):
        return {"kind": "tcp_socket", "port": action.port}
    return {"kind": "exec", "command": list(action.command)}


def _action_from_json(data: Mapping[str, Any]) -> ProbeAction:
    kind = data["kind"]
    if kind == "grpc":
        return GrpcAction(port=int(data["port"]), service=str(data["service"]))
    if kind == "http_get":
        return HttpGetAction(port=int(data["port"]), path=str(data["path"]))
    if kind == "tcp_socket":
        return TcpAction(port=int(data["port"]))
    if kind == "exec":
        return ExecAction(command=tuple(str(part) for part in data["command"]))
    raise ValueError(f"unknown probe kind {kind!r} in state file")


def _probe_to_json(probe: ProbeSpec | None) -> dict[str, Any] | None:
    if probe is None:
        return None
    return {
        "action": _action_to_json(probe.action),
        "initial_delay": probe.initial_delay,
        "period": probe.period,
        "timeout": probe.timeout,
        "failure_threshold": probe.failure_threshold,
        "success_threshold": probe.success_threshold,
    }


def _probe_from_json(data: Mapping[str, Any] | None) -> ProbeSpec | None:
    if data is None:
        return None
    return ProbeSpec(
        action=_action_from_json(data["action"]),
        initial_delay=float(data["initial_delay"]),
        period=float(data["period"]),
        timeout=float(data["timeout"]),
        failure_threshold=int(data["failure_threshold"]),
        success_threshold=int(data["success_threshold"]),
    )


def spec_to_json(spec: InstanceSpec) -> dict[str, Any]:
    """A JSON-serialisable dict that `spec_from_json` turns back into an equal spec."""
    return {
        "instance_id": spec.instance_id,
        "deployment": spec.deployment,
        "generation": spec.generation,
        "command": spec.command,
        "port": spec.port,
        "env": dict(spec.env),
        "gpu_uuids": list(spec.gpu_uuids),
        "mps_core_percent": spec.mps_core_percent,
        "mps_memory_limit_mib": spec.mps_memory_limit_mib,
        "gpu_memory_mib": spec.gpu_memory_mib,
        "readiness": _probe_to_json(spec.readiness),
        "liveness": _probe_to_json(spec.liveness),
        "startup": _probe_to_json(spec.startup),
        "termination_grace_period": spec.termination_grace_period,
        "draining": spec.draining,
        "restart_on_gpu_memory_overrun": spec.restart_on_gpu_memory_overrun,
    }


def spec_from_json(data: Mapping[str, Any]) -> InstanceSpec:
    """Inverse of `spec_to_json`; raises KeyError/ValueError/TypeError on a malformed dict."""
    return InstanceSpec(
        instance_id=str(data["instance_id"]),
        deployment=str(data["deployment"]),
        generation=int(data["generation"]),
        command=str(data["command"]),
        port=int(data["port"]),
        env={str(k): str(v) for k, v in dict(data["env"]).items()},
        gpu_uuids=tuple(str(u) for u in data["gpu_uuids"]),
        mps_core_percent=int(data["mps_core_percent"]),
        mps_memory_limit_mib=int(data["mps_memory_limit_mib"]),
        gpu_memory_mib=int(data["gpu_memory_mib"]),
        readiness=_probe_from_json(data["readiness"]),
        liveness=_probe_from_json(data["liveness"]),
        startup=_probe_from_json(data["startup"]),
        termination_grace_period=float(data["termination_grace_period"]),
        draining=bool(data["draining"]),
        restart_on_gpu_memory_overrun=bool(data["restart_on_gpu_memory_overrun"]),
    )
