"""Shared pieces of the gateway integration tests (this module holds no tests).

- `ScriptedControlPlane`: a real RoutingService on 127.0.0.1:0 whose routes the test sets;
  it answers WatchRoutes with a snapshot then one update per change, and records ReportLoad.
- `ModelServer`: `python -m examples.model_server --port 0` as a real process.
- `running_gateway`: a gateway started in-process against a scripted control plane.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import grpc
from google.protobuf.duration_pb2 import Duration
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gpufleet.gateway.app import Gateway, start_gateway
from gpufleet.gateway.invoke_auth import token_sha256
from gpufleet.gateway.settings import GatewayConfig
from gpufleet.v1 import deployment_pb2, routing_service_pb2, routing_service_pb2_grpc

from tests.process_output import read_stdout_line

REPO_ROOT = Path(__file__).resolve().parents[2]
ADMIN_TOKEN = "admin-secret"
INVOKE_TOKEN = "invoke-secret"
AUTH = (("authorization", f"Bearer {INVOKE_TOKEN}"),)
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0
STATUS_DETAILS_KEY = "grpc-status-details-bin"
PUSHBACK_KEY = "grpc-retry-pushback-ms"
ROUTE_TARGET_KEY = "deploy-route-target"
EOF_MARK: object = getattr(grpc.aio, "EOF")  # noqa: B009 - missing from the type stubs
_T = TypeVar("_T")


# --- routes ---------------------------------------------------------------------------------


def route(
    name: str,
    endpoints: Sequence[tuple[str, str]] = (),
    *,
    token: str = INVOKE_TOKEN,
    draining: Iterable[str] = (),
    service: str = "",
    weight: int = 0,
    max_instances: int = 1,
    max_request_concurrency: int = 1,
    max_streams_per_connection: int = 0,
    max_queue_size: int | None = None,
    queue_timeout_s: float | None = None,
    rate_limit_per_second: float = 0.0,
    rate_limit_burst: int = 0,
) -> routing_service_pb2.DeploymentRoute:
    """A DeploymentRoute with (instance id, address) endpoints."""
    drained = set(draining)
    traffic = deployment_pb2.TrafficSpec(
        max_request_concurrency=max_request_concurrency,
        max_streams_per_connection=max_streams_per_connection,
        rate_limit_per_second=rate_limit_per_second,
        rate_limit_burst=rate_limit_burst,
    )
    if max_queue_size is not None:
        traffic.max_queue_size = max_queue_size
    if queue_timeout_s is not None:
        timeout = Duration()
        timeout.FromNanoseconds(int(queue_timeout_s * 1e9))
        traffic.queue_timeout.CopyFrom(timeout)
    return routing_service_pb2.DeploymentRoute(
        deployment=name,
        endpoints=[
            routing_service_pb2.Endpoint(
                instance_id=instance_id,
                address=address,
                node_id="node-1",
                draining=instance_id in drained,
            )
            for instance_id, address in endpoints
        ],
        traffic=traffic,
        scaling=deployment_pb2.ScalingSpec(max_instances=max_instances),
        service=service,
        service_weight=weight,
        invoke_token_sha256=token_sha256(token) if token else "",
    )


# --- the scripted control plane -------------------------------------------------------------


ReportHook = Callable[[routing_service_pb2.ReportLoadRequest], None]


class _RoutingServicer(routing_service_pb2_grpc.RoutingServiceServicer):
    def __init__(self, plane: ScriptedControlPlane) -> None:
        self._plane = plane

    async def WatchRoutes(  # noqa: N802 - gRPC method name
        self,
        request: routing_service_pb2.WatchRoutesRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[routing_service_pb2.WatchRoutesResponse]:
        if not self._plane.authorized(context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "bad admin token")
        updates: asyncio.Queue[routing_service_pb2.WatchRoutesResponse] = asyncio.Queue()
        self._plane.watchers.append(updates)
        self._plane.watch_requests.append(request)
        try:
            yield routing_service_pb2.WatchRoutesResponse(
                snapshot=True, routes=list(self._plane.routes.values())
            )
            while True:
                yield await updates.get()
        finally:
            self._plane.watchers.remove(updates)

    async def ReportLoad(  # noqa: N802 - gRPC method name
        self,
        request: routing_service_pb2.ReportLoadRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> routing_service_pb2.ReportLoadResponse:
        if not self._plane.authorized(context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "bad admin token")
        reject = self._plane.reject_report
        if reject is not None and reject(request):
            self._plane.failed_reports.append(request)
            await context.abort(grpc.StatusCode.UNAVAILABLE, "scripted report failure")
        self._plane.reports.append(request)
        if self._plane.on_report is not None:
            self._plane.on_report(request)
        self._plane.reported.set()
        return routing_service_pb2.ReportLoadResponse(
            report_interval_seconds=self._plane.report_interval_seconds
        )


class ScriptedControlPlane:
    """RoutingService whose table the test edits."""

    def __init__(self, credentials: grpc.ServerCredentials | None = None) -> None:
        self.credentials = credentials
        self.routes: dict[str, routing_service_pb2.DeploymentRoute] = {}
        self.watchers: list[asyncio.Queue[routing_service_pb2.WatchRoutesResponse]] = []
        self.watch_requests: list[routing_service_pb2.WatchRoutesRequest] = []
        self.reports: list[routing_service_pb2.ReportLoadRequest] = []
        self.failed_reports: list[routing_service_pb2.ReportLoadRequest] = []
        self.reject_report: Callable[[routing_service_pb2.ReportLoadRequest], bool] | None = None
        """Answer the ReportLoad calls it returns True for with UNAVAILABLE."""
        self.reported = asyncio.Event()
        self.on_report: ReportHook | None = None
        self.report_interval_seconds = 1
        self.port = 0
        self._server: grpc.aio.Server | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def authorized(self, context: grpc.aio.ServicerContext[Any, Any]) -> bool:
        metadata = context.invocation_metadata() or ()
        return ("authorization", f"Bearer {ADMIN_TOKEN}") in [tuple(m) for m in metadata]

    async def start(self) -> None:
        """Serve on a free port, or on the previous port after stop()."""
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        routing_service_pb2_grpc.add_RoutingServiceServicer_to_server(
            _RoutingServicer(self), server
        )
        listen = f"127.0.0.1:{self.port}"
        if self.credentials is None:
            self.port = server.add_insecure_port(listen)
        else:
            self.port = server.add_secure_port(listen, self.credentials)
        await server.start()
        self._server = server

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(None)
            self._server = None

    def set_route(self, *routes: routing_service_pb2.DeploymentRoute) -> None:
        """Add or replace routes and tell every watcher."""
        for item in routes:
            self.routes[item.deployment] = item
        self._push(routing_service_pb2.WatchRoutesResponse(routes=list(routes)))

    def remove(self, name: str) -> None:
        self.routes.pop(name, None)
        self._push(routing_service_pb2.WatchRoutesResponse(removed_deployments=[name]))

    def _push(self, update: routing_service_pb2.WatchRoutesResponse) -> None:
        for queue in self.watchers:
            queue.put_nowait(update)


# --- the gateway ----------------------------------------------------------------------------


async def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll a condition of in-process state that has no event to await."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not reached within {timeout} s")
        await asyncio.sleep(0.005)


async def sync_table(gateway: Gateway, check: Callable[[Gateway], bool]) -> None:
    """Wait until the gateway's table reflects a change the test just made."""
    await wait_until(lambda: check(gateway))


