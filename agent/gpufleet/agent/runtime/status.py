"""What the runtime reports about one instance."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

from gpufleet.v1 import instance_pb2, node_service_pb2

InstanceStateValue: TypeAlias = instance_pb2.InstanceState.ValueType


@dataclass(frozen=True)
class InstanceStatusSnapshot:
    """One instance's state, field for field as in `gpufleet.v1.InstanceStatus`.

    The GPU fields are measured by the agent's GPU probe, not by the runtime: the runtime
    leaves them at zero and the agent fills them in (`dataclasses.replace`).
    """

    instance_id: str
    deployment: str
    generation: int
    state: InstanceStateValue
    reason: str
    pid: int
    """Pid of the process group leader; 0 when not running."""
    port: int
    restart_count: int
    crash_loop: bool
    gpu_memory_used_mib: int = 0
    sm_utilization_percent: int = 0
    gpu_memory_overrun: bool = False

    def to_proto(self) -> node_service_pb2.InstanceStatus:
        """The heartbeat form."""
        return node_service_pb2.InstanceStatus(
            instance_id=self.instance_id,
            state=self.state,
            reason=self.reason,
            pid=self.pid,
            port=self.port,
            restart_count=self.restart_count,
            crash_loop=self.crash_loop,
            gpu_memory_used_mib=self.gpu_memory_used_mib,
            sm_utilization_percent=self.sm_utilization_percent,
            gpu_memory_overrun=self.gpu_memory_overrun,
            generation=self.generation,
        )
