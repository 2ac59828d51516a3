"""The example deployment specs parse into gpufleet.v1.Deployment and their commands serve."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from google.protobuf import json_format
from gpufleet.v1 import deployment_pb2

from tests.integration.test_example_model_server import (
    REPO_ROOT,
    SERVING,
    health_check,
    health_statuses,
    launch,
)

SPECS = ("echo.yaml", "tokens.yaml")


def load_spec(file_name: str) -> deployment_pb2.Deployment:
    document = yaml.safe_load((REPO_ROOT / "examples" / file_name).read_text(encoding="utf-8"))
    return json_format.ParseDict(document, deployment_pb2.Deployment())


def test_echo_spec() -> None:
    echo = load_spec("echo.yaml")
    spec = echo.spec
    assert echo.name == "echo" and dict(echo.labels) == {"example": "true"}
    assert spec.command == "python -m examples.model_server --port $PORT" and spec.port == 0
    assert (spec.gpu.count, spec.gpu.memory_mib, spec.gpu.core_percent) == (0, 2048, 25)
    assert (spec.scaling.min_instances, spec.scaling.max_instances) == (2, 4)
    assert spec.traffic.max_request_concurrency == 4
    assert spec.readiness_probe.WhichOneof("action") == "grpc"
    assert spec.readiness_probe.period.ToMilliseconds() == 500


def test_tokens_spec() -> None:
    tokens = load_spec("tokens.yaml")
    spec = tokens.spec
    assert tokens.name == "tokens"
    assert spec.command.startswith("python -m examples.model_server --port $PORT")
    assert (spec.gpu.memory_mib, spec.gpu.core_percent) == (4096, 25)
    assert (spec.scaling.min_instances, spec.scaling.max_instances) == (0, 1)
    assert spec.scaling.idle_retention.ToSeconds() == 30
    assert spec.traffic.max_request_concurrency == 2
    assert spec.readiness_probe.WhichOneof("action") == "grpc"


@pytest.mark.parametrize("file_name", SPECS)
def test_spec_command_serves_as_the_agent_runs_it(tmp_path: Path, file_name: str) -> None:
    spec = load_spec(file_name).spec
    # As the agent does: /bin/sh -c, repository root as working directory, $PORT set.
    server = launch(tmp_path, [spec.command], env={"PORT": "0"}, shell=True)
    try:
        assert health_statuses(server.address, until=SERVING)[-1] == SERVING
        assert health_check(server.address, "inference.GRPCInferenceService") == SERVING
    finally:
        server.stop()
    assert "model server ready after" in server.stderr()
    assert "stopping" in server.stderr()
