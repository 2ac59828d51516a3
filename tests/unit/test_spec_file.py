"""Spec files: YAML/JSON by content, several documents, durations, enums, error paths."""

from __future__ import annotations

import io
import json

import pytest
import yaml
from google.protobuf import json_format

from gpufleet.client.spec_file import SpecFileError, load_spec_file, parse_spec_text
from gpufleet.v1 import deployment_pb2

ECHO_YAML = """\
name: echo
labels: {team: vision}
spec:
  command: python -m examples.model_server --port $PORT
  port: 0
  gpu: {memory_mib: 2048, core_percent: 25}
  scaling: {min_instances: 2, max_instances: 4, idle_retention: 300s}
  traffic: {max_request_concurrency: 2, max_queue_size: 100, queue_timeout: 30s}
  readiness_probe: {grpc: {}, period: 1s}
"""


def _error(text: str, source: str = "spec.yaml") -> SpecFileError:
    with pytest.raises(SpecFileError) as info:
        parse_spec_text(text, source)
    return info.value


def test_yaml_document_becomes_a_deployment() -> None:
    [deployment] = parse_spec_text(ECHO_YAML, "echo.yaml")
    assert deployment.name == "echo"
    assert dict(deployment.labels) == {"team": "vision"}
    spec = deployment.spec
    assert spec.command == "python -m examples.model_server --port $PORT"
    assert (spec.gpu.memory_mib, spec.gpu.core_percent) == (2048, 25)
    assert (spec.scaling.min_instances, spec.scaling.max_instances) == (2, 4)
    assert spec.scaling.idle_retention.seconds == 300
    assert spec.traffic.HasField("max_queue_size") and spec.traffic.max_queue_size == 100
    assert spec.traffic.queue_timeout.seconds == 30
    assert spec.readiness_probe.WhichOneof("action") == "grpc"
    assert spec.readiness_probe.period.seconds == 1


def test_json_is_read_by_content_and_matches_yaml() -> None:
    as_json = json.dumps(yaml.safe_load(ECHO_YAML))
    assert parse_spec_text(as_json, "echo.yaml") == parse_spec_text(ECHO_YAML, "x")


def test_json_accepts_camel_case_field_names() -> None:
    text = json.dumps({"name": "a", "spec": {"gpu": {"memoryMib": 512, "corePercent": 10}}})
    [deployment] = parse_spec_text(text, "a.json")
    assert deployment.spec.gpu.memory_mib == 512 and deployment.spec.gpu.core_percent == 10


def test_several_yaml_documents_and_empty_ones_are_skipped() -> None:
    text = "---\nname: a\n---\n---\nname: b\nspec: {port: 9000}\n---\n"
    deployments = parse_spec_text(text, "two.yaml")
    assert [d.name for d in deployments] == ["a", "b"]
    assert deployments[1].spec.port == 9000


def test_a_list_document_holds_several_deployments() -> None:
    text = json.dumps([{"name": "a"}, {"name": "b"}])
    assert [d.name for d in parse_spec_text(text, "list.json")] == ["a", "b"]


@pytest.mark.parametrize(
    ("written", "seconds", "nanos"),
    [
        (30, 30, 0),
        (1.5, 1, 500_000_000),
        (0, 0, 0),
        ('"30"', 30, 0),
        ("30s", 30, 0),
        ("500ms", 0, 500_000_000),
        ("5m", 300, 0),
        ("1h30m", 5400, 0),
        ("1.25s", 1, 250_000_000),
    ],
)
def test_durations_accept_numbers_of_seconds_and_units(
    written: object, seconds: int, nanos: int
) -> None:
    [deployment] = parse_spec_text(f"name: a\nspec: {{traffic: {{queue_timeout: {written}}}}}", "d")
    timeout = deployment.spec.traffic.queue_timeout
    assert (timeout.seconds, timeout.nanos) == (seconds, nanos)


def test_numbers_as_durations_also_work_inside_nested_and_repeated_messages() -> None:
    text = (
        "name: a\nspec:\n  termination_grace_period: 10\n"
        "  startup_probe: {exec: {command: [true-cmd]}, initial_delay: 2, timeout: 0.25}\n"
    )
    [deployment] = parse_spec_text(text, "d")
    assert deployment.spec.termination_grace_period.seconds == 10
    probe = deployment.spec.startup_probe
    assert probe.initial_delay.seconds == 2 and probe.timeout.nanos == 250_000_000
    assert list(probe.exec.command) == ["true-cmd"]


def test_enums_accept_full_and_short_names() -> None:
    full = parse_spec_text("name: a\nspec: {spread_policy: SPREAD_POLICY_SPREAD}", "e")[0]
    short = parse_spec_text("name: a\nspec: {spread_policy: spread}", "e")[0]
    assert (
        full.spec.spread_policy == short.spec.spread_policy == deployment_pb2.SPREAD_POLICY_SPREAD
    )


