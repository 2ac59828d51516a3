"""Admission and scaling settings of one deployment, with the proto defaults applied.

The control plane validates specs; these dataclasses check their ranges again because a
bad value here (a concurrency of 0, a negative timeout) would silently stop all traffic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from google.protobuf.duration_pb2 import Duration

from gpufleet.v1 import deployment_pb2

DEFAULT_MAX_QUEUE_SIZE = 100
DEFAULT_QUEUE_TIMEOUT_S = 60.0
DEFAULT_IDLE_RETENTION_S = 300.0
DEFAULT_SCALE_UP_DELAY_S = 0.0
DEFAULT_SCALE_DOWN_DELAY_S = 60.0


@dataclass(frozen=True, slots=True)
class AdmissionConfig:
    """The gateway's admission control for one deployment (TrafficSpec + max_instances)."""

    max_request_concurrency: int = 1
    """Calls in flight per instance, >= 1; a stream holds its slot for its whole life."""
    max_streams_per_connection: int = 0
    """Calls in flight per client connection on this deployment; 0 means not limited."""
    max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE
    """Calls waiting for a slot; 0 means a call that finds no free slot fails at once."""
    queue_timeout_s: float = DEFAULT_QUEUE_TIMEOUT_S
    """Longest wait in the queue, seconds; the call's own deadline also applies."""
    rate_limit_per_second: float = 0.0
    """Token bucket rate, calls per second; 0 means no limit."""
    rate_limit_burst: int = 0
    """Token bucket size; 0 means ceil(rate_limit_per_second)."""
    max_instances: int = 1
    """Upper bound on instances; a scale-out call beyond it gets REPLICA_QUOTA_EXCEEDED."""

    def __post_init__(self) -> None:
        _check(self.max_request_concurrency >= 1, "max_request_concurrency must be >= 1",
               self.max_request_concurrency)
        _check(self.max_streams_per_connection >= 0,
               "max_streams_per_connection must be >= 0 (0 = not limited)",
               self.max_streams_per_connection)
        _check(self.max_queue_size >= 0, "max_queue_size must be >= 0", self.max_queue_size)
        _check(math.isfinite(self.queue_timeout_s) and self.queue_timeout_s >= 0,
               "queue_timeout_s must be a finite number >= 0", self.queue_timeout_s)
        _check(math.isfinite(self.rate_limit_per_second) and self.rate_limit_per_second >= 0,
               "rate_limit_per_second must be a finite number >= 0 (0 = no limit)",
               self.rate_limit_per_second)
        _check(self.rate_limit_burst >= 0, "rate_limit_burst must be >= 0",
               self.rate_limit_burst)
        _check(self.max_instances >= 1, "max_instances must be >= 1", self.max_instances)

    @classmethod
    def from_spec(
        cls, traffic: deployment_pb2.TrafficSpec, scaling: deployment_pb2.ScalingSpec
    ) -> AdmissionConfig:
        """Build from the route's specs, applying the defaults documented in the proto."""
        return cls(
            max_request_concurrency=traffic.max_request_concurrency or 1,
            max_streams_per_connection=traffic.max_streams_per_connection,
            max_queue_size=(
                traffic.max_queue_size
                if traffic.HasField("max_queue_size")
                else DEFAULT_MAX_QUEUE_SIZE
            ),
            queue_timeout_s=(
                _seconds(traffic.queue_timeout)
                if traffic.HasField("queue_timeout")
                else DEFAULT_QUEUE_TIMEOUT_S
            ),
            rate_limit_per_second=traffic.rate_limit_per_second,
            rate_limit_burst=traffic.rate_limit_burst,
            max_instances=scaling.max_instances or 1,
        )


@dataclass(frozen=True, slots=True)
class ScalingConfig:
    """The autoscaler's bounds and timing for one deployment (ScalingSpec)."""

    min_instances: int = 0
    """Instances always kept; 0 allows scaling to zero."""
    max_instances: int = 1
    """Upper bound, >= min_instances and >= 1."""
    target_concurrency: float = 1.0
    """Calls per instance (in flight + queued) to aim for, > 0."""
    idle_retention_s: float = DEFAULT_IDLE_RETENTION_S
    """How long an instance must be ready and idle before it may be released."""
    scale_up_delay_s: float = DEFAULT_SCALE_UP_DELAY_S
    """Load must stay above target this long before scaling up."""
    scale_down_delay_s: float = DEFAULT_SCALE_DOWN_DELAY_S
    """Load must stay below target this long before scaling down."""

    def __post_init__(self) -> None:
        _check(self.min_instances >= 0, "min_instances must be >= 0", self.min_instances)
        _check(self.max_instances >= 1, "max_instances must be >= 1", self.max_instances)
        _check(self.min_instances <= self.max_instances,
               f"min_instances must be <= max_instances ({self.max_instances})",
               self.min_instances)
        _check(math.isfinite(self.target_concurrency) and self.target_concurrency > 0,
               "target_concurrency must be a finite number > 0", self.target_concurrency)
        for name in ("idle_retention_s", "scale_up_delay_s", "scale_down_delay_s"):
            value: float = getattr(self, name)
            _check(math.isfinite(value) and value >= 0,
                   f"{name} must be a finite number of seconds >= 0", value)

    @classmethod
    def from_spec(
        cls, scaling: deployment_pb2.ScalingSpec, traffic: deployment_pb2.TrafficSpec
    ) -> ScalingConfig:
        """Build from the deployment's specs, applying the defaults documented in the proto.

        target_concurrency 0 means the traffic spec's max_request_concurrency.
        """
        max_instances = scaling.max_instances or 1
        return cls(
            min_instances=scaling.min_instances,
            max_instances=max_instances,
            target_concurrency=float(
                scaling.target_concurrency or traffic.max_request_concurrency or 1
            ),
            idle_retention_s=(
                _seconds(scaling.idle_retention)
                if scaling.HasField("idle_retention")
                else DEFAULT_IDLE_RETENTION_S
            ),
            scale_up_delay_s=(
                _seconds(scaling.scale_up_delay)
                if scaling.HasField("scale_up_delay")
                else DEFAULT_SCALE_UP_DELAY_S
            ),
            scale_down_delay_s=(
                _seconds(scaling.scale_down_delay)
                if scaling.HasField("scale_down_delay")
                else DEFAULT_SCALE_DOWN_DELAY_S
            ),
        )


def _seconds(duration: Duration) -> float:
    return duration.seconds + duration.nanos / 1e9


def _check(ok: bool, problem: str, value: object) -> None:
    if not ok:
        raise ValueError(f"{problem}, got {value!r}")