@contextlib.asynccontextmanager
async def running_gateway(
    plane: ScriptedControlPlane, **options: Any
) -> AsyncIterator[Gateway]:
    """A gateway on 127.0.0.1:0 watching `plane`, synced."""
    config = GatewayConfig(
        server_address=plane.address,
        admin_token=ADMIN_TOKEN,
        listen="127.0.0.1:0",
        gateway_id="gw-test",
        reconnect_initial_backoff_s=0.05,
        reconnect_max_backoff_s=0.2,
        **options,
    )
    gateway = await start_gateway(config)
    try:
        await gateway.wait_synced(timeout=10)
        yield gateway
    finally:
        await gateway.stop(grace=1.0)


@contextlib.asynccontextmanager
async def control_plane(
    *routes: routing_service_pb2.DeploymentRoute,
    credentials: grpc.ServerCredentials | None = None,
) -> AsyncIterator[ScriptedControlPlane]:
    plane = ScriptedControlPlane(credentials)
    plane.routes = {r.deployment: r for r in routes}
    await plane.start()
    try:
        yield plane
    finally:
        await plane.stop()


# --- model server processes -----------------------------------------------------------------


@dataclass
class ModelServer:
    """A running `python -m examples.model_server` and where to reach it."""

    process: subprocess.Popen[bytes]
    address: str
    stderr_path: Path

    def stderr(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=STOP_TIMEOUT_S)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill()
        if self.process.stdout is not None:
            self.process.stdout.close()



