"""Shared pieces of the fault and bad-input suite (issue 5): stacks of real gpufleet
processes on 127.0.0.1, standalone gateways, Open Inference Protocol requests, and a call
loop that counts every outcome.

Processes, waits and agents come from tests/e2e/conftest.py. Gateways run as processes of
their own (`gpufleet gateway`), so that they outlive a killed control plane and so that
their memory can be read from /proc; control planes run with --no-gateway.

Calls go through gpufleet's generated `inference` stubs: tritonclient cannot be imported
next to them in this process.
"""

from __future__ import annotations

import re
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gpufleet.inference import grpc_service_pb2 as oip
from gpufleet.inference import grpc_service_pb2_grpc as oip_grpc
from gpufleet.v1 import deployment_pb2, instance_pb2, node_service_pb2, node_service_pb2_grpc
from tests.e2e.conftest import (
    ControlPlaneProc,
    Proc,
    Processes,
    processes,
    start_server,
    wait_for,
)

__all__ = ["module_processes", "processes"]

GATEWAY_LISTENING = re.compile(r"gpufleet gateway listening on (\S+)")
MODEL_SERVER = "python -m examples.model_server --port $PORT"
SERVING = health_pb2.HealthCheckResponse.SERVING
ROUTE_TARGET_KEY = "deploy-route-target"
PUSHBACK_KEY = "grpc-retry-pushback-ms"
READY = instance_pb2.INSTANCE_STATE_READY


# --- processes ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def module_processes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Processes]:
    """Processes shared by the tests of one module (one stack, set up once), killed at its end."""
    running = Processes(tmp_path_factory.mktemp("stack"))
    try:
        yield running
    finally:
        running.cleanup()


def start_plane(
    processes: Processes, state_dir: Path, *extra: str, listen: str = "127.0.0.1:0", name: str = "server"
) -> ControlPlaneProc:
    """`gpufleet server` without its embedded gateway (gateways here are processes of their own)."""
    return start_server(processes, state_dir, "--no-gateway", *extra, listen=listen, name=name)


@dataclass
class GatewayProc:
    """A `gpufleet gateway` process and its data plane address."""

    proc: Proc
    address: str

    @property
    def pid(self) -> int:
        return self.proc.popen.pid

    def alive(self) -> bool:
        return self.proc.popen.poll() is None

    def rss_kib(self) -> int:
        """Resident memory of the gateway process, from /proc."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError(f"no VmRSS in /proc/{self.pid}/status")


def start_gateway(processes: Processes, plane: ControlPlaneProc, name: str = "gateway") -> GatewayProc:
    """A standalone gateway watching `plane`, SERVING (it has the first route snapshot)."""
    proc = processes.start(
        name, "gateway", "--server", plane.address, "--token-file", str(plane.state_dir / "admin-token"),
        "--listen", "127.0.0.1:0", "--gateway-id", name,
    )  # fmt: skip
    address = proc.wait_for_output(GATEWAY_LISTENING).group(1)
    wait_for(f"{name} SERVING", lambda: health_status(address) == SERVING)
    return GatewayProc(proc, address)


def health_status(address: str, service: str = "") -> int:
    """grpc.health.v1 Check of `service` at `address`."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        answer = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        return int(answer.status)


# --- deployments ----------------------------------------------------------------------------


def deployment(
    name: str,
    *,
    command: str = MODEL_SERVER,
    min_instances: int = 1,
    max_instances: int = 1,
    max_request_concurrency: int = 4,
    max_queue_size: int | None = None,
    gpu_memory_mib: int = 2048,
) -> deployment_pb2.Deployment:
    """A deployment of the example model server (echo and tokens models) on a GPU share."""
    traffic: dict[str, Any] = {"max_request_concurrency": max_request_concurrency}
    if max_queue_size is not None:
        traffic["max_queue_size"] = max_queue_size
    document = {
        "name": name,
        "spec": {
            "command": command,
            "port": 0,
            "gpu": {"memory_mib": gpu_memory_mib, "core_percent": 25},
            "scaling": {
                "min_instances": min_instances,
                "max_instances": max_instances,
                "idle_retention": "300s",
            },
            "traffic": traffic,
            "readiness_probe": {"grpc": {}, "period": "0.5s"},
        },
    }
    return json_format.ParseDict(document, deployment_pb2.Deployment())


def create(plane: ControlPlaneProc, wanted: deployment_pb2.Deployment) -> str:
    """Create a deployment; returns its invoke token."""
    with plane.client() as client:
        return client.create_deployment(wanted).invoke_token


def ready_instances(plane: ControlPlaneProc, name: str, count: int) -> list[instance_pb2.Instance]:
    """Wait for exactly `count` instances of `name`, all READY with a pid."""
    return plane.wait_instances(
        f"{count} instance(s) of {name} READY",
        lambda found: len(found) == count and all(i.state == READY and i.pid > 0 for i in found),
        deployment=name,
    )


