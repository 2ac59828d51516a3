"""Deployment spec validation: every rule, its exact field path, boundaries and properties."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
from google.protobuf import duration_pb2, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpufleet.server.spec_defaults import with_defaults
from gpufleet.server.validation import (
    RESERVED_ENV_KEYS,
    FieldViolation,
    validate_deployment,
    validate_label_selector,
    validate_name,
    validate_scale,
)
from gpufleet.v1 import deployment_pb2

Mutation = Callable[[deployment_pb2.Deployment], None]


def minimal() -> deployment_pb2.Deployment:
    return deployment_pb2.Deployment(name="m", spec=deployment_pb2.DeploymentSpec(command="x"))


def full() -> deployment_pb2.Deployment:
    """Every spec field set to a valid, non-default value."""
    seconds = duration_pb2.Duration
    return deployment_pb2.Deployment(
        name="resnet-50-v2",
        labels={"team": "ml", "example.com/tier": "prod", "a_b.c-d": ""},
        spec=deployment_pb2.DeploymentSpec(
            command="python -m server --port $PORT",
            port=8001,
            env={"MODEL_PATH": "/models/resnet", "_X1": "", "lower": "v"},
            gpu=deployment_pb2.GpuRequest(memory_mib=8192, core_percent=30),
            cpu_millis=2000,
            memory_mib=16384,
            scaling=deployment_pb2.ScalingSpec(
                min_instances=1,
                max_instances=4,
                target_concurrency=8,
                idle_retention=seconds(seconds=600),
                scale_up_delay=seconds(seconds=5),
                scale_down_delay=seconds(seconds=120, nanos=500_000_000),
            ),
            traffic=deployment_pb2.TrafficSpec(
                max_request_concurrency=4,
                max_streams_per_connection=100,
                max_queue_size=0,
                queue_timeout=seconds(seconds=30),
                rate_limit_per_second=12.5,
                rate_limit_burst=20,
            ),
            readiness_probe=deployment_pb2.Probe(
                http_get=deployment_pb2.HttpGetProbeAction(port=8080, path="/healthz?x=1"),
                initial_delay=seconds(seconds=2),
                period=seconds(nanos=500_000_000),
                timeout=seconds(nanos=100_000_000),
                failure_threshold=5,
                success_threshold=2,
            ),
            liveness_probe=deployment_pb2.Probe(
                exec=deployment_pb2.ExecProbeAction(command=["/bin/check", "--quick"])
            ),
            startup_probe=deployment_pb2.Probe(
                tcp_socket=deployment_pb2.TcpSocketProbeAction(port=8001),
                period=seconds(seconds=3600),
                failure_threshold=1000,
            ),
            termination_grace_period=seconds(seconds=0),
            rollout=deployment_pb2.RolloutSpec(max_surge_percent=0, max_unavailable_percent=50),
            spread_policy=deployment_pb2.SPREAD_POLICY_SPREAD,
            node_selector={"gpu": "h100", "zone/rack": "r1"},
            service="resnet",
            service_weight=90,
            restart_on_gpu_memory_overrun=True,
        ),
    )


def fields(violations: list[FieldViolation]) -> list[str]:
    return [violation.field for violation in violations]


def test_minimal_spec_is_valid() -> None:
    assert validate_deployment(minimal()) == []


def test_full_spec_is_valid() -> None:
    assert validate_deployment(full()) == []


def test_image_instead_of_command_is_valid() -> None:
    deployment = minimal()
    deployment.spec.command = ""
    deployment.spec.image = "registry.example.com/team/model:1.2@sha256:abc"
    assert validate_deployment(deployment) == []


def test_output_only_fields_are_ignored() -> None:
    deployment = minimal()
    deployment.status.message = "\x00 anything"
    deployment.status.phase = 99  # type: ignore[assignment]
    deployment.revision = -5
    deployment.generation = -1
    deployment.observed_generation = -7
    deployment.create_time.seconds = -1
    deployment.delete_time.nanos = -1
    assert validate_deployment(deployment) == []


def _set_name(value: str) -> Mutation:
    def mutate(d: deployment_pb2.Deployment) -> None:
        d.name = value

    return mutate


def _both_command_and_image(d: deployment_pb2.Deployment) -> None:
    d.spec.image = "img"


def _neither_command_nor_image(d: deployment_pb2.Deployment) -> None:
    d.spec.command = ""


def _blank_command(d: deployment_pb2.Deployment) -> None:
    d.spec.command = " \t\n"


def _nul_in_command(d: deployment_pb2.Deployment) -> None:
    d.spec.command = "run\x00"


def _image_with_space(d: deployment_pb2.Deployment) -> None:
    d.spec.command = ""
    d.spec.image = "my image:1"


def _env(key: str, value: str = "v") -> Mutation:
    def mutate(d: deployment_pb2.Deployment) -> None:
        d.spec.env[key] = value

    return mutate


def _label(key: str, value: str = "v") -> Mutation:
    def mutate(d: deployment_pb2.Deployment) -> None:
        d.labels[key] = value

    return mutate


def _node_selector(key: str, value: str = "v") -> Mutation:
    def mutate(d: deployment_pb2.Deployment) -> None:
        d.spec.node_selector[key] = value

    return mutate


def _gpu(count: int = 0, memory_mib: int = 0, core_percent: int = 0) -> Mutation:
    def mutate(d: deployment_pb2.Deployment) -> None:
        d.spec.gpu.CopyFrom(
            deployment_pb2.GpuRequest(
                count=count, memory_mib=memory_mib, core_percent=core_percent
            )
        )

    return mutate


def _scaling(min_instances: int, max_instances: int) -> Mutation:
    def mutate(d: deployment_pb2.Deployment) -> None:
        d.spec.scaling.min_instances = min_instances
        d.spec.scaling.max_instances = max_instances

    return mutate


def _probe(name: str, probe: deployment_pb2.Probe) -> Mutation:
    def mutate(d: deployment_pb2.Deployment) -> None:
        getattr(d.spec, name).CopyFrom(probe)

    return mutate


def _rollout(surge: int, unavailable: int) -> Mutation:
    def mutate(d: deployment_pb2.Deployment) -> None:
        d.spec.rollout.max_surge_percent = surge
        d.spec.rollout.max_unavailable_percent = unavailable

    return mutate


def _spread_policy_unknown(d: deployment_pb2.Deployment) -> None:
    d.spec.spread_policy = 7  # type: ignore[assignment]


def _service(name: str, weight: int) -> Mutation:
    def mutate(d: deployment_pb2.Deployment) -> None:
        d.spec.service = name
        d.spec.service_weight = weight

    return mutate


def _many(prefix: str, count: int, target: str) -> Mutation:
    def mutate(d: deployment_pb2.Deployment) -> None:
        entries = d.labels if target == "labels" else getattr(d.spec, target)
        entries.update({f"{prefix}{index}": "v" for index in range(count)})

    return mutate


_HTTP = deployment_pb2.HttpGetProbeAction
_EXEC = deployment_pb2.ExecProbeAction

RULE_CASES: list[tuple[str, Mutation, str]] = [
    ("empty name", _set_name(""), "name"),
    ("uppercase name", _set_name("Model"), "name"),
    ("name starts with digit", _set_name("1model"), "name"),
    ("name starts with dash", _set_name("-model"), "name"),
    ("name ends with dash", _set_name("model-"), "name"),
    ("name with underscore", _set_name("my_model"), "name"),
    ("name with dot", _set_name("my.model"), "name"),
    ("name with non-ascii letter", _set_name("modèle"), "name"),
    ("name with trailing newline", _set_name("model\n"), "name"),
    ("name too long", _set_name("a" * 64), "name"),
    ("label key with space", _label("a b"), 'labels["a b"]'),
    ("label key empty", _label(""), 'labels[""]'),
    ("label key too long", _label("k" * 64), f'labels["{"k" * 64}"]'),
    ("label key with colon", _label("a:b"), 'labels["a:b"]'),
    ("label key with quote is json-escaped", _label('a"b'), 'labels["a\\"b"]'),
    ("label value too long", _label("k", "v" * 254), 'labels["k"]'),
    ("too many labels", _many("k", 65, "labels"), "labels"),
    ("command and image", _both_command_and_image, "spec.command"),
    ("neither command nor image", _neither_command_nor_image, "spec.command"),
    ("blank command", _blank_command, "spec.command"),
    ("NUL in command", _nul_in_command, "spec.command"),
    ("image with whitespace", _image_with_space, "spec.image"),
    ("env key starts with digit", _env("1X"), 'spec.env["1X"]'),
    ("env key with dash", _env("A-B"), 'spec.env["A-B"]'),
    ("env key empty", _env(""), 'spec.env[""]'),
    ("env key with equals", _env("A=B"), 'spec.env["A=B"]'),
    ("env value with NUL", _env("A", "x\x00y"), 'spec.env["A"]'),
    ("too many env entries", _many("E", 129, "env"), "spec.env"),
    ("gpu count with memory", _gpu(count=2, memory_mib=1024), "spec.gpu.memory_mib"),
    ("gpu count with core share", _gpu(count=1, core_percent=50), "spec.gpu.core_percent"),
    ("gpu core share without memory", _gpu(core_percent=50), "spec.gpu.core_percent"),
    ("min above max", _scaling(5, 4), "spec.scaling.min_instances"),
    ("min above unset max", _scaling(2, 0), "spec.scaling.min_instances"),
    ("rollout surge and unavailable both 0", _rollout(0, 0), "spec.rollout.max_surge_percent"),
    ("unknown spread policy", _spread_policy_unknown, "spec.spread_policy"),
    ("node selector key with space", _node_selector("gpu type"),
     'spec.node_selector["gpu type"]'),
    ("node selector value too long", _node_selector("gpu", "x" * 254),
     'spec.node_selector["gpu"]'),
    ("too many node selector labels", _many("k", 65, "node_selector"), "spec.node_selector"),
    ("service with uppercase", _service("Svc", 1), "spec.service"),
    ("service ends with dash", _service("svc-", 0), "spec.service"),
    ("service weight without service", _service("", 10), "spec.service_weight"),
]
RULE_CASES += [
    (f"reserved env key {key}", _env(key), f'spec.env["{key}"]')
    for key in sorted(RESERVED_ENV_KEYS)
]

# (case, probe field, probe, path of the violation below the probe ("" = the probe itself))
PROBE_CASES: list[tuple[str, str, deployment_pb2.Probe, str]] = [
    ("readiness without action", "readiness_probe", deployment_pb2.Probe(), ""),
    (
        "liveness without action",
        "liveness_probe",
        deployment_pb2.Probe(failure_threshold=3),
        "",
    ),
    (
        "startup without action",
        "startup_probe",
        deployment_pb2.Probe(period=duration_pb2.Duration(seconds=1)),
        "",
    ),
    (
        "http path without slash",
        "readiness_probe",
        deployment_pb2.Probe(http_get=_HTTP(path="healthz")),
        ".http_get.path",
    ),
    (
        "http path with space",
        "readiness_probe",
        deployment_pb2.Probe(http_get=_HTTP(path="/health z")),
        ".http_get.path",
    ),
    (
        "http path with header injection",
        "liveness_probe",
        deployment_pb2.Probe(http_get=_HTTP(path="/a\r\nHost: x")),
        ".http_get.path",
    ),
    (
        "exec without command",
        "liveness_probe",
        deployment_pb2.Probe(exec=_EXEC()),
        ".exec.command",
    ),
    (
        "exec with empty program",
        "startup_probe",
        deployment_pb2.Probe(exec=_EXEC(command=["", "x"])),
        ".exec.command[0]",
    ),
    (
        "exec argument with NUL",
        "readiness_probe",
        deployment_pb2.Probe(exec=_EXEC(command=["check", "a\x00"])),
        ".exec.command[1]",
    ),
]
RULE_CASES += [
    (case, _probe(name, probe), f"spec.{name}{suffix}")
    for case, name, probe, suffix in PROBE_CASES
]


@pytest.mark.parametrize(
    ("mutate", "field"),
    [pytest.param(mutate, field, id=case_id) for case_id, mutate, field in RULE_CASES],
)
def test_each_rule_reports_its_exact_field(mutate: Mutation, field: str) -> None:
    deployment = minimal()
    mutate(deployment)
    violations = validate_deployment(deployment)
    assert fields(violations) == [field]
    assert all(violation.description for violation in violations)


def test_reserved_env_key_message_says_the_platform_sets_it() -> None:
    deployment = minimal()
    deployment.spec.env["CUDA_VISIBLE_DEVICES"] = "0"
    [violation] = validate_deployment(deployment)
    assert "set by the platform" in violation.description


def test_description_states_the_range_and_the_bad_value() -> None:
    deployment = minimal()
    deployment.spec.gpu.memory_mib = 1024
    deployment.spec.gpu.core_percent = 150
    assert validate_deployment(deployment) == [
        FieldViolation(
            "spec.gpu.core_percent",
            "must be 0-100 (percent of one GPU's SMs; 0 means not limited); got 150",
        )
    ]


def test_long_bad_value_is_cut_short_in_the_description() -> None:
    deployment = minimal()
    deployment.spec.readiness_probe.http_get.path = "x" * 10_000
    [violation] = validate_deployment(deployment)
    assert len(violation.description) < 300


def test_many_problems_are_all_reported_at_once() -> None:
    deployment = deployment_pb2.Deployment(
        name="Bad_Name",
        labels={"bad key": "v"},
        spec=deployment_pb2.DeploymentSpec(
            command="a",
            image="b",
            port=70000,
            env={"PORT": "1", "9": "x"},
            gpu=deployment_pb2.GpuRequest(count=20, memory_mib=2_000_000, core_percent=101),
            cpu_millis=2_000_000,
            scaling=deployment_pb2.ScalingSpec(
                min_instances=1001,
                max_instances=1001,
                idle_retention=duration_pb2.Duration(seconds=-1),
            ),
            traffic=deployment_pb2.TrafficSpec(
                max_request_concurrency=10_001,
                rate_limit_per_second=math.inf,
                queue_timeout=duration_pb2.Duration(seconds=1, nanos=-1),
            ),
            readiness_probe=deployment_pb2.Probe(
                grpc=deployment_pb2.GrpcProbeAction(port=65536),
                period=duration_pb2.Duration(seconds=0),
                success_threshold=1001,
            ),
            liveness_probe=deployment_pb2.Probe(),
            rollout=deployment_pb2.RolloutSpec(max_unavailable_percent=101),
            node_selector={"": "x"},
            service="-svc",
            service_weight=1001,
        ),
    )
    assert sorted(fields(validate_deployment(deployment))) == sorted(
        [
            "name",
            'labels["bad key"]',
            "spec.command",
            "spec.port",
            'spec.env["9"]',
            'spec.env["PORT"]',
            "spec.gpu.count",
            "spec.gpu.memory_mib",
            "spec.gpu.core_percent",
            "spec.cpu_millis",
            "spec.scaling.min_instances",
            "spec.scaling.max_instances",
            "spec.scaling.idle_retention",
            "spec.traffic.max_request_concurrency",
            "spec.traffic.rate_limit_per_second",
            "spec.traffic.queue_timeout.nanos",
            "spec.readiness_probe.grpc.port",
            "spec.readiness_probe.period",
            "spec.readiness_probe.success_threshold",
            "spec.liveness_probe",
            "spec.rollout.max_unavailable_percent",
            'spec.node_selector[""]',
            "spec.service",
            "spec.service_weight",
        ]
    )


def _set_path(deployment: deployment_pb2.Deployment, path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    target: Any = deployment
    for name in parents:
        target = getattr(target, name)
    setattr(target, leaf, value)


def _prep_memory(d: deployment_pb2.Deployment) -> None:
    d.spec.gpu.memory_mib = 1024


def _prep_max_instances(d: deployment_pb2.Deployment) -> None:
    d.spec.scaling.max_instances = 1000


def _prep_service(d: deployment_pb2.Deployment) -> None:
    d.spec.service = "svc"


def _prep_unavailable(d: deployment_pb2.Deployment) -> None:
    d.spec.rollout.max_unavailable_percent = 10


def _prep_grpc(d: deployment_pb2.Deployment) -> None:
    d.spec.readiness_probe.grpc.SetInParent()


def _prep_http(d: deployment_pb2.Deployment) -> None:
    d.spec.liveness_probe.http_get.SetInParent()


def _prep_tcp(d: deployment_pb2.Deployment) -> None:
    d.spec.startup_probe.tcp_socket.SetInParent()


def _no_prep(d: deployment_pb2.Deployment) -> None:
    del d


# (path, values that pass, values that fail, preparation that makes the field meaningful)
NUMERIC_RANGES: list[tuple[str, list[Any], list[Any], Mutation]] = [
    ("spec.port", [0, 1, 65535], [65536, 2**32 - 1], _no_prep),
    ("spec.gpu.count", [0, 1, 16], [17], _no_prep),
    ("spec.gpu.memory_mib", [0, 1, 1_048_576], [1_048_577, 2**64 - 1], _no_prep),
    ("spec.gpu.core_percent", [0, 1, 100], [101], _prep_memory),
    ("spec.cpu_millis", [0, 1, 1_024_000], [1_024_001], _no_prep),
    ("spec.memory_mib", [0, 1, 2**64 - 1], [], _no_prep),
    ("spec.scaling.min_instances", [0, 1, 1000], [1001], _prep_max_instances),
    ("spec.scaling.max_instances", [0, 1, 1000], [1001], _no_prep),
    ("spec.scaling.target_concurrency", [0, 1, 2**32 - 1], [], _no_prep),
    ("spec.traffic.max_request_concurrency", [0, 1, 10_000], [10_001], _no_prep),
    ("spec.traffic.max_streams_per_connection", [0, 1, 10_000], [10_001], _no_prep),
    ("spec.traffic.max_queue_size", [0, 1, 100_000], [100_001], _no_prep),
    (
        "spec.traffic.rate_limit_per_second",
        [0.0, 1e-300, 0.5, 1.0, 1_000_000.0],
        [-1e-9, -1.0, 1_000_000.5, 1e300, math.nan, math.inf, -math.inf],
        _no_prep,
    ),
    ("spec.traffic.rate_limit_burst", [0, 1, 1_000_000], [1_000_001], _no_prep),
    ("spec.readiness_probe.grpc.port", [0, 1, 65535], [65536], _no_prep),
    ("spec.liveness_probe.http_get.port", [0, 1, 65535], [65536], _no_prep),
    ("spec.startup_probe.tcp_socket.port", [0, 1, 65535], [65536], _no_prep),
    ("spec.readiness_probe.failure_threshold", [0, 1, 1000], [1001], _prep_grpc),
    ("spec.readiness_probe.success_threshold", [0, 1, 1000], [1001], _prep_grpc),
    ("spec.liveness_probe.failure_threshold", [0, 1, 1000], [1001], _prep_http),
    ("spec.startup_probe.success_threshold", [0, 1, 1000], [1001], _prep_tcp),
    ("spec.rollout.max_surge_percent", [0, 1, 100], [101], _prep_unavailable),
    ("spec.rollout.max_unavailable_percent", [0, 1, 100], [101], _no_prep),
    ("spec.service_weight", [0, 1, 1000], [1001], _prep_service),
]


@pytest.mark.parametrize(
    ("path", "value", "ok", "prep"),
    [
        pytest.param(path, value, ok, prep, id=f"{path}={value}")
        for path, good, bad, prep in NUMERIC_RANGES
        for values, ok in ((good, True), (bad, False))
        for value in values
    ],
)
def test_numeric_boundaries(path: str, value: Any, ok: bool, prep: Mutation) -> None:
    deployment = minimal()
    prep(deployment)
    _set_path(deployment, path, value)
    assert fields(validate_deployment(deployment)) == ([] if ok else [path])


_S = 1_000_000_000

# (path of a Duration, low and high bound in nanoseconds, preparation)
DURATION_RANGES: list[tuple[str, int, int, Mutation]] = [
    ("spec.termination_grace_period", 0, 3600 * _S, _no_prep),
    ("spec.scaling.idle_retention", 0, 86400 * _S, _no_prep),
    ("spec.scaling.scale_up_delay", 0, 3600 * _S, _no_prep),
    ("spec.scaling.scale_down_delay", 0, 3600 * _S, _no_prep),
    ("spec.traffic.queue_timeout", 0, 3600 * _S, _no_prep),
    ("spec.readiness_probe.initial_delay", 0, 3600 * _S, _prep_grpc),
    ("spec.readiness_probe.period", _S // 10, 3600 * _S, _prep_grpc),
    ("spec.liveness_probe.timeout", _S // 10, 3600 * _S, _prep_http),
    ("spec.startup_probe.period", _S // 10, 3600 * _S, _prep_tcp),
]


def _duration_cases() -> list[Any]:
    cases = []
    for path, low, high, prep in DURATION_RANGES:
        good = [low, low + 1, high]
        bad = [high + 1, -1, -_S, 2**62]
        if low > 0:
            bad += [0, low - 1]
        for values, ok in ((good, True), (bad, False)):
            for nanos in values:
                cases.append(pytest.param(path, nanos, ok, prep, id=f"{path}={nanos}ns"))
    return cases


def _get_path(deployment: deployment_pb2.Deployment, path: str) -> Any:
    target: Any = deployment
    for name in path.split("."):
        target = getattr(target, name)
    return target


@pytest.mark.parametrize(("path", "nanos", "ok", "prep"), _duration_cases())
def test_duration_boundaries(path: str, nanos: int, ok: bool, prep: Mutation) -> None:
    deployment = minimal()
    prep(deployment)
    duration: duration_pb2.Duration = _get_path(deployment, path)
    duration.SetInParent()
    duration.FromNanoseconds(nanos)
    assert fields(validate_deployment(deployment)) == ([] if ok else [path])


@pytest.mark.parametrize(
    ("seconds", "nanos"),
    [(1, 1_000_000_000), (0, -1_000_000_000), (1, -1), (-1, 1), (0, 2**31 - 1)],
)
def test_malformed_duration_nanos_are_reported_on_nanos(seconds: int, nanos: int) -> None:
    deployment = minimal()
    deployment.spec.traffic.queue_timeout.seconds = seconds
    deployment.spec.traffic.queue_timeout.nanos = nanos
    assert fields(validate_deployment(deployment)) == ["spec.traffic.queue_timeout.nanos"]


def test_explicit_zero_period_is_rejected_but_unset_period_means_default() -> None:
    deployment = minimal()
    deployment.spec.readiness_probe.grpc.SetInParent()
    assert validate_deployment(deployment) == []
    deployment.spec.readiness_probe.period.SetInParent()
    assert fields(validate_deployment(deployment)) == ["spec.readiness_probe.period"]


@pytest.mark.parametrize(
    ("what", "count", "ok"),
    [
        ("labels", 64, True),
        ("labels", 65, False),
        ("node_selector", 64, True),
        ("node_selector", 65, False),
        ("env", 128, True),
        ("env", 129, False),
    ],
)
def test_map_size_boundaries(what: str, count: int, ok: bool) -> None:
    deployment = minimal()
    _many("K", count, what)(deployment)
    path = "labels" if what == "labels" else f"spec.{what}"
    assert fields(validate_deployment(deployment)) == ([] if ok else [path])


@pytest.mark.parametrize(
    ("key", "value", "ok"),
    [
        ("k" * 63, "v", True),
        ("k" * 64, "v", False),
        ("k", "v" * 253, True),
        ("k", "v" * 254, False),
        ("k", "", True),
        ("A.b_c/d-9", "any value, with spaces", True),
    ],
)
def test_label_key_and_value_length_boundaries(key: str, value: str, ok: bool) -> None:
    deployment = minimal()
    deployment.labels[key] = value
    deployment.spec.node_selector[key] = value
    expected = [] if ok else [f'labels["{key}"]', f'spec.node_selector["{key}"]']
    assert fields(validate_deployment(deployment)) == expected


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("a", True),
        ("a" * 63, True),
        ("a" * 64, False),
        ("a-1", True),
        ("a--b", True),
        ("abc-", False),
        ("", False),
        ("9", False),
        ("a B", False),
    ],
)
def test_validate_name(name: str, ok: bool) -> None:
    violations = validate_name(name)
    assert fields(violations) == ([] if ok else ["name"])


def test_validate_name_uses_the_given_field_and_explains_the_rule() -> None:
    [violation] = validate_name("", field="spec.service")
    assert violation.field == "spec.service"
    assert "is required" in violation.description
    assert "1-63 characters" in violation.description


def _scaled_spec(min_instances: int, max_instances: int) -> deployment_pb2.DeploymentSpec:
    return deployment_pb2.DeploymentSpec(
        command="x",
        scaling=deployment_pb2.ScalingSpec(
            min_instances=min_instances, max_instances=max_instances
        ),
    )


@pytest.mark.parametrize(
    ("spec_bounds", "new_min", "new_max", "expected"),
    [
        ((0, 5), None, None, []),
        ((0, 5), 0, None, []),
        ((0, 5), 5, None, []),
        ((0, 5), 6, None, ["min_instances"]),
        ((0, 5), 6, 6, []),
        ((0, 5), 7, 6, ["min_instances"]),
        ((0, 5), None, 1, []),
        ((3, 5), None, 3, []),
        ((3, 5), None, 2, ["max_instances"]),
        ((3, 5), 1, 2, []),
        ((0, 0), 1, None, []),
        ((0, 0), 2, None, ["min_instances"]),
        ((0, 5), 0, 1000, []),
        ((0, 5), 1000, 1000, []),
        ((0, 5), 1001, None, ["min_instances"]),
        ((0, 5), None, 0, ["max_instances"]),
        ((0, 5), None, 1001, ["max_instances"]),
        ((0, 5), 1001, 0, ["min_instances", "max_instances"]),
    ],
)
def test_validate_scale(
    spec_bounds: tuple[int, int],
    new_min: int | None,
    new_max: int | None,
    expected: list[str],
) -> None:
    violations = validate_scale(_scaled_spec(*spec_bounds), new_min, new_max)
    assert fields(violations) == expected


def test_validate_scale_accepts_a_spec_with_defaults_filled_in() -> None:
    spec = with_defaults(deployment_pb2.DeploymentSpec(command="x"))
    assert fields(validate_scale(spec, 2, None)) == ["min_instances"]
    assert validate_scale(spec, 1, None) == []


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ("", {}),
        ("   ", {}),
        ("a=b", {"a": "b"}),
        ("team=ml,tier=prod", {"team": "ml", "tier": "prod"}),
        (" team = ml , tier=prod ", {"team": "ml", "tier": "prod"}),
        ("a=", {"a": ""}),
        ("a=b,a=b", {"a": "b"}),
        ("example.com/x_y-z=1", {"example.com/x_y-z": "1"}),
        ("k=" + "v" * 253, {"k": "v" * 253}),
    ],
)
def test_label_selector_parses(selector: str, expected: dict[str, str]) -> None:
    assert validate_label_selector(selector) == (expected, [])


@pytest.mark.parametrize(
    ("selector", "count"),
    [
        ("a", 1),
        ("=b", 1),
        ("a=b,", 1),
        (",", 2),
        ("a b=c", 1),
        ("k=" + "v" * 254, 1),
        ("a=b,a=c", 1),
        ("x,y,z=1", 2),
        ("k" * 64 + "=v", 1),
    ],
)
def test_label_selector_reports_every_bad_term(selector: str, count: int) -> None:
    selected, violations = validate_label_selector(selector)
    assert selected == {}
    assert fields(violations) == ["label_selector"] * count


# ---- properties ----

_BOUNDARY_INTS = [
    0, 1, 2, 3, 16, 17, 25, 100, 101, 1000, 1001, 10_000, 10_001, 65535, 65536, 100_000,
    100_001, 1_000_000, 1_000_001, 1_024_000, 1_024_001, 1_048_576, 1_048_577,
    999_999_999, 1_000_000_000, 3600, 3601, 86400, 86401,
]
_INT_LIMITS = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_ENUM: (-(2**31), 2**31 - 1),
}
_TEXT = st.one_of(
    st.sampled_from(["", " ", "a", "A", "PORT", "/", "/x", "a-", "x" * 64, "v" * 254]),
    st.text(st.characters(codec="utf-8"), max_size=20),
)


def _ints(low: int, high: int) -> st.SearchStrategy[int]:
    near = [n for base in _BOUNDARY_INTS for n in (base, -base) if low <= n <= high]
    return st.one_of(st.sampled_from(near), st.integers(low, high))


def _scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    if field.type in _INT_LIMITS:
        return _ints(*_INT_LIMITS[field.type])
    if field.type == FieldDescriptor.TYPE_DOUBLE:
        return st.one_of(st.floats(), st.sampled_from([0.0, 1e6, 1e6 + 1, -0.0]))
    if field.type == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if field.type == FieldDescriptor.TYPE_STRING:
        return _TEXT
    raise NotImplementedError(f"no strategy for field type {field.type} of {field.full_name}")


@st.composite
def arbitrary_messages(draw: st.DrawFn, descriptor: Descriptor) -> Message:
    """Any message of this type: each field independently unset or set to any value."""
    message = message_factory.GetMessageClass(descriptor)()
    chosen_oneof_fields = {
        draw(st.sampled_from([None, *oneof.fields])) for oneof in descriptor.oneofs
    }
    for field in descriptor.fields:
        if field.containing_oneof is not None and field not in chosen_oneof_fields:
            continue
        if field.containing_oneof is None and not draw(st.booleans()):
            continue
        target = getattr(message, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            target.update(draw(st.dictionaries(_TEXT, _scalar(value_field), max_size=4)))
        elif field.is_repeated:
            target.extend(draw(st.lists(_scalar(field), max_size=3)))
        elif field.message_type is not None:
            target.SetInParent()
            target.MergeFrom(draw(arbitrary_messages(field.message_type)))
        else:
            setattr(message, field.name, draw(_scalar(field)))
    return message


def arbitrary_deployments() -> st.SearchStrategy[deployment_pb2.Deployment]:
    return arbitrary_messages(deployment_pb2.Deployment.DESCRIPTOR)  # type: ignore[return-value]


def arbitrary_specs() -> st.SearchStrategy[deployment_pb2.DeploymentSpec]:
    spec_descriptor = deployment_pb2.DeploymentSpec.DESCRIPTOR
    return arbitrary_messages(spec_descriptor)  # type: ignore[return-value]


_NAMES = st.from_regex(r"[a-z]([a-z0-9-]{0,61}[a-z0-9])?", fullmatch=True)
_LABEL_KEYS = st.from_regex(r"[A-Za-z0-9._/-]{1,63}", fullmatch=True)
_LABELS = st.dictionaries(_LABEL_KEYS, st.text(max_size=253), max_size=5)
_ENV_KEYS = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,20}", fullmatch=True).filter(
    lambda key: key not in RESERVED_ENV_KEYS
)
_SAFE_TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\x00"))


def _durations(low: int, high: int) -> st.SearchStrategy[duration_pb2.Duration | None]:
    def build(nanos: int) -> duration_pb2.Duration:
        duration = duration_pb2.Duration()
        duration.FromNanoseconds(nanos)
        return duration

    return st.none() | st.integers(low, high).map(build)


def _set_duration(target: duration_pb2.Duration, value: duration_pb2.Duration | None) -> None:
    if value is not None:
        target.SetInParent()
        target.CopyFrom(value)


@st.composite
def _probes(draw: st.DrawFn) -> deployment_pb2.Probe:
    probe = deployment_pb2.Probe()
    action = draw(st.sampled_from(["grpc", "http_get", "tcp_socket", "exec"]))
    if action == "grpc":
        probe.grpc.port = draw(st.integers(0, 65535))
        probe.grpc.service = draw(_SAFE_TEXT)
    elif action == "http_get":
        probe.http_get.port = draw(st.integers(0, 65535))
        probe.http_get.path = draw(
            st.just("") | st.from_regex(r"/[a-z0-9/?=&%.-]*", fullmatch=True)
        )
    elif action == "tcp_socket":
        probe.tcp_socket.port = draw(st.integers(0, 65535))
    else:
        program = draw(st.from_regex(r"[a-z/]{1,10}", fullmatch=True))
        probe.exec.command.extend([program, *draw(st.lists(_SAFE_TEXT, max_size=3))])
    _set_duration(probe.initial_delay, draw(_durations(0, 3600 * _S)))
    _set_duration(probe.period, draw(_durations(_S // 10, 3600 * _S)))
    _set_duration(probe.timeout, draw(_durations(_S // 10, 3600 * _S)))
    probe.failure_threshold = draw(st.integers(0, 1000))
    probe.success_threshold = draw(st.integers(0, 1000))
    return probe


@st.composite
def valid_deployments(draw: st.DrawFn) -> deployment_pb2.Deployment:
    """Deployments that satisfy every rule, spread over each field's whole valid range."""
    deployment = deployment_pb2.Deployment(name=draw(_NAMES), labels=draw(_LABELS))
    spec = deployment.spec
    if draw(st.booleans()):
        spec.command = draw(_SAFE_TEXT.filter(lambda text: text.strip() != ""))
    else:
        spec.image = draw(st.from_regex(r"[a-z0-9./:@-]{1,40}", fullmatch=True))
    spec.port = draw(st.integers(0, 65535))
    spec.env.update(draw(st.dictionaries(_ENV_KEYS, _SAFE_TEXT, max_size=5)))
    if draw(st.booleans()):
        spec.gpu.count = draw(st.integers(0, 16))
    else:
        spec.gpu.memory_mib = draw(st.integers(0, 1_048_576))
        if spec.gpu.memory_mib > 0:
            spec.gpu.core_percent = draw(st.integers(0, 100))
    spec.cpu_millis = draw(st.integers(0, 1_024_000))
    spec.memory_mib = draw(st.integers(0, 2**64 - 1))
    spec.scaling.max_instances = draw(st.integers(0, 1000))
    spec.scaling.min_instances = draw(st.integers(0, spec.scaling.max_instances or 1))
    spec.scaling.target_concurrency = draw(st.integers(0, 2**32 - 1))
    _set_duration(spec.scaling.idle_retention, draw(_durations(0, 86400 * _S)))
    _set_duration(spec.scaling.scale_up_delay, draw(_durations(0, 3600 * _S)))
    _set_duration(spec.scaling.scale_down_delay, draw(_durations(0, 3600 * _S)))
    spec.traffic.max_request_concurrency = draw(st.integers(0, 10_000))
    spec.traffic.max_streams_per_connection = draw(st.integers(0, 10_000))
    if draw(st.booleans()):
        spec.traffic.max_queue_size = draw(st.integers(0, 100_000))
    _set_duration(spec.traffic.queue_timeout, draw(_durations(0, 3600 * _S)))
    spec.traffic.rate_limit_per_second = draw(
        st.floats(0.0, 1_000_000.0) | st.sampled_from([0.0, 1e-300, 0.5, 999_999.5, 1e6])
    )
    spec.traffic.rate_limit_burst = draw(st.integers(0, 1_000_000))
    for name in ("readiness_probe", "liveness_probe", "startup_probe"):
        if draw(st.booleans()):
            getattr(spec, name).CopyFrom(draw(_probes()))
    _set_duration(spec.termination_grace_period, draw(_durations(0, 3600 * _S)))
    surge = draw(st.none() | st.integers(0, 100))
    if surge is not None:
        spec.rollout.max_surge_percent = surge
    spec.rollout.max_unavailable_percent = draw(
        st.integers(1 if surge == 0 else 0, 100)
    )
    spec.spread_policy = draw(st.sampled_from(deployment_pb2.SpreadPolicy.values()))
    spec.node_selector.update(draw(_LABELS))
    if draw(st.booleans()):
        spec.service = draw(_NAMES)
        spec.service_weight = draw(st.integers(0, 1000))
    spec.restart_on_gpu_memory_overrun = draw(st.booleans())
    return deployment


