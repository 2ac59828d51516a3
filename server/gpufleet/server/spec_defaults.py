"""Fill in the defaults that deployment.proto documents, so later code reads effective values.

Pure function, no I/O. The output has every default written out (including the ones derived
from other fields, such as target_concurrency and rate_limit_burst), so the scheduler,
reconciler and gateway never have to know what an unset field means. Invalid input is left
as it is: validation reports it, defaults never hide it.
"""

from __future__ import annotations

import math

from google.protobuf import duration_pb2

from gpufleet.v1 import deployment_pb2

DEFAULT_MAX_INSTANCES = 1
DEFAULT_MAX_REQUEST_CONCURRENCY = 1
DEFAULT_MAX_QUEUE_SIZE = 100
DEFAULT_QUEUE_TIMEOUT_S = 60
DEFAULT_IDLE_RETENTION_S = 300
DEFAULT_SCALE_UP_DELAY_S = 0
DEFAULT_SCALE_DOWN_DELAY_S = 60
DEFAULT_TERMINATION_GRACE_PERIOD_S = 30
DEFAULT_MAX_SURGE_PERCENT = 25
DEFAULT_MAX_UNAVAILABLE_PERCENT = 0
DEFAULT_PROBE_INITIAL_DELAY_S = 0
DEFAULT_PROBE_PERIOD_S = 1
DEFAULT_PROBE_TIMEOUT_S = 1
DEFAULT_PROBE_FAILURE_THRESHOLD = 3
DEFAULT_PROBE_SUCCESS_THRESHOLD = 1
DEFAULT_HTTP_PROBE_PATH = "/"
DEFAULT_SPREAD_POLICY = deployment_pb2.SPREAD_POLICY_BINPACK

# The largest rate whose ceil() is a valid burst; larger or non-finite rates are invalid
# and keep burst 0 so that validation, not this module, reports them.
_MAX_RATE_LIMIT_PER_SECOND = 1_000_000.0


def with_defaults(spec: deployment_pb2.DeploymentSpec) -> deployment_pb2.DeploymentSpec:
    """Return a copy of `spec` with every unset field set to its documented default.

    Idempotent: with_defaults(with_defaults(s)) == with_defaults(s). The input is not
    modified. A valid spec stays valid; an invalid one stays invalid.
    """
    out = deployment_pb2.DeploymentSpec()
    out.CopyFrom(spec)
    # Traffic first: the scaling target defaults to the per-instance concurrency.
    _traffic_defaults(out.traffic)
    _scaling_defaults(out.scaling, out.traffic)
    _set_duration_default(
        out.termination_grace_period,
        out.HasField("termination_grace_period"),
        DEFAULT_TERMINATION_GRACE_PERIOD_S,
    )
    _rollout_defaults(out.rollout)
    if out.spread_policy == deployment_pb2.SPREAD_POLICY_UNSPECIFIED:
        out.spread_policy = DEFAULT_SPREAD_POLICY
    if not out.HasField("readiness_probe"):
        # gRPC health on the deployment port (probe port 0 means the deployment port).
        out.readiness_probe.grpc.SetInParent()
    _probe_defaults(out.readiness_probe)
    if out.HasField("liveness_probe"):
        _probe_defaults(out.liveness_probe)
    if out.HasField("startup_probe"):
        _probe_defaults(out.startup_probe)
    return out


def _traffic_defaults(traffic: deployment_pb2.TrafficSpec) -> None:
    if traffic.max_request_concurrency == 0:
        traffic.max_request_concurrency = DEFAULT_MAX_REQUEST_CONCURRENCY
    if not traffic.HasField("max_queue_size"):
        traffic.max_queue_size = DEFAULT_MAX_QUEUE_SIZE
    _set_duration_default(
        traffic.queue_timeout, traffic.HasField("queue_timeout"), DEFAULT_QUEUE_TIMEOUT_S
    )
    rate = traffic.rate_limit_per_second
    if (
        traffic.rate_limit_burst == 0
        and math.isfinite(rate)
        and 0.0 < rate <= _MAX_RATE_LIMIT_PER_SECOND
    ):
        traffic.rate_limit_burst = math.ceil(rate)


def _scaling_defaults(
    scaling: deployment_pb2.ScalingSpec, traffic: deployment_pb2.TrafficSpec
) -> None:
    if scaling.max_instances == 0:
        scaling.max_instances = DEFAULT_MAX_INSTANCES
    if scaling.target_concurrency == 0:
        scaling.target_concurrency = traffic.max_request_concurrency
    _set_duration_default(
        scaling.idle_retention, scaling.HasField("idle_retention"), DEFAULT_IDLE_RETENTION_S
    )
    _set_duration_default(
        scaling.scale_up_delay, scaling.HasField("scale_up_delay"), DEFAULT_SCALE_UP_DELAY_S
    )
    _set_duration_default(
        scaling.scale_down_delay,
        scaling.HasField("scale_down_delay"),
        DEFAULT_SCALE_DOWN_DELAY_S,
    )


def _rollout_defaults(rollout: deployment_pb2.RolloutSpec) -> None:
    if not rollout.HasField("max_surge_percent"):
        rollout.max_surge_percent = DEFAULT_MAX_SURGE_PERCENT
    # max_unavailable_percent defaults to 0, which a plain uint32 already reads as; touching
    # it here would change nothing.


def _probe_defaults(probe: deployment_pb2.Probe) -> None:
    _set_duration_default(
        probe.initial_delay, probe.HasField("initial_delay"), DEFAULT_PROBE_INITIAL_DELAY_S
    )
    _set_duration_default(probe.period, probe.HasField("period"), DEFAULT_PROBE_PERIOD_S)
    _set_duration_default(probe.timeout, probe.HasField("timeout"), DEFAULT_PROBE_TIMEOUT_S)
    if probe.failure_threshold == 0:
        probe.failure_threshold = DEFAULT_PROBE_FAILURE_THRESHOLD
    if probe.success_threshold == 0:
        probe.success_threshold = DEFAULT_PROBE_SUCCESS_THRESHOLD
    if probe.WhichOneof("action") == "http_get" and probe.http_get.path == "":
        probe.http_get.path = DEFAULT_HTTP_PROBE_PATH


def _set_duration_default(field: duration_pb2.Duration, present: bool, seconds: int) -> None:
    # Presence, not value, tells "unset" from an explicit 0 (idle_retention 0 is meaningful).
    if present:
        return
    # SetInParent marks presence even when the default is 0, which setting seconds=0 would not.
    field.SetInParent()
    field.seconds = seconds