def register_node(plane: ControlPlaneProc, name: str) -> node_service_pb2.RegisterResponse:
    """Register a node with the join token, as an agent would (no agent runs)."""
    with grpc.insecure_channel(plane.address) as channel:
        stub = node_service_pb2_grpc.NodeServiceStub(channel)
        answer: node_service_pb2.RegisterResponse = stub.Register(
            node_service_pb2.RegisterRequest(join_token=plane.join_token, node_name=name), timeout=10
        )
        return answer


def pids_by_id(instances: Sequence[instance_pb2.Instance]) -> dict[str, int]:
    return {i.id: i.pid for i in instances}


# --- Open Inference Protocol calls ----------------------------------------------------------


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def echo_request(model: str, request_id: str = "") -> oip.ModelInferRequest:
    """An echo call: INPUT0 comes back as OUTPUT0."""
    request = oip.ModelInferRequest(model_name=model, id=request_id)
    tensor = request.inputs.add(name="INPUT0", datatype="INT32", shape=[2])
    tensor.contents.int_contents.extend([7, 8])
    return request


def tokens_request(model: str, max_tokens: int, request_id: str = "") -> oip.ModelInferRequest:
    """A call of the `tokens` model: `max_tokens` tokens, one token delay apart."""
    request = oip.ModelInferRequest(model_name=model, id=request_id)
    prompt = request.inputs.add(name="PROMPT", datatype="BYTES", shape=[1])
    prompt.contents.bytes_contents.append(b"lorem ipsum dolor")
    limit = request.inputs.add(name="MAX_TOKENS", datatype="INT32", shape=[1])
    limit.contents.int_contents.append(max_tokens)
    return request


def metadata_value(metadata: Any, key: str) -> str | None:
    for name, value in metadata or ():
        if name == key:
            return str(value)
    return None


def model_ready(address: str, model: str, token: str) -> bool:
    """The gateway's ModelReady for `model`: it has a ready endpoint in its table."""
    with grpc.insecure_channel(address) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        answer = stub.ModelReady(oip.ModelReadyRequest(name=model), metadata=bearer(token), timeout=5)
        return bool(answer.ready)


@dataclass
class CallTally:
    """Outcomes of a call loop."""

    ok: int = 0
    failures: list[str] = field(default_factory=list)
    targets: Counter[str] = field(default_factory=Counter)

    @property
    def sent(self) -> int:
        return self.ok + len(self.failures)


class CallLoop:
    """Steady echo ModelInfer calls through a gateway, on background threads, each thread
    one call at a time with a short pause; every outcome is counted."""

    def __init__(
        self,
        address: str,
        model: str,
        token: str,
        *,
        threads: int = 2,
        pause_s: float = 0.01,
        call_timeout_s: float = 10.0,
    ) -> None:
        self._address = address
        self._model = model
        self._metadata = bearer(token)
        self._pause_s = pause_s
        self._call_timeout_s = call_timeout_s
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._tally = CallTally()
        self._threads = [
            threading.Thread(target=self._run, args=(n,), name=f"call-loop-{n}", daemon=True)
            for n in range(threads)
        ]

    def __enter__(self) -> CallLoop:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self) -> CallTally:
        """Stop after the calls in flight; returns the final tally."""
        self._stop.set()
        for thread in self._threads:
            thread.join(self._call_timeout_s + 5)
            if thread.is_alive():
                raise AssertionError(f"{thread.name} did not stop")
        return self.tally()

    def tally(self) -> CallTally:
        with self._lock:
            return CallTally(self._tally.ok, list(self._tally.failures), Counter(self._tally.targets))

    def wait_ok(self, more: int, timeout: float = 30.0) -> None:
        """Wait until `more` further calls succeeded (the loop is really flowing)."""
        target = self.tally().ok + more
        wait_for(f"{more} more successful calls", lambda: self.tally().ok >= target, timeout)

    def _run(self, n: int) -> None:
        with grpc.insecure_channel(self._address) as channel:
            stub = oip_grpc.GRPCInferenceServiceStub(channel)
            i = 0
            while not self._stop.is_set():
                i += 1
                try:
                    _, call = stub.ModelInfer.with_call(
                        echo_request(self._model, f"{n}-{i}"),
                        metadata=self._metadata,
                        timeout=self._call_timeout_s,
                    )
                    target = metadata_value(call.initial_metadata(), ROUTE_TARGET_KEY) or "?"
                    with self._lock:
                        self._tally.ok += 1
                        self._tally.targets[target] += 1
                except grpc.RpcError as err:
                    with self._lock:
                        self._tally.failures.append(f"{err.code()}: {err.details()}")
                self._stop.wait(self._pause_s)
