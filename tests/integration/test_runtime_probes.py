"""Each probe kind against real servers on 127.0.0.1 (port 0)."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from gpufleet.agent.runtime.probes import check_exec, check_grpc, check_http, check_tcp, run_check
from gpufleet.agent.runtime.process import pick_free_port
from gpufleet.agent.runtime.spec import ExecAction, ProbeSpec, TcpAction

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
async def http_server() -> AsyncIterator[int]:
    """Answers /ok with 200, /moved with 302, anything else with 503."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request_line = await reader.readline()
        while (await reader.readline()) not in (b"\r\n", b""):
            pass
        path = request_line.split()[1]
        status = {b"/ok": "200 OK", b"/moved": "302 Found"}.get(path, "503 Unavailable")
        writer.write(f"HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n".encode())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()


async def test_http_probe_passes_on_2xx_and_3xx_only(http_server: int) -> None:
    assert (await check_http(http_server, "/ok", 2.0)).ok
    assert (await check_http(http_server, "/moved", 2.0)).ok
    failed = await check_http(http_server, "/down", 2.0)
    assert not failed.ok and "HTTP 503" in failed.message


async def test_http_probe_times_out_on_a_silent_server() -> None:
    accepted = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set()
        await reader.read()  # never answers; the probe gives up and closes
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    try:
        result = await check_http(server.sockets[0].getsockname()[1], "/", 0.2)
    finally:
        server.close()
        await server.wait_closed()
    assert accepted.is_set()
    assert not result.ok and "no response within 0.2s" in result.message


async def test_tcp_probe(http_server: int) -> None:
    assert (await check_tcp(http_server, 2.0)).ok
    refused = await check_tcp(pick_free_port(), 2.0)
    assert not refused.ok and "TCP connect" in refused.message


async def test_grpc_health_probe_reads_serving_status() -> None:
    server = grpc.aio.server()
    servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        await servicer.set("model", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert (await check_grpc(port, "", 2.0)).ok
        not_serving = await check_grpc(port, "model", 2.0)
        assert not not_serving.ok and "NOT_SERVING" in not_serving.message
        unknown = await check_grpc(port, "other", 2.0)
        assert not unknown.ok and "NOT_FOUND" in unknown.message
    finally:
        await server.stop(None)
    down = await check_grpc(port, "", 0.5)
    assert not down.ok and "UNAVAILABLE" in down.message


async def test_exec_probe_exit_status_and_env() -> None:
    ok = await check_exec(("/bin/sh", "-c", 'test "$PORT" = 7'), 5.0, {"PORT": "7"})
    assert ok.ok
    failed = await check_exec(("/bin/sh", "-c", "echo broken; exit 4"), 5.0, {})
    assert not failed.ok and failed.message == "exec /bin/sh: exit code 4: broken"
    missing = await check_exec(("/nonexistent/probe",), 5.0, {})
    assert not missing.ok and "No such file" in missing.message


async def test_exec_probe_timeout_kills_its_whole_group(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    script = f"sleep 30 & echo $! > {pid_file}; wait"
    result = await check_exec(("/bin/sh", "-c", script), 0.5, {"PATH": os.environ["PATH"]})
    assert not result.ok and "killed after timeout of 0.5s" in result.message
    child = int(pid_file.read_text())
    # The killed group's processes are gone or, at most, zombies not reaped by init yet.
    stat_path = Path(f"/proc/{child}/stat")
    for _ in range(100):
        if not stat_path.exists() or stat_path.read_text().rsplit(")", 1)[1].split()[0] == "Z":
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail(f"exec probe child {child} survived the timeout")


async def test_run_check_uses_instance_port_when_probe_port_is_zero(http_server: int) -> None:
    probe = ProbeSpec(action=TcpAction(port=0), timeout=1.0)
    assert (await run_check(probe, http_server, {})).ok
    exec_probe = ProbeSpec(action=ExecAction(command=(sys.executable, "-c", "pass")), timeout=5.0)
    assert (await run_check(exec_probe, 0, {})).ok
