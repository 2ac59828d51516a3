"""Instance runtime of the agent: processes, probes, logs, restarts and re-adoption.

The agent builds `InstanceSpec`s from the control plane's assignments
(`instance_spec_from_assignment`) and hands the full desired set to a `Supervisor`.
"""

from gpufleet.agent.runtime.backoff import RestartPolicy
from gpufleet.agent.runtime.logs import follow_log, read_log_tail
from gpufleet.agent.runtime.process import LogSettings, pick_free_port
from gpufleet.agent.runtime.spec import (
    ExecAction,
    GrpcAction,
    HttpGetAction,
    InstanceSpec,
    ProbeSpec,
    TcpAction,
    instance_spec_from_assignment,
)
from gpufleet.agent.runtime.status import InstanceStatusSnapshot
from gpufleet.agent.runtime.supervisor import Supervisor, SupervisorConfig

__all__ = [
    "ExecAction",
    "GrpcAction",
    "HttpGetAction",
    "InstanceSpec",
    "InstanceStatusSnapshot",
    "LogSettings",
    "ProbeSpec",
    "RestartPolicy",
    "Supervisor",
    "SupervisorConfig",
    "TcpAction",
    "follow_log",
    "instance_spec_from_assignment",
    "pick_free_port",
    "read_log_tail",
]
