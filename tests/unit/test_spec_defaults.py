"""with_defaults: every documented default, explicit values kept, idempotent, pure."""

from __future__ import annotations

import math

import pytest
from google.protobuf import duration_pb2, text_format
from hypothesis import HealthCheck, given, settings

from gpufleet.server.spec_defaults import with_defaults
from gpufleet.server.validation import validate_deployment
from gpufleet.v1 import deployment_pb2
from tests.unit.test_validation import arbitrary_specs, full, valid_deployments

MINIMAL_WITH_DEFAULTS = """
command: "x"
scaling {
  max_instances: 1
  target_concurrency: 1
  idle_retention { seconds: 300 }
  scale_up_delay {}
  scale_down_delay { seconds: 60 }
}
traffic {
  max_request_concurrency: 1
  max_queue_size: 100
  queue_timeout { seconds: 60 }
}
readiness_probe {
  grpc {}
  initial_delay {}
  period { seconds: 1 }
  timeout { seconds: 1 }
  failure_threshold: 3
  success_threshold: 1
}
termination_grace_period { seconds: 30 }
rollout { max_surge_percent: 25 }
spread_policy: SPREAD_POLICY_BINPACK
"""


def test_minimal_spec_gets_every_documented_default() -> None:
    expected = text_format.Parse(MINIMAL_WITH_DEFAULTS, deployment_pb2.DeploymentSpec())
    assert with_defaults(deployment_pb2.DeploymentSpec(command="x")) == expected


def test_zero_defaults_are_present_not_just_zero() -> None:
    spec = with_defaults(deployment_pb2.DeploymentSpec(command="x"))
    assert spec.scaling.HasField("scale_up_delay")
    assert spec.readiness_probe.HasField("initial_delay")
    assert spec.traffic.HasField("max_queue_size")
    assert spec.rollout.HasField("max_surge_percent")


def test_input_is_not_modified() -> None:
    spec = deployment_pb2.DeploymentSpec(command="x")
    before = spec.SerializeToString(deterministic=True)
    result = with_defaults(spec)
    assert spec.SerializeToString(deterministic=True) == before
    assert result is not spec


def test_explicit_values_are_kept() -> None:
    spec = full().spec
    result = with_defaults(spec)
    # The full spec sets every field that has a default, so only probe fields it leaves
    # unset are filled.
    expected = deployment_pb2.DeploymentSpec()
    expected.CopyFrom(spec)
    expected.liveness_probe.initial_delay.SetInParent()
    expected.liveness_probe.period.seconds = 1
    expected.liveness_probe.timeout.seconds = 1
    expected.liveness_probe.failure_threshold = 3
    expected.liveness_probe.success_threshold = 1
    expected.startup_probe.initial_delay.SetInParent()
    expected.startup_probe.timeout.seconds = 1
    expected.startup_probe.success_threshold = 1
    assert result == expected


def test_explicit_zeros_that_differ_from_the_default_are_kept() -> None:
    spec = deployment_pb2.DeploymentSpec(command="x")
    spec.traffic.max_queue_size = 0
    spec.rollout.max_surge_percent = 0
    spec.rollout.max_unavailable_percent = 10
    spec.scaling.idle_retention.SetInParent()
    spec.scaling.scale_down_delay.SetInParent()
    spec.traffic.queue_timeout.SetInParent()
    spec.termination_grace_period.SetInParent()
    result = with_defaults(spec)
    assert result.traffic.max_queue_size == 0
    assert result.rollout.max_surge_percent == 0
    assert result.scaling.idle_retention == duration_pb2.Duration()
    assert result.scaling.scale_down_delay == duration_pb2.Duration()
    assert result.traffic.queue_timeout == duration_pb2.Duration()
    assert result.termination_grace_period == duration_pb2.Duration()


def test_given_readiness_probe_replaces_the_grpc_default() -> None:
    spec = deployment_pb2.DeploymentSpec(command="x")
    spec.readiness_probe.http_get.port = 8080
    result = with_defaults(spec)
    assert result.readiness_probe.WhichOneof("action") == "http_get"
    assert result.readiness_probe.http_get.path == "/"
    assert result.readiness_probe.http_get.port == 8080
    assert result.readiness_probe.period.seconds == 1


def test_http_probe_path_is_kept_when_given() -> None:
    spec = deployment_pb2.DeploymentSpec(command="x")
    spec.liveness_probe.http_get.path = "/healthz"
    assert with_defaults(spec).liveness_probe.http_get.path == "/healthz"


def test_optional_probes_stay_absent() -> None:
    result = with_defaults(deployment_pb2.DeploymentSpec(command="x"))
    assert not result.HasField("liveness_probe")
    assert not result.HasField("startup_probe")


def test_probe_without_action_gets_no_action_so_validation_still_rejects_it() -> None:
    spec = deployment_pb2.DeploymentSpec(command="x")
    spec.readiness_probe.SetInParent()
    result = with_defaults(spec)
    assert result.readiness_probe.WhichOneof("action") is None
    deployment = deployment_pb2.Deployment(name="m", spec=result)
    assert [v.field for v in validate_deployment(deployment)] == ["spec.readiness_probe"]


def test_target_concurrency_defaults_to_max_request_concurrency() -> None:
    spec = deployment_pb2.DeploymentSpec(command="x")
    spec.traffic.max_request_concurrency = 8
    assert with_defaults(spec).scaling.target_concurrency == 8
    spec.scaling.target_concurrency = 3
    assert with_defaults(spec).scaling.target_concurrency == 3


@pytest.mark.parametrize(
    ("rate", "burst"),
    [
        (0.0, 0),
        (1e-300, 1),
        (0.5, 1),
        (1.0, 1),
        (2.5, 3),
        (1_000_000.0, 1_000_000),
        # Invalid rates are left for validation to report; no burst is derived from them.
        (-1.0, 0),
        (1_000_000.5, 0),
        (math.nan, 0),
        (math.inf, 0),
    ],
)
def test_burst_defaults_to_ceil_of_rate(rate: float, burst: int) -> None:
    spec = deployment_pb2.DeploymentSpec(command="x")
    spec.traffic.rate_limit_per_second = rate
    assert with_defaults(spec).traffic.rate_limit_burst == burst


def test_explicit_burst_is_kept() -> None:
    spec = deployment_pb2.DeploymentSpec(command="x")
    spec.traffic.rate_limit_per_second = 10.0
    spec.traffic.rate_limit_burst = 2
    assert with_defaults(spec).traffic.rate_limit_burst == 2


def test_spread_policy_spread_is_kept() -> None:
    spec = deployment_pb2.DeploymentSpec(
        command="x", spread_policy=deployment_pb2.SPREAD_POLICY_SPREAD
    )
    assert with_defaults(spec).spread_policy == deployment_pb2.SPREAD_POLICY_SPREAD


_PROPERTY_SETTINGS = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@_PROPERTY_SETTINGS
@given(arbitrary_specs())
def test_idempotent_on_any_spec(spec: deployment_pb2.DeploymentSpec) -> None:
    once = with_defaults(spec)
    assert with_defaults(once) == once


@_PROPERTY_SETTINGS
@given(valid_deployments())
def test_valid_spec_stays_valid_and_defaults_are_idempotent(
    deployment: deployment_pb2.Deployment,
) -> None:
    once = with_defaults(deployment.spec)
    assert with_defaults(once) == once
    deployment.spec.CopyFrom(once)
    assert validate_deployment(deployment) == []