_PROPERTY_SETTINGS = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@_PROPERTY_SETTINGS
@given(arbitrary_deployments())
def test_validate_never_raises_and_returns_field_paths(
    deployment: deployment_pb2.Deployment,
) -> None:
    violations = validate_deployment(deployment)
    for violation in violations:
        assert violation.field.split(".")[0].split("[")[0] in {"name", "labels", "spec"}
        assert violation.description


@_PROPERTY_SETTINGS
@given(arbitrary_deployments())
def test_defaults_do_not_change_the_verdict(deployment: deployment_pb2.Deployment) -> None:
    defaulted = deployment_pb2.Deployment()
    defaulted.CopyFrom(deployment)
    defaulted.spec.CopyFrom(with_defaults(deployment.spec))
    assert sorted(set(fields(validate_deployment(defaulted)))) == sorted(
        set(fields(validate_deployment(deployment)))
    )


@_PROPERTY_SETTINGS
@given(valid_deployments())
def test_valid_deployments_stay_valid_with_defaults(
    deployment: deployment_pb2.Deployment,
) -> None:
    assert validate_deployment(deployment) == []
    deployment.spec.CopyFrom(with_defaults(deployment.spec))
    assert validate_deployment(deployment) == []


@_PROPERTY_SETTINGS
@given(st.text(max_size=40))
def test_label_selector_never_raises(selector: str) -> None:
    selected, violations = validate_label_selector(selector)
    assert not (selected and violations)


_SELECTOR_VALUES = st.text(
    st.characters(codec="utf-8", exclude_characters=",="), max_size=30
).map(str.strip)


@_PROPERTY_SETTINGS
@given(st.dictionaries(_LABEL_KEYS, _SELECTOR_VALUES, min_size=1, max_size=5))
def test_label_selector_round_trips(labels: dict[str, str]) -> None:
    selector = ",".join(f"{key}={value}" for key, value in labels.items())
    assert validate_label_selector(selector) == (labels, [])
