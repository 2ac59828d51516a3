"""`gpufleet invoke` as a real process against a real gateway (in-process, on port 0) that
routes to a real model server process; the control plane is scripted."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gpufleet.gateway.app import Gateway
from tests.integration.test_gateway_support import (
    INVOKE_TOKEN,
    REPO_ROOT,
    ModelServer,
    control_plane,
    route,
    running_gateway,
    start_model_server,
)

pytestmark = pytest.mark.timeout(60)

CLI_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Result:
    code: int
    stdout: str
    stderr: str


@pytest.fixture(scope="module")
def model_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelServer]:
    server = start_model_server(tmp_path_factory.mktemp("invoke"), "--token-delay-ms", "5")
    yield server
    server.stop()


@pytest.fixture
async def gateway(model_server: ModelServer) -> AsyncIterator[Gateway]:
    routes = (
        route("echo", [("echo-1", model_server.address)], max_request_concurrency=4),
        route("tokens", [("tokens-1", model_server.address)], max_request_concurrency=2),
        # No instance and no queue: every call is turned away at once.
        route("full", max_queue_size=0),
    )
    async with control_plane(*routes) as plane:
        async with running_gateway(plane) as running:
            yield running


async def invoke(gateway: str, *args: str, token: str | None = INVOKE_TOKEN) -> Result:
    """Run `gpufleet invoke` with the gateway and token from the environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUFLEET_")}
    env["GPUFLEET_GATEWAY"] = gateway
    if token is not None:
        env["GPUFLEET_INVOKE_TOKEN"] = token
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gpufleet.client.cli", "invoke", *args,
        cwd=REPO_ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), CLI_TIMEOUT_S)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return Result(process.returncode, stdout.decode(), stderr.decode())


async def test_unary_call_prints_outputs_and_the_serving_instance(gateway: Gateway) -> None:
    result = await invoke(gateway.address, "echo", "--input", "INPUT0=[[1, 2], [3, 4]]",
                          "--input", "INPUT1=hello world")
    assert result.code == 0, result.stderr
    assert result.stdout.splitlines() == [
        "OUTPUT0 INT64 [2,2]: [[1, 2], [3, 4]]",
        'OUTPUT1 BYTES [1]: ["hello world"]',
    ]
    assert "deploy-route-target: echo-1" in result.stderr.splitlines()


async def test_json_output_keeps_the_forced_datatype(gateway: Gateway) -> None:
    result = await invoke(gateway.address, "echo", "-i", "INPUT0=[1.5, -2]",
                          "--datatype", "INPUT0=FP64", "-o", "json")
    assert result.code == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["model_name"] == "echo"
    assert answer["outputs"] == [
        {"name": "OUTPUT0", "datatype": "FP64", "shape": [2], "data": [1.5, -2.0]}
    ]


async def test_stream_prints_tokens_as_they_arrive(gateway: Gateway) -> None:
    result = await invoke(gateway.address, "tokens", "--stream",
                          "--input", "PROMPT=one two three", "--input", "MAX_TOKENS=5")
    assert result.code == 0, result.stderr
    assert result.stdout == "one two three one two\n"
    assert "deploy-route-target: tokens-1" in result.stderr


async def test_stream_as_json_lines_ends_with_the_final_response(gateway: Gateway) -> None:
    result = await invoke(gateway.address, "tokens", "--stream", "-o", "json",
                          "--input", "PROMPT=a b", "--input", "MAX_TOKENS=3",
                          "--datatype", "MAX_TOKENS=INT32")
    assert result.code == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["outputs"][0]["data"] for line in lines] == [["a"], ["b"], ["a"]]


async def test_model_error_in_the_stream_exits_1(gateway: Gateway) -> None:
    result = await invoke(gateway.address, "tokens", "--stream", "--input", "PROMPT=hi",
                          "--input", "MAX_TOKENS=0")
    assert result.code == 1
    assert "error: the model failed the request" in result.stderr
    assert "MAX_TOKENS is 0" in result.stderr


async def test_wrong_token_is_refused_with_a_hint(gateway: Gateway) -> None:
    result = await invoke(gateway.address, "echo", "--input", "INPUT0=1", token="wrong")
    assert result.code == 1
    assert "PERMISSION_DENIED" in result.stderr
    assert "reason: INVALID_TOKEN" in result.stderr
    assert "gpufleet rotate-token echo" in result.stderr


async def test_queue_full_exits_4_with_reason_and_pushback(gateway: Gateway) -> None:
    result = await invoke(gateway.address, "full", "--input", "INPUT0=1")
    assert result.code == 4, result.stderr
    assert "error: RESOURCE_EXHAUSTED" in result.stderr
    assert "reason: QUEUE_FULL" in result.stderr
    assert "retry after: " in result.stderr


async def test_unknown_instance_route_rule_is_route_target_not_found(gateway: Gateway) -> None:
    result = await invoke(gateway.address, "echo", "--input", "INPUT0=1",
                          "--route-rule", "echo-404")
    assert result.code == 1
    assert "error: NOT_FOUND" in result.stderr
    assert "reason: ROUTE_TARGET_NOT_FOUND" in result.stderr


async def test_no_gateway_exits_3(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"
    # Nothing listens there once the probe socket is closed.
    result = await invoke(address, "echo", "--input", "INPUT0=1")
    assert result.code == 3
    assert f"cannot connect to the gateway at {address}" in result.stderr


async def test_bad_input_exits_2_without_a_call() -> None:
    result = await invoke("127.0.0.1:1", "echo", "--input", "INPUT0=[[1], [2, 3]]")
    assert result.code == 2
    assert "is not rectangular" in result.stderr
