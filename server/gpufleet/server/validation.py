"""Deployment spec validation: every rule deployment.proto states, all violations at once.

Pure functions, no I/O. Each FieldViolation names a field by its path relative to the
Deployment message (proto field names joined with ".", map keys as ["key"] JSON-escaped,
list items as [i]), ready to become a google.rpc.BadRequest.FieldViolation.

Validating a spec before or after spec_defaults.with_defaults gives the same verdict: an
unset field is read as its default here, and with_defaults never turns a bad value good.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

from google.protobuf import duration_pb2

from gpufleet.server.spec_defaults import DEFAULT_MAX_INSTANCES, DEFAULT_MAX_SURGE_PERCENT
from gpufleet.v1 import deployment_pb2

NAME_MAX_LENGTH = 63
LABEL_KEY_MAX_LENGTH = 63
LABEL_VALUE_MAX_LENGTH = 253
MAX_LABELS = 64
MAX_ENV_ENTRIES = 128
MAX_PORT = 65535
MAX_GPU_COUNT = 16
MAX_GPU_MEMORY_MIB = 1_048_576
MAX_GPU_CORE_PERCENT = 100
MAX_CPU_MILLIS = 1_024_000
MAX_INSTANCES_LIMIT = 1000
MAX_REQUEST_CONCURRENCY = 10_000
MAX_STREAMS_PER_CONNECTION = 10_000
MAX_QUEUE_SIZE = 100_000
MAX_RATE_LIMIT_PER_SECOND = 1_000_000
MAX_RATE_LIMIT_BURST = 1_000_000
MAX_PROBE_THRESHOLD = 1000
MAX_SERVICE_WEIGHT = 1000
MAX_PERCENT = 100

# The agent sets these for every instance; a user value would break port assignment or
# GPU isolation, so it is refused rather than silently overwritten.
RESERVED_ENV_KEYS = frozenset(
    {
        "PORT",
        "CUDA_VISIBLE_DEVICES",
        "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE",
        "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT",
    }
)

_NAME_RULE = (
    "a name is 1-63 characters of lowercase letters a-z, digits 0-9 and '-', "
    "starting with a letter and not ending with '-'"
)
_LABEL_KEY_RULE = "must be 1-63 characters of letters, digits, '.', '_', '/' and '-'"
_NAME_CHARS = re.compile(r"[a-z0-9-]*")
_LABEL_KEY = re.compile(rf"[A-Za-z0-9._/-]{{1,{LABEL_KEY_MAX_LENGTH}}}")
_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Image references and probe paths end up in argv and HTTP request lines, where whitespace
# or control characters would split or corrupt them.
_WHITESPACE_OR_CONTROL = re.compile(r"[\x00-\x20\x7f]")

_NANOS_PER_SECOND = 1_000_000_000
_MAX_NANOS = 999_999_999
_SHOWN_STRING_LENGTH = 80


@dataclass(frozen=True)
class FieldViolation:
    """One invalid field."""

    field: str
    """Path relative to the Deployment message, e.g. "spec.gpu.core_percent"."""
    description: str
    """What is wrong and how to fix it."""


def validate_deployment(deployment: deployment_pb2.Deployment) -> list[FieldViolation]:
    """Check name, labels and spec; return every violation (empty when valid).

    Output-only fields (status, revision, generation, timestamps) are ignored.
    """
    out = validate_name(deployment.name)
    _check_string_map(out, "labels", deployment.labels, "labels")
    _check_spec(out, deployment.spec)
    return out


def validate_name(name: str, field: str = "name") -> list[FieldViolation]:
    """Check a deployment or service name: 1-63 of [a-z0-9-], letter first, no '-' last."""
    problem = _name_problem(name)
    if problem is None:
        return []
    return [FieldViolation(field, f"{problem}; {_NAME_RULE}")]


def validate_scale(
    spec: deployment_pb2.DeploymentSpec,
    min_instances: int | None,
    max_instances: int | None,
) -> list[FieldViolation]:
    """Check new instance bounds (None = keep the spec's) against each other and the spec.

    Fields are "min_instances" and "max_instances", as in ScaleDeploymentRequest.
    """
    out: list[FieldViolation] = []
    if min_instances is not None:
        _check_range(out, "min_instances", min_instances, 0, MAX_INSTANCES_LIMIT, "instances")
    if max_instances is not None:
        _check_range(out, "max_instances", max_instances, 1, MAX_INSTANCES_LIMIT, "instances")
    if out:
        return out
    new_min = spec.scaling.min_instances if min_instances is None else min_instances
    new_max = _effective_max_instances(spec.scaling) if max_instances is None else max_instances
    if new_min <= new_max:
        return out
    if min_instances is not None and max_instances is not None:
        out.append(
            FieldViolation(
                "min_instances",
                f"must be at most max_instances ({max_instances}); got {min_instances}",
            )
        )
    elif min_instances is not None:
        out.append(
            FieldViolation(
                "min_instances",
                f"must be at most the deployment's max_instances ({new_max}); got "
                f"{min_instances}; raise max_instances in the same call",
            )
        )
    else:
        out.append(
            FieldViolation(
                "max_instances",
                f"must be at least the deployment's min_instances ({new_min}); got "
                f"{max_instances}; lower min_instances in the same call",
            )
        )
    return out


def validate_label_selector(selector: str) -> tuple[dict[str, str], list[FieldViolation]]:
    """Parse "k1=v1,k2=v2" into a dict; an empty or blank selector selects everything.

    Whitespace around keys and values is ignored. On any violation the dict is empty.
    """
    field = "label_selector"
    if selector.strip() == "":
        return {}, []
    selected: dict[str, str] = {}
    out: list[FieldViolation] = []
    for term in selector.split(","):
        key, equals, value = (part.strip() for part in term.partition("="))
        if not equals:
            out.append(
                FieldViolation(
                    field,
                    f"term {_show(term.strip())} is not key=value; write key=value pairs "
                    'separated by commas, e.g. "team=ml,tier=prod"',
                )
            )
        elif _LABEL_KEY.fullmatch(key) is None:
            out.append(FieldViolation(field, f"label key {_show(key)} {_LABEL_KEY_RULE}"))
        elif len(value) > LABEL_VALUE_MAX_LENGTH:
            out.append(
                FieldViolation(
                    field,
                    f"value of label {_show(key)} must be at most {LABEL_VALUE_MAX_LENGTH} "
                    f"characters; got {len(value)}",
                )
            )
        elif selected.get(key, value) != value:
            out.append(
                FieldViolation(
                    field,
                    f"label {_show(key)} is selected with two different values "
                    f"({_show(selected[key])} and {_show(value)}), which no deployment can "
                    "match; keep one",
                )
            )
        else:
            selected[key] = value
    return ({} if out else selected), out


def _check_spec(out: list[FieldViolation], spec: deployment_pb2.DeploymentSpec) -> None:
    _check_command_and_image(out, spec)
    _check_range(out, "spec.port", spec.port, 0, MAX_PORT, "(0 lets the agent pick a port)")
    _check_env(out, spec)
    _check_gpu(out, spec.gpu)
    _check_range(
        out,
        "spec.cpu_millis",
        spec.cpu_millis,
        0,
        MAX_CPU_MILLIS,
        "millicores (1000 = one core; 0 means no reservation)",
    )
    _check_scaling(out, spec.scaling)
    _check_traffic(out, spec.traffic)
    if spec.HasField("readiness_probe"):
        _check_probe(out, "spec.readiness_probe", spec.readiness_probe)
    if spec.HasField("liveness_probe"):
        _check_probe(out, "spec.liveness_probe", spec.liveness_probe)
    if spec.HasField("startup_probe"):
        _check_probe(out, "spec.startup_probe", spec.startup_probe)
    _check_duration(
        out,
        "spec.termination_grace_period",
        spec.termination_grace_period,
        spec.HasField("termination_grace_period"),
        0,
        3600,
    )
    _check_rollout(out, spec.rollout)
    if spec.spread_policy not in deployment_pb2.SpreadPolicy.values():
        out.append(
            FieldViolation(
                "spec.spread_policy",
                "must be SPREAD_POLICY_BINPACK, SPREAD_POLICY_SPREAD or unset (binpack); got "
                f"unknown value {spec.spread_policy}",
            )
        )
    _check_string_map(out, "spec.node_selector", spec.node_selector, "node selector labels")
    _check_service(out, spec)


def _check_command_and_image(
    out: list[FieldViolation], spec: deployment_pb2.DeploymentSpec
) -> None:
    has_command = spec.command.strip() != ""
    has_image = spec.image.strip() != ""
    if has_command and has_image:
        out.append(
            FieldViolation(
                "spec.command",
                "set exactly one of command and image; both are set, remove one",
            )
        )
    elif not has_command and not has_image:
        out.append(
            FieldViolation(
                "spec.command",
                "set exactly one of command (run through /bin/sh -c on the node) and image "
                "(container image); neither is set",
            )
        )
    if "\x00" in spec.command:
        out.append(FieldViolation("spec.command", "must not contain a NUL character"))
    if has_image and _WHITESPACE_OR_CONTROL.search(spec.image):
        out.append(
            FieldViolation(
                "spec.image",
                f"must be an image reference without whitespace or control characters; got "
                f"{_show(spec.image)}",
            )
        )


def _check_env(out: list[FieldViolation], spec: deployment_pb2.DeploymentSpec) -> None:
    if len(spec.env) > MAX_ENV_ENTRIES:
        out.append(
            FieldViolation(
                "spec.env",
                f"must have at most {MAX_ENV_ENTRIES} entries; got {len(spec.env)}",
            )
        )
    for key in sorted(spec.env):
        path = f"spec.env{_map_key(key)}"
        if key in RESERVED_ENV_KEYS:
            out.append(
                FieldViolation(
                    path,
                    f"{key} is set by the platform for every instance and cannot be given; "
                    "remove it (read $PORT for the port, the GPU share comes from spec.gpu)",
                )
            )
        elif _ENV_KEY.fullmatch(key) is None:
            out.append(
                FieldViolation(
                    path,
                    "key must match [A-Za-z_][A-Za-z0-9_]* (a letter or '_' first, then "
                    f"letters, digits, '_'); got {_show(key)}",
                )
            )
        if "\x00" in spec.env[key]:
            out.append(FieldViolation(path, "value must not contain a NUL character"))


def _check_gpu(out: list[FieldViolation], gpu: deployment_pb2.GpuRequest) -> None:
    count_ok = _check_range(out, "spec.gpu.count", gpu.count, 0, MAX_GPU_COUNT, "whole GPUs")
    memory_ok = _check_range(
        out, "spec.gpu.memory_mib", gpu.memory_mib, 0, MAX_GPU_MEMORY_MIB, "MiB of GPU memory"
    )
    core_ok = _check_range(
        out,
        "spec.gpu.core_percent",
        gpu.core_percent,
        0,
        MAX_GPU_CORE_PERCENT,
        "(percent of one GPU's SMs; 0 means not limited)",
    )
    # The combination rules are checked only on in-range values: one message per mistake.
    if count_ok and gpu.count > 0:
        for name, value, ok in (
            ("memory_mib", gpu.memory_mib, memory_ok),
            ("core_percent", gpu.core_percent, core_ok),
        ):
            if ok and value != 0:
                out.append(
                    FieldViolation(
                        f"spec.gpu.{name}",
                        f"must be 0 when gpu.count is set (whole GPUs are not shared); got "
                        f"{value}; set count 0 for a share of one GPU, or drop {name}",
                    )
                )
    elif count_ok and core_ok and gpu.core_percent > 0 and gpu.memory_mib == 0:
        out.append(
            FieldViolation(
                "spec.gpu.core_percent",
                "needs gpu.memory_mib > 0: a share of one GPU states its memory; set "
                "gpu.memory_mib, or gpu.count for whole GPUs",
            )
        )


def _check_scaling(out: list[FieldViolation], scaling: deployment_pb2.ScalingSpec) -> None:
    min_ok = _check_range(
        out,
        "spec.scaling.min_instances",
        scaling.min_instances,
        0,
        MAX_INSTANCES_LIMIT,
        "instances (0 scales to zero)",
    )
    # 0 means unset (default 1), so only a set value is range-checked.
    max_ok = scaling.max_instances == 0 or _check_range(
        out,
        "spec.scaling.max_instances",
        scaling.max_instances,
        1,
        MAX_INSTANCES_LIMIT,
        "instances (unset means 1)",
    )
    effective_max = _effective_max_instances(scaling)
    if min_ok and max_ok and scaling.min_instances > effective_max:
        shown_max = f"{effective_max}" if scaling.max_instances else "unset, which means 1"
        out.append(
            FieldViolation(
                "spec.scaling.min_instances",
                f"must be at most max_instances ({shown_max}); got {scaling.min_instances}; "
                "raise max_instances or lower min_instances",
            )
        )
    _check_duration(
        out,
        "spec.scaling.idle_retention",
        scaling.idle_retention,
        scaling.HasField("idle_retention"),
        0,
        86400,
    )
    _check_duration(
        out,
        "spec.scaling.scale_up_delay",
        scaling.scale_up_delay,
        scaling.HasField("scale_up_delay"),
        0,
        3600,
    )
    _check_duration(
        out,
        "spec.scaling.scale_down_delay",
        scaling.scale_down_delay,
        scaling.HasField("scale_down_delay"),
        0,
        3600,
    )


def _check_traffic(out: list[FieldViolation], traffic: deployment_pb2.TrafficSpec) -> None:
    if traffic.max_request_concurrency != 0:
        _check_range(
            out,
            "spec.traffic.max_request_concurrency",
            traffic.max_request_concurrency,
            1,
            MAX_REQUEST_CONCURRENCY,
            "calls per instance (unset means 1)",
        )
    _check_range(
        out,
        "spec.traffic.max_streams_per_connection",
        traffic.max_streams_per_connection,
        0,
        MAX_STREAMS_PER_CONNECTION,
        "calls per connection (0 means not limited)",
    )
    if traffic.HasField("max_queue_size"):
        _check_range(
            out,
            "spec.traffic.max_queue_size",
            traffic.max_queue_size,
            0,
            MAX_QUEUE_SIZE,
            "waiting calls (0 means no queue; unset means 100)",
        )
    _check_duration(
        out,
        "spec.traffic.queue_timeout",
        traffic.queue_timeout,
        traffic.HasField("queue_timeout"),
        0,
        3600,
    )
    rate = traffic.rate_limit_per_second
    if not (math.isfinite(rate) and 0.0 <= rate <= MAX_RATE_LIMIT_PER_SECOND):
        out.append(
            FieldViolation(
                "spec.traffic.rate_limit_per_second",
                f"must be a finite number of calls per second, 0-{MAX_RATE_LIMIT_PER_SECOND} "
                f"(0 means no limit); got {rate!r}",
            )
        )
    _check_range(
        out,
        "spec.traffic.rate_limit_burst",
        traffic.rate_limit_burst,
        0,
        MAX_RATE_LIMIT_BURST,
        "calls (0 means ceil(rate_limit_per_second))",
    )


def _check_probe(out: list[FieldViolation], path: str, probe: deployment_pb2.Probe) -> None:
    action = probe.WhichOneof("action")
    if action is None:
        out.append(
            FieldViolation(
                path,
                "must set exactly one action: grpc, http_get, tcp_socket or exec; none is set",
            )
        )
    elif action == "grpc":
        _check_probe_port(out, f"{path}.grpc.port", probe.grpc.port)
    elif action == "http_get":
        _check_probe_port(out, f"{path}.http_get.port", probe.http_get.port)
        _check_http_path(out, f"{path}.http_get.path", probe.http_get.path)
    elif action == "tcp_socket":
        _check_probe_port(out, f"{path}.tcp_socket.port", probe.tcp_socket.port)
    else:
        _check_exec_command(out, f"{path}.exec.command", list(probe.exec.command))
    _check_duration(
        out,
        f"{path}.initial_delay",
        probe.initial_delay,
        probe.HasField("initial_delay"),
        0,
        3600,
    )
    _check_duration(
        out, f"{path}.period", probe.period, probe.HasField("period"), 0.1, 3600
    )
    _check_duration(
        out, f"{path}.timeout", probe.timeout, probe.HasField("timeout"), 0.1, 3600
    )
    for name, value, default in (
        ("failure_threshold", probe.failure_threshold, 3),
        ("success_threshold", probe.success_threshold, 1),
    ):
        if value != 0:
            _check_range(
                out,
                f"{path}.{name}",
                value,
                1,
                MAX_PROBE_THRESHOLD,
                f"consecutive checks (unset means {default})",
            )


def _check_probe_port(out: list[FieldViolation], path: str, port: int) -> None:
    _check_range(out, path, port, 0, MAX_PORT, "(0 means the deployment port)")


def _check_http_path(out: list[FieldViolation], path: str, value: str) -> None:
    if value == "":
        return
    if not value.startswith("/"):
        out.append(
            FieldViolation(path, f'must start with "/" (e.g. "/healthz"); got {_show(value)}')
        )
    elif _WHITESPACE_OR_CONTROL.search(value):
        out.append(
            FieldViolation(
                path,
                "must not contain whitespace or control characters (percent-encode them); "
                f"got {_show(value)}",
            )
        )


def _check_exec_command(out: list[FieldViolation], path: str, command: list[str]) -> None:
    if not command:
        out.append(
            FieldViolation(
                path,
                "must have at least one element: the program, then its arguments (no shell)",
            )
        )
        return
    if command[0].strip() == "":
        out.append(FieldViolation(f"{path}[0]", "must name the program to run; got empty"))
    for index, argument in enumerate(command):
        if "\x00" in argument:
            out.append(
                FieldViolation(f"{path}[{index}]", "must not contain a NUL character")
            )


def _check_rollout(out: list[FieldViolation], rollout: deployment_pb2.RolloutSpec) -> None:
    surge_set = rollout.HasField("max_surge_percent")
    surge = rollout.max_surge_percent if surge_set else DEFAULT_MAX_SURGE_PERCENT
    surge_ok = _check_range(
        out,
        "spec.rollout.max_surge_percent",
        surge,
        0,
        MAX_PERCENT,
        "percent (unset means 25)",
    )
    unavailable_ok = _check_range(
        out,
        "spec.rollout.max_unavailable_percent",
        rollout.max_unavailable_percent,
        0,
        MAX_PERCENT,
        "percent",
    )
    if surge_ok and unavailable_ok and surge == 0 and rollout.max_unavailable_percent == 0:
        out.append(
            FieldViolation(
                "spec.rollout.max_surge_percent",
                "max_surge_percent and max_unavailable_percent cannot both be 0: a rolling "
                "update could never replace an instance; raise one of them",
            )
        )


def _check_service(out: list[FieldViolation], spec: deployment_pb2.DeploymentSpec) -> None:
    if spec.service != "":
        out.extend(validate_name(spec.service, "spec.service"))
    weight_ok = _check_range(
        out,
        "spec.service_weight",
        spec.service_weight,
        0,
        MAX_SERVICE_WEIGHT,
        "(0 takes no service traffic)",
    )
    if weight_ok and spec.service_weight > 0 and spec.service == "":
        out.append(
            FieldViolation(
                "spec.service_weight",
                f"needs spec.service: a weight only splits a service's traffic; got "
                f"{spec.service_weight} with no service; set service or drop the weight",
            )
        )


def _check_string_map(
    out: list[FieldViolation], path: str, entries: Mapping[str, str], what: str
) -> None:
    if len(entries) > MAX_LABELS:
        out.append(
            FieldViolation(path, f"must have at most {MAX_LABELS} {what}; got {len(entries)}")
        )
    for key in sorted(entries):
        entry_path = f"{path}{_map_key(key)}"
        if _LABEL_KEY.fullmatch(key) is None:
            out.append(FieldViolation(entry_path, f"key {_LABEL_KEY_RULE}; got {_show(key)}"))
        value = entries[key]
        if len(value) > LABEL_VALUE_MAX_LENGTH:
            out.append(
                FieldViolation(
                    entry_path,
                    f"value must be at most {LABEL_VALUE_MAX_LENGTH} characters; got "
                    f"{len(value)}",
                )
            )


def _check_duration(
    out: list[FieldViolation],
    path: str,
    duration: duration_pb2.Duration,
    present: bool,
    low_seconds: float,
    high_seconds: int,
) -> bool:
    """Check a Duration field when present (unset means its default); True when valid."""
    if not present:
        return True
    seconds, nanos = duration.seconds, duration.nanos
    if not -_MAX_NANOS <= nanos <= _MAX_NANOS:
        out.append(
            FieldViolation(
                f"{path}.nanos",
                f"must be between -{_MAX_NANOS} and {_MAX_NANOS}; got {nanos}; carry whole "
                "seconds into seconds",
            )
        )
        return False
    if (seconds > 0 and nanos < 0) or (seconds < 0 and nanos > 0):
        out.append(
            FieldViolation(
                f"{path}.nanos",
                f"must have the same sign as seconds; got seconds {seconds}, nanos {nanos}",
            )
        )
        return False
    total = seconds * _NANOS_PER_SECOND + nanos
    low = round(low_seconds * _NANOS_PER_SECOND)
    high = high_seconds * _NANOS_PER_SECOND
    if total < 0 or not low <= total <= high:
        sign = "must not be negative; " if total < 0 else ""
        out.append(
            FieldViolation(
                path,
                f"{sign}must be {low_seconds:g}-{high_seconds} s; got {_seconds(total)}",
            )
        )
        return False
    return True


def _check_range(
    out: list[FieldViolation], path: str, value: int, low: int, high: int, unit: str
) -> bool:
    """Append a violation unless low <= value <= high; True when in range."""
    if low <= value <= high:
        return True
    out.append(FieldViolation(path, f"must be {low}-{high} {unit}; got {value}"))
    return False


def _effective_max_instances(scaling: deployment_pb2.ScalingSpec) -> int:
    return scaling.max_instances or DEFAULT_MAX_INSTANCES


def _name_problem(name: str) -> str | None:
    if name == "":
        return "is required"
    if len(name) > NAME_MAX_LENGTH:
        return f"must be at most {NAME_MAX_LENGTH} characters; got {len(name)}"
    if _NAME_CHARS.fullmatch(name) is None:
        bad = next(char for char in name if _NAME_CHARS.fullmatch(char) is None)
        return f"contains {_show(bad)} in {_show(name)}"
    if not "a" <= name[0] <= "z":
        return f"must start with a letter; got {_show(name)}"
    if name.endswith("-"):
        return f"must not end with '-'; got {_show(name)}"
    return None


def _map_key(key: str) -> str:
    return f"[{json.dumps(key, ensure_ascii=False)}]"


def _show(value: str) -> str:
    """Quote a user string for a message, cut short so one field cannot flood the reply."""
    if len(value) > _SHOWN_STRING_LENGTH:
        value = value[:_SHOWN_STRING_LENGTH] + "..."
    return json.dumps(value, ensure_ascii=False)


def _seconds(total_nanos: int) -> str:
    whole, fraction = divmod(abs(total_nanos), _NANOS_PER_SECOND)
    sign = "-" if total_nanos < 0 else ""
    if fraction == 0:
        return f"{sign}{whole} s"
    return f"{sign}{whole}.{fraction:09d}".rstrip("0") + " s"
