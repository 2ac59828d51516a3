"""`gpufleet gateway` as a real process against a scripted control plane on port 0."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import grpc
import pytest

from gpufleet.gateway.app import start_gateway
from gpufleet.gateway.settings import GatewayConfig
from gpufleet.inference import grpc_service_pb2 as pb
from gpufleet.inference import grpc_service_pb2_grpc as pb_grpc
from gpufleet.server.errors import StartupError
from tests.integration.test_gateway_support import (
    ADMIN_TOKEN,
    REPO_ROOT,
    control_plane,
    route,
    wait_until,
)

pytestmark = pytest.mark.timeout(60)

PREFIX = "gpufleet gateway listening on "


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUFLEET_")}
    env["HOME"] = str(home)
    return env


async def test_gateway_command_serves_until_sigterm(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(ADMIN_TOKEN + "\n")
    async with control_plane(route("echo")) as plane:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gpufleet.client.cli", "gateway",
            "--server", plane.address, "--token-file", str(token_file),
            "--listen", "127.0.0.1:0", "--gateway-id", "cli-gw",
            cwd=REPO_ROOT, env=_env(tmp_path),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        try:
            assert process.stdout is not None
            line = (await asyncio.wait_for(process.stdout.readline(), 20)).decode().strip()
            assert line.startswith(PREFIX), line
            address = line[len(PREFIX):]
            await wait_until(lambda: bool(plane.watch_requests), timeout=20)
            assert plane.watch_requests[0].gateway_id == "cli-gw"
            async with grpc.aio.insecure_channel(address) as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                live = await stub.ServerLive(pb.ServerLiveRequest(), timeout=10)
                assert live.live
            process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(process.wait(), 20) == 0
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--token", "t", "--listen", "nowhere"], "is not HOST:PORT"),
        (["--server", "127.0.0.1:1"], "no admin token"),
        (["--token", "t", "--tls-cert", "/nonexistent.pem"], "go together"),
    ],
)
async def test_bad_flags_exit_2_with_one_line(
    tmp_path: Path, args: list[str], message: str
) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gpufleet.gateway", *args,
        cwd=REPO_ROOT, env=_env(tmp_path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 2
    assert message in stderr.decode()


async def test_busy_port_is_a_startup_error() -> None:
    async with control_plane() as plane:
        config = GatewayConfig(
            server_address=plane.address, admin_token=ADMIN_TOKEN, listen="127.0.0.1:0"
        )
        first = await start_gateway(config)
        try:
            busy = GatewayConfig(
                server_address=plane.address, admin_token=ADMIN_TOKEN, listen=first.address
            )
            with pytest.raises(StartupError, match="cannot listen"):
                await start_gateway(busy)
        finally:
            await first.stop(grace=0)
