"""Health checks of an instance: gRPC health, HTTP GET, TCP connect, exec.

Every check returns a `ProbeResult` and never raises for a failing instance; each is bounded
by its timeout. `ProbeTracker` turns single results into a verdict using the thresholds.
"""

from __future__ import annotations

import asyncio
import enum
import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2

from gpufleet.agent.runtime.spec import (
    ExecAction,
    GrpcAction,
    HttpGetAction,
    ProbeSpec,
    TcpAction,
)

PROBE_HOST = "127.0.0.1"
_HEALTH_CHECK_METHOD = "/grpc.health.v1.Health/Check"
# Enough of an exec probe's output to explain a failure in the instance's reason.
_EXEC_OUTPUT_LIMIT = 512
# Seconds to wait for an exec probe's process group to die after SIGKILL.
_EXEC_KILL_WAIT_S = 2.0


@dataclass(frozen=True)
class ProbeResult:
    """Outcome of one check."""

    ok: bool
    message: str


async def check_grpc(port: int, service: str, timeout: float) -> ProbeResult:
    """grpc.health.v1.Health/Check; SERVING passes."""
    target = f"{PROBE_HOST}:{port}"
    try:
        async with grpc.aio.insecure_channel(target) as channel:
            # A plain method handle avoids depending on the untyped generated stub.
            check = channel.unary_unary(
                _HEALTH_CHECK_METHOD,
                request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                response_deserializer=health_pb2.HealthCheckResponse.FromString,
            )
            response = await check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    except grpc.aio.AioRpcError as err:
        return ProbeResult(False, f"gRPC health check on {target}: {err.code().name}")
    if not isinstance(response, health_pb2.HealthCheckResponse):
        return ProbeResult(False, f"gRPC health check on {target}: unexpected response")
    status_name = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    if response.status == health_pb2.HealthCheckResponse.SERVING:
        return ProbeResult(True, f"gRPC health {status_name}")
    return ProbeResult(False, f"gRPC health check on {target}: {status_name}")


async def _http_status(port: int, path: str) -> int:
    reader, writer = await asyncio.open_connection(PROBE_HOST, port)
    try:
        request = (
            f"GET {path} HTTP/1.1\r\nHost: {PROBE_HOST}:{port}\r\n"
            "User-Agent: gpufleet-probe\r\nAccept: */*\r\nConnection: close\r\n\r\n"
        )
        writer.write(request.encode("ascii"))
        await writer.drain()
        status_line = await reader.readline()
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass
    parts = status_line.decode("latin-1").split()
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise ValueError(f"not an HTTP response: {status_line[:80]!r}")
    return int(parts[1])


async def check_http(port: int, path: str, timeout: float) -> ProbeResult:
    """GET http://127.0.0.1:<port><path>; 2xx and 3xx pass."""
    url = f"http://{PROBE_HOST}:{port}{path}"
    try:
        async with asyncio.timeout(timeout):
            status = await _http_status(port, path)
    except TimeoutError:
        return ProbeResult(False, f"GET {url}: no response within {timeout:g}s")
    except (OSError, ValueError) as err:
        return ProbeResult(False, f"GET {url}: {err}")
    if 200 <= status < 400:
        return ProbeResult(True, f"GET {url}: HTTP {status}")
    return ProbeResult(False, f"GET {url}: HTTP {status}")


async def check_tcp(port: int, timeout: float) -> ProbeResult:
    """A completed TCP connect to 127.0.0.1:<port> passes."""
    address = f"{PROBE_HOST}:{port}"
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(PROBE_HOST, port)
    except TimeoutError:
        return ProbeResult(False, f"TCP connect to {address}: timed out after {timeout:g}s")
    except OSError as err:
        return ProbeResult(False, f"TCP connect to {address}: {err.strerror or err}")
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass
    return ProbeResult(True, f"TCP connect to {address}")


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


async def check_exec(
    command: tuple[str, ...], timeout: float, env: Mapping[str, str]
) -> ProbeResult:
    """Run argv (no shell) with the instance's env; exit status 0 passes.

    The command runs in its own process group so that a timeout kills it together with
    everything it started.
    """
    name = command[0] if command else "<empty>"
    try:
        proc = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=dict(env),
            start_new_session=True,
        )
    except OSError as err:
        return ProbeResult(False, f"exec {name}: {err.strerror or err}")
    try:
        async with asyncio.timeout(timeout):
            output, _ = await proc.communicate()
    except TimeoutError:
        _kill_group(proc.pid)
        try:
            async with asyncio.timeout(_EXEC_KILL_WAIT_S):
                await proc.wait()
        except TimeoutError:
            pass
        return ProbeResult(False, f"exec {name}: killed after timeout of {timeout:g}s")
    except asyncio.CancelledError:
        # The instance is stopping: the check must not outlive it.
        _kill_group(proc.pid)
        raise
    text = output[-_EXEC_OUTPUT_LIMIT:].decode("utf-8", "replace").strip()
    code = proc.returncode
    if code == 0:
        return ProbeResult(True, f"exec {name}: exit 0")
    suffix = f": {text}" if text else ""
    if code is not None and code < 0:
        return ProbeResult(False, f"exec {name}: killed by signal {-code}{suffix}")
    return ProbeResult(False, f"exec {name}: exit code {code}{suffix}")


async def run_check(probe: ProbeSpec, instance_port: int, env: Mapping[str, str]) -> ProbeResult:
    """Run one check of `probe` against an instance listening on `instance_port`."""
    action = probe.action
    if isinstance(action, ExecAction):
        return await check_exec(action.command, probe.timeout, env)
    port = action.port or instance_port
    if isinstance(action, GrpcAction):
        return await check_grpc(port, action.service, probe.timeout)
    if isinstance(action, HttpGetAction):
        return await check_http(port, action.path, probe.timeout)
    if isinstance(action, TcpAction):
        return await check_tcp(port, probe.timeout)
    raise TypeError(f"unknown probe action {action!r}")


class Verdict(enum.Enum):
    """Settled outcome of a probe."""

    UNKNOWN = "unknown"
    PASSING = "passing"
    FAILING = "failing"


class ProbeTracker:
    """Applies success/failure thresholds to a stream of results (pure)."""

    def __init__(self, success_threshold: int, failure_threshold: int) -> None:
        self._success_threshold = max(1, success_threshold)
        self._failure_threshold = max(1, failure_threshold)
        self._successes = 0
        self._failures = 0
        self.verdict = Verdict.UNKNOWN

    def observe(self, ok: bool) -> Verdict:
        """Record one result; return the (possibly unchanged) verdict."""
        if ok:
            self._successes += 1
            self._failures = 0
            if self._successes >= self._success_threshold:
                self.verdict = Verdict.PASSING
        else:
            self._failures += 1
            self._successes = 0
            if self._failures >= self._failure_threshold:
                self.verdict = Verdict.FAILING
        return self.verdict