def test_numeric_env_values_become_strings() -> None:
    [deployment] = parse_spec_text("name: a\nspec: {env: {WORKERS: 4, NAME: x}}", "e")
    assert dict(deployment.spec.env) == {"WORKERS": "4", "NAME": "x"}


def test_get_output_in_yaml_applies_again_unchanged() -> None:
    stored = parse_spec_text(ECHO_YAML, "echo.yaml")[0]
    stored.revision = 7
    stored.generation = 2
    stored.status.phase = deployment_pb2.DEPLOYMENT_PHASE_RUNNING
    stored.create_time.FromSeconds(1_700_000_000)
    printed = yaml.safe_dump(json_format.MessageToDict(stored, preserving_proto_field_name=True))
    assert parse_spec_text(printed, "got.yaml") == [stored]


def test_unknown_field_names_file_document_and_path() -> None:
    error = _error("name: a\n---\nname: b\nspec:\n  gpu: {cores: 2}\n")
    assert (error.source, error.document, error.path) == (
        "spec.yaml",
        "document 2",
        "spec.gpu.cores",
    )
    assert "unknown field" in error.message and "core_percent" in error.message
    assert str(error).startswith("spec.yaml: document 2: spec.gpu.cores: unknown field")


@pytest.mark.parametrize(
    ("text", "path", "expected"),
    [
        ("name: a\nspec: {gpu: {core_percent: many}}", "spec.gpu.core_percent", "whole number"),
        ("name: a\nspec: {port: -1}", "spec.port", "out of range"),
        ("name: a\nspec: {port: 70000000000}", "spec.port", "out of range"),
        (
            "name: a\nspec: {scaling: {idle_retention: 5 minutes}}",
            "spec.scaling.idle_retention",
            "duration",
        ),
        (
            "name: a\nspec: {scaling: {idle_retention: -5}}",
            "spec.scaling.idle_retention",
            "duration",
        ),
        ("name: a\nspec: {spread_policy: pack}", "spec.spread_policy", "SPREAD_POLICY_BINPACK"),
        (
            "name: a\nspec: {restart_on_gpu_memory_overrun: 1}",
            "spec.restart_on_gpu_memory_overrun",
            "true or false",
        ),
        ("name: a\nspec: {command: true}", "spec.command", "quote it"),
        ("name: a\nspec: {env: [A, B]}", "spec.env", "mapping"),
        (
            "name: a\nspec: {readiness_probe: {exec: {command: run}}}",
            "spec.readiness_probe.exec.command",
            "list",
        ),
        (
            "name: a\nspec: {readiness_probe: {exec: {command: [ok, [x]]}}}",
            "spec.readiness_probe.exec.command[1]",
            "string",
        ),
        (
            "name: a\nspec: {readiness_probe: {grpc: {}, tcp_socket: {}}}",
            "spec.readiness_probe",
            "only one of",
        ),
        ("name: a\nspec: 3", "spec", "mapping"),
        ("labels: {a: b}", "name", "required"),
    ],
)
def test_type_errors_name_the_field_path(text: str, path: str, expected: str) -> None:
    error = _error(text)
    assert error.path == path
    assert expected in error.message
    assert error.document == "document 1"


def test_a_document_that_is_not_a_mapping() -> None:
    error = _error("name: a\n---\n- 3\n")
    assert error.document == "document 2 item 1"
    assert "expected a mapping" in error.message


def test_invalid_yaml_and_json_report_line_numbers() -> None:
    assert "at line 2, column 7" in str(_error("name: a\nspec: @x\n"))
    assert "invalid JSON at line 1" in str(_error('{"name": "a",}'))


def test_an_empty_file_is_an_error() -> None:
    assert "empty" in str(_error("\n# nothing\n"))


def test_load_reads_files_and_stdin(tmp_path) -> None:
    path = tmp_path / "echo.yaml"
    path.write_text(ECHO_YAML)
    assert load_spec_file(str(path))[0].name == "echo"
    assert load_spec_file("-", io.StringIO(ECHO_YAML))[0].name == "echo"
    with pytest.raises(SpecFileError) as info:
        load_spec_file("-", io.StringIO("name: a\nspec: {bogus: 1}\n"))
    assert str(info.value).startswith("<stdin>: document 1: spec.bogus:")


def test_a_missing_file_is_a_clear_error(tmp_path) -> None:
    missing = tmp_path / "missing.yaml"
    with pytest.raises(SpecFileError) as info:
        load_spec_file(str(missing))
    assert str(missing) in str(info.value) and "cannot read" in str(info.value)
