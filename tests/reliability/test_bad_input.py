"""Issue 5, fault 7: bad input on every RPC of every service.

For each RPC of DeploymentService, NodeService, RoutingService, grpc.health.v1 and server
reflection on the control plane, and of inference.GRPCInferenceService, health and
reflection on the gateway:

- 500 random schema-valid requests (proto_strategies: a Hypothesis strategy built from
  the request's descriptor, steered towards real names, a valid spec and real credentials
  where a field decides whether the handler goes deeper), and
- 2,000 random byte payloads (half uniformly random, half mutations of valid requests),

all sent raw (identity serializers) with the credentials that reach the handler, and a
tenth as many again without credentials for the RPCs that need them. Streaming RPCs get
their messages on streams of 10. No answer may be INTERNAL or UNKNOWN from our code (a
gateway passes an instance's own status through unchanged: such answers carry
`deploy-route-target` and are counted apart), no call may hang, and afterwards the server
is alive, its health says SERVING, and its log holds no unexpected error.

Undecodable bytes sent to a method that deserializes its requests (ServerLive, ModelReady,
health, reflection, every control-plane method) get INVALID_ARGUMENT from our interceptors
(api/error_mapping.py), never grpc's own UNKNOWN "Unexpected DecodeError".

The control plane under test has no agent, and every deployment on it selects nodes by a
label no node has: nothing the fuzzer creates is placed or started. The gateway has its
own control plane and agent, with a real `echo` instance behind it.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from hypothesis import strategies as st

from gpufleet.inference import grpc_service_pb2 as oip
from gpufleet.v1 import (
    deployment_pb2,
    deployment_service_pb2,
    node_service_pb2,
    routing_service_pb2,
)
from tests.e2e.conftest import ControlPlaneProc, Proc, Processes, start_agent, wait_for
from tests.reliability.conftest import (
    SERVING,
    GatewayProc,
    bearer,
    create,
    deployment,
    health_status,
    model_ready,
    ready_instances,
    register_node,
    start_gateway,
    start_plane,
)
from tests.reliability.proto_strategies import boundary_messages, draw, messages
from tests.reliability.raw_calls import Metadata, Outcome, call

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

SCHEMA_VALID = 500
RANDOM_BYTES = 2000
WITHOUT_CREDENTIALS_EVERY = 10  # every 10th payload again without credentials, where needed
STREAM_LENGTH = 10
CONCURRENCY = 32
NODE_ID_KEY = "gpufleet-node-id"
ERROR_CODES = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
# What our servers log when a handler raised something unexpected, or a task died.
LOG_ALARMS = ("unexpected error", "Task exception was never retrieved", "Exception in callback")
NOWHERE = {"gpufleet-fuzz": "no-node-has-this-label"}


def _service(module: Any, name: str) -> ServiceDescriptor:
    service: ServiceDescriptor = module.DESCRIPTOR.services_by_name[name]
    return service


HEALTH = _service(health_pb2, "Health")
REFLECTION = _service(reflection_pb2, "ServerReflection")
CONTROL_PLANE_SERVICES = (
    _service(deployment_service_pb2, "DeploymentService"),
    _service(node_service_pb2, "NodeService"),
    _service(routing_service_pb2, "RoutingService"),
    HEALTH,
    REFLECTION,
)
GATEWAY_SERVICES = (_service(oip, "GRPCInferenceService"), HEALTH, REFLECTION)
# The gateway's own answers, open to anyone (DESIGN.md); the other inference RPCs need
# the deployment's invoke token.
OPEN_INFERENCE_RPCS = ("ServerLive", "ServerReady", "ServerMetadata")


@dataclass(frozen=True)
class Rpc:
    server: str
    """"control-plane" or "gateway"."""
    method: MethodDescriptor

    @property
    def name(self) -> str:
        return f"{self.server}:{self.method.containing_service.name}.{self.method.name}"


RPCS = [
    *(Rpc("control-plane", m) for s in CONTROL_PLANE_SERVICES for m in s.methods),
    *(Rpc("gateway", m) for s in GATEWAY_SERVICES for m in s.methods),
]


# --- the stacks -----------------------------------------------------------------------------


@dataclass
class Stacks:
    control_plane: ControlPlaneProc
    join_token: str
    node_id: str
    node_secret: str
    gateway: GatewayProc
    echo_token: str

    def server_proc(self, rpc: Rpc) -> Proc:
        return self.control_plane.proc if rpc.server == "control-plane" else self.gateway.proc

    def address(self, rpc: Rpc) -> str:
        return self.control_plane.address if rpc.server == "control-plane" else self.gateway.address


def unplaceable(name: str) -> deployment_pb2.Deployment:
    """A valid deployment that no node can take."""
    wanted = deployment(name, min_instances=0)
    wanted.spec.node_selector.update(NOWHERE)
    return wanted


@pytest.fixture(scope="module")
def stacks(module_processes: Processes) -> Stacks:
    processes = module_processes
    plane = start_plane(processes, processes.tmp_path / "control-plane")
    for name in ("fuzz-a", "fuzz-b"):
        create(plane, unplaceable(name))
    node = register_node(plane, "fuzz-node")

    gateway_plane = start_plane(processes, processes.tmp_path / "gateway-plane", "--heartbeat-interval", "1")
    start_agent(processes, gateway_plane, "a")
    echo_token = create(gateway_plane, deployment("echo", max_request_concurrency=64))
    ready_instances(gateway_plane, "echo", 1)
    gateway = start_gateway(processes, gateway_plane)
    wait_for("echo routed by the gateway", lambda: model_ready(gateway.address, "echo", echo_token))
    return Stacks(plane, plane.join_token, node.node_id, node.node_secret, gateway, echo_token)


def credentials(stacks: Stacks, rpc: Rpc) -> Metadata | None:
    """The metadata that gets a call past authentication; None for an open RPC."""
    service = rpc.method.containing_service.name
    if service in ("DeploymentService", "RoutingService"):
        return bearer(stacks.control_plane.admin_token)
    if service == "NodeService" and rpc.method.name == "Connect":
        return (*bearer(stacks.node_secret), (NODE_ID_KEY, stacks.node_id))
    if service == "GRPCInferenceService" and rpc.method.name not in OPEN_INFERENCE_RPCS:
        return bearer(stacks.echo_token)
    return None  # Register (its join token is a field), health, reflection, open OIP RPCs


def overrides(stacks: Stacks) -> dict[str, st.SearchStrategy[Any]]:
    """Values that take a handler past its first checks, by full field name."""
    names = st.one_of(
        st.sampled_from(["fuzz-a", "fuzz-b", "echo"]), st.from_regex(r"[a-z][a-z0-9-]{0,12}", fullmatch=True)
    )
    revisions = st.integers(0, 64)
    return {
        "gpufleet.v1.Deployment.name": names,
        "gpufleet.v1.Deployment.spec": st.just(unplaceable("x").spec),
        "gpufleet.v1.DeploymentSpec.node_selector": st.just(NOWHERE),
        "gpufleet.v1.GetDeploymentRequest.name": names,
        "gpufleet.v1.DeleteDeploymentRequest.name": names,
        "gpufleet.v1.ScaleDeploymentRequest.name": names,
        "gpufleet.v1.RotateInvokeTokenRequest.name": names,
        "gpufleet.v1.ListInstancesRequest.deployment": names,
        "gpufleet.v1.DeploymentLoad.deployment": names,
        "gpufleet.v1.UpdateDeploymentRequest.revision": revisions,
        "gpufleet.v1.DeleteDeploymentRequest.revision": revisions,
        "gpufleet.v1.ScaleDeploymentRequest.revision": revisions,
        "gpufleet.v1.WatchEventsRequest.since_revision": revisions,
        "gpufleet.v1.ListDeploymentsRequest.page_size": st.integers(0, 1001),
        "gpufleet.v1.ListDeploymentsRequest.label_selector": st.sampled_from(["", "a=b", "a=b,c"]),
        "gpufleet.v1.RegisterRequest.join_token": st.just(stacks.join_token),
        "gpufleet.v1.RegisterRequest.node_id": st.just(stacks.node_id),
        "gpufleet.v1.RegisterRequest.node_secret": st.just(stacks.node_secret),
        "gpufleet.v1.RegisterRequest.node_name": st.just("fuzz-node"),
        "inference.ModelInferRequest.model_name": st.just("echo"),
        "inference.ModelMetadataRequest.name": st.just("echo"),
        "inference.ModelReadyRequest.name": st.just("echo"),
        "inference.ModelInferRequest.InferInputTensor.name": st.sampled_from(["INPUT0", "INPUT1", "PROMPT"]),
        "inference.ModelInferRequest.InferInputTensor.datatype": st.sampled_from(["INT32", "FP32", "BYTES"]),
        "grpc.health.v1.HealthCheckRequest.service": st.sampled_from(
            ["", "inference.GRPCInferenceService", "gpufleet.v1.DeploymentService"]
        ),
    }


# --- payloads -------------------------------------------------------------------------------


def random_payloads(rng: random.Random, valid: Sequence[bytes], count: int) -> list[bytes]:
    """Half uniformly random bytes, half valid requests with bytes changed, cut, inserted
    or repeated."""
    payloads = []
    for n in range(count):
        if n % 2 == 0:
            size = rng.randrange(0, 64) if rng.random() < 0.9 else rng.randrange(64, 2048)
            payloads.append(rng.randbytes(size))
        else:
            payloads.append(_mutate(rng, bytearray(rng.choice(valid))))
    return payloads


def _mutate(rng: random.Random, data: bytearray) -> bytes:
    for _ in range(rng.randrange(1, 4)):
        choice = rng.randrange(4)
        position = rng.randrange(len(data) + 1)
        if choice == 0 and data:
            data[min(position, len(data) - 1)] = rng.randrange(256)
        elif choice == 1:
            del data[position:]
        elif choice == 2:
            data[position:position] = rng.randbytes(rng.randrange(1, 8))
        else:
            data.extend(data[position : position + rng.randrange(1, 16)])
    return bytes(data)


async def send(address: str, method: MethodDescriptor, payloads: Sequence[bytes], metadata: Metadata | None) -> list[Outcome]:
    """Every payload to `method`, CONCURRENCY calls at a time (client-streaming methods get
    them on streams of STREAM_LENGTH)."""
    size = STREAM_LENGTH if method.client_streaming else 1
    batches = [payloads[i : i + size] for i in range(0, len(payloads), size)]
    limit = asyncio.Semaphore(CONCURRENCY)
    async with grpc.aio.insecure_channel(address) as channel:

        async def one(batch: Sequence[bytes]) -> Outcome:
            async with limit:
                return await call(channel, method, batch, metadata)

        return list(await asyncio.gather(*(one(batch) for batch in batches)))


# --- the tests ------------------------------------------------------------------------------


@dataclass
class Report:
    server: str
    calls: int = 0
    codes: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)
    instance_errors: Counter[str] = field(default_factory=Counter)
    """INTERNAL/UNKNOWN answers of the instance behind the gateway, passed through."""

    def add(self, label: str, outcomes: list[Outcome]) -> None:
        self.calls += len(outcomes)
        for outcome in outcomes:
            if outcome.client_send_failure:
                self.codes["stream ended by the server during a write"] += 1
                continue
            if outcome.from_instance:
                self.codes[f"instance {outcome.code.name}"] += 1
                if outcome.code in ERROR_CODES:
                    self.instance_errors[f"{outcome.code.name} {outcome.details[:90]}"] += 1
                continue
            self.codes[outcome.code.name] += 1
            if outcome.hung or outcome.code in ERROR_CODES:
                self.violations.append(f"{label}: {outcome.code.name} {outcome.details[:200]}")


_DRAWN: dict[str, list[bytes]] = {}
"""Schema-valid requests by request type: RPCs taking the same type share one draw."""


def schema_valid(stacks: Stacks, rpc: Rpc, draw_seed: int) -> list[bytes]:
    name = rpc.method.input_type.full_name
    if name not in _DRAWN:
        strategy = messages(rpc.method.input_type, overrides(stacks))
        _DRAWN[name] = [m.SerializeToString() for m in draw(strategy, SCHEMA_VALID, draw_seed)]
    return _DRAWN[name]


@pytest.mark.parametrize("rpc", RPCS, ids=[rpc.name for rpc in RPCS])
async def test_random_requests_get_no_internal_error_and_leave_servers_healthy(stacks: Stacks, rpc: Rpc) -> None:
    draw_seed = random.randrange(1 << 30)
    rng = random.Random(draw_seed)
    valid = schema_valid(stacks, rpc, draw_seed)
    garbage = random_payloads(rng, valid, RANDOM_BYTES)
    address = stacks.address(rpc)
    metadata = credentials(stacks, rpc)
    proc = stacks.server_proc(rpc)
    log_start = len(proc.output())

    report = Report(rpc.server)
    report.add("schema-valid", await send(address, rpc.method, valid, metadata))
    report.add("random bytes", await send(address, rpc.method, garbage, metadata))
    if metadata is not None:
        every = WITHOUT_CREDENTIALS_EVERY
        report.add("schema-valid, no credentials", await send(address, rpc.method, valid[::every], None))
        report.add("random bytes, no credentials", await send(address, rpc.method, garbage[::every], None))

    where = f"{rpc.name} (seed {draw_seed})"
    assert report.violations == [], f"{where}: {len(report.violations)} bad answers, e.g. {report.violations[:5]}"
    assert proc.popen.poll() is None, f"{where}: the {rpc.server} exited:\n{proc.output()[-3000:]}"
    assert health_status(address) == SERVING, where
    log = proc.output()[log_start:]
    alarms = [line for line in log.splitlines() if any(a in line for a in LOG_ALARMS)]
    assert alarms == [], f"{where}: the {rpc.server} logged {alarms[:3]}\n{log[-6000:]}"
    print(f"{rpc.name}: {report.calls} calls, {dict(report.codes)}")
    if report.instance_errors:
        print(f"  passed through from the instance: {dict(report.instance_errors)}")


UNDECODABLE = b"\xff\xff\xff"
TYPED_GATEWAY_RPCS = [
    rpc
    for rpc in RPCS
    if rpc.server == "gateway" and rpc.method.name not in ("ModelInfer", "ModelMetadata", "ModelStreamInfer")
]


async def test_gateway_refuses_undecodable_requests_with_invalid_argument(stacks: Stacks) -> None:
    answers = {}
    for rpc in TYPED_GATEWAY_RPCS:
        [outcome] = await send(stacks.gateway.address, rpc.method, [UNDECODABLE], credentials(stacks, rpc))
        answers[rpc.name] = outcome.code.name
    assert answers == dict.fromkeys(answers, "INVALID_ARGUMENT")


async def test_requests_at_the_edges_of_every_range_get_no_internal_error(stacks: Stacks) -> None:
    """Deterministic complement of the random requests: for every RPC, one request with
    every field at the low end of its range and one at the high end (proto_strategies.
    boundary_messages), e.g. a heartbeat reporting 2**64 - 1 MiB of GPU memory."""
    report = {"control-plane": Report("control-plane"), "gateway": Report("gateway")}
    for rpc in RPCS:
        for message in boundary_messages(rpc.method.input_type):
            outcomes = await send(
                stacks.address(rpc), rpc.method, [message.SerializeToString()], credentials(stacks, rpc)
            )
            report[rpc.server].add(rpc.name, outcomes)
    violations = [v for r in report.values() for v in r.violations]
    assert violations == [], violations
    for server, server_report in report.items():
        assert health_status(stacks.address(RPCS[0] if server == "control-plane" else RPCS[-1])) == SERVING
        print(f"{server}: {server_report.calls} boundary calls, {dict(server_report.codes)}")