def start_model_server(tmp_path: Path, *flags: str) -> ModelServer:
    """`python -m examples.model_server --port 0 FLAGS...`, listening and SERVING."""
    stderr_path = tmp_path / f"model-server-{time.monotonic_ns()}.err"
    with stderr_path.open("wb") as stderr_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "examples.model_server", "--port", "0", *flags],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=stderr_file,
            start_new_session=True,
        )
    try:
        line = read_stdout_line(process, START_TIMEOUT_S)
    except (TimeoutError, EOFError) as error:
        process.kill()
        process.wait(timeout=STOP_TIMEOUT_S)
        raise AssertionError(
            f"model server did not report its port: {error}\n{stderr_path.read_text()}"
        ) from None
    prefix = "model server listening on "
    if not line.startswith(prefix):
        process.kill()
        raise AssertionError(f"unexpected first line from the model server: {line!r}")
    server = ModelServer(process, line[len(prefix) :], stderr_path)
    _wait_serving(server.address)
    return server


def _wait_serving(address: str) -> None:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        watch = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=START_TIMEOUT_S)
        for response in watch:
            if response.status == health_pb2.HealthCheckResponse.SERVING:
                watch.cancel()
                return
    raise AssertionError(f"model server at {address} never reported SERVING")


# --- statuses -------------------------------------------------------------------------------


def metadata_dict(metadata: Any) -> dict[str, Any]:
    return {key: value for key, value in cast(Iterable[tuple[str, Any]], metadata or ())}


def error_info(err: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    """The ErrorInfo in a failed call's `grpc-status-details-bin` trailer."""
    raw = metadata_dict(err.trailing_metadata()).get(STATUS_DETAILS_KEY)
    if not isinstance(raw, bytes):
        raise AssertionError(f"no {STATUS_DETAILS_KEY} trailer in {err!r}")
    status = status_pb2.Status.FromString(raw)
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    raise AssertionError(f"no ErrorInfo in the status details of {err!r}")


def open_stream(
    method: Any, response_type: type[_T], **kwargs: Any
) -> grpc.aio.StreamStreamCall[Any, _T]:
    """A bidi call of `method` driven with write()/read() (the type stubs demand a request
    iterator; None is what grpc takes for that)."""
    call: grpc.aio.StreamStreamCall[Any, _T] = method(None, **kwargs)
    return call


async def read_message(call: grpc.aio.StreamStreamCall[Any, _T]) -> _T | None:
    """The next message of a stream, or None at its end."""
    message = await call.read()
    return None if message is EOF_MARK else cast(_T, message)


async def failure(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    """The AioRpcError a call ends with (fails the test if it succeeds)."""
    try:
        await call
    except grpc.aio.AioRpcError as err:
        return err
    raise AssertionError("the call succeeded; it was expected to fail")
