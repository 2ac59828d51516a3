"""Issue 5, fault 8: the auth matrix. Every RPC that needs a credential, called with each
wrong one, is refused: UNAUTHENTICATED without a credential, PERMISSION_DENIED with one
that is not accepted there.

- Admin API (DeploymentService) and RoutingService: no token, a wrong token, a
  deployment's invoke token, a node's secret (with its node id), the join token.
- NodeService.Connect of node A: no token, node A's secret without its id, a wrong
  secret, the admin token, node B's secret, an invoke token.
- NodeService.Register (its credential is the join token in the request): none, a wrong
  one, the admin token, a node secret, an invoke token; and taking over node A's id with
  another secret.
- Gateway (ModelReady, ModelMetadata, ModelInfer, ModelStreamInfer of deployment alpha,
  and the transparent proxy): no token, a wrong token, deployment beta's invoke token, the
  admin token, a node secret.

Open by design, so not in the matrix (DESIGN.md): grpc.health.v1 and reflection on both
servers, and the gateway's own ServerLive, ServerReady and ServerMetadata.

Each refusal is checked next to the accepted credential on the same RPC, so that a
refusal cannot come from a malformed request. No agent runs: nothing here starts an
instance.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import grpc
import pytest
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message

from gpufleet.inference import grpc_service_pb2 as oip
from gpufleet.v1 import (
    deployment_service_pb2 as dpb,
    node_service_pb2 as npb,
    routing_service_pb2 as rpb,
)
from tests.e2e.conftest import ControlPlaneProc, Processes
from tests.reliability.conftest import (
    GatewayProc,
    bearer,
    create,
    deployment,
    register_node,
    start_gateway,
    start_plane,
)
from tests.reliability.raw_calls import Metadata, call

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

NODE_ID_KEY = "gpufleet-node-id"
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED
REFUSALS = (UNAUTHENTICATED, PERMISSION_DENIED)
DEPLOYMENT_SERVICE = dpb.DESCRIPTOR.services_by_name["DeploymentService"]
ROUTING_SERVICE = rpb.DESCRIPTOR.services_by_name["RoutingService"]
NODE_SERVICE = npb.DESCRIPTOR.services_by_name["NodeService"]
INFERENCE_SERVICE = oip.DESCRIPTOR.services_by_name["GRPCInferenceService"]
TOKEN_RPCS = ("ModelReady", "ModelMetadata", "ModelInfer", "ModelStreamInfer")


@dataclass
class Node:
    node_id: str
    secret: str


@dataclass
class Stack:
    plane: ControlPlaneProc
    gateway: GatewayProc
    alpha_token: str
    beta_token: str
    node_a: Node
    node_b: Node


@pytest.fixture(scope="module")
def stack(module_processes: Processes) -> Stack:
    plane = start_plane(module_processes, module_processes.tmp_path / "server")
    alpha = create(plane, deployment("alpha", min_instances=0))
    beta = create(plane, deployment("beta", min_instances=0))
    nodes = [register_node(plane, name) for name in ("node-a", "node-b")]
    gateway = start_gateway(module_processes, plane)
    a, b = (Node(n.node_id, n.node_secret) for n in nodes)
    return Stack(plane, gateway, alpha, beta, a, b)


@dataclass(frozen=True)
class Case:
    """One call of the matrix and the answer it must get."""

    method: MethodDescriptor
    credential: str
    metadata: Metadata | None
    expected: tuple[grpc.StatusCode, ...]
    request: Message | None = None

    @property
    def label(self) -> str:
        return f"{self.method.containing_service.name}.{self.method.name} with {self.credential}"


def _request(method: MethodDescriptor, model: str = "alpha") -> list[bytes]:
    """A well-formed request for `method` (none for Connect, refused before any message)."""
    if method.name == "Connect":
        return []
    if method.containing_service.full_name == INFERENCE_SERVICE.full_name:
        if method.name == "ModelReady":
            return [oip.ModelReadyRequest(name=model).SerializeToString()]
        if method.name == "ModelMetadata":
            return [oip.ModelMetadataRequest(name=model).SerializeToString()]
        return [oip.ModelInferRequest(model_name=model, id="auth").SerializeToString()]
    return [b""]  # every admin and routing request is valid empty, or refused before use


async def _answer(address: str, case: Case) -> grpc.StatusCode:
    payloads = [case.request.SerializeToString()] if case.request is not None else _request(case.method)
    async with grpc.aio.insecure_channel(address) as channel:
        outcome = await call(channel, case.method, payloads, case.metadata, timeout=10.0)
    if outcome.client_send_failure:
        raise AssertionError(f"{case.label}: the client could not read the server's answer")
    return outcome.code


def admin_cases(stack: Stack) -> list[Case]:
    wrong = {
        "no token": None,
        "a wrong token": bearer("not-a-token"),
        "an invoke token": bearer(stack.alpha_token),
        "a node secret": (*bearer(stack.node_a.secret), (NODE_ID_KEY, stack.node_a.node_id)),
        "the join token": bearer(stack.plane.join_token),
    }
    cases = []
    for service in (DEPLOYMENT_SERVICE, ROUTING_SERVICE):
        for method in service.methods:
            for name, metadata in wrong.items():
                expected = (UNAUTHENTICATED,) if metadata is None else (PERMISSION_DENIED,)
                cases.append(Case(method, name, metadata, expected))
    return cases


def connect_cases(stack: Stack) -> list[Case]:
    connect = NODE_SERVICE.methods_by_name["Connect"]
    a, b = stack.node_a, stack.node_b
    as_a = ((NODE_ID_KEY, a.node_id),)
    wrong: dict[str, tuple[Metadata | None, grpc.StatusCode]] = {
        "no token": (as_a, UNAUTHENTICATED),
        "node A's secret without its id": (bearer(a.secret), UNAUTHENTICATED),
        "a wrong secret": ((*bearer("not-a-secret"), *as_a), PERMISSION_DENIED),
        "the admin token on node A's stream": ((*bearer(stack.plane.admin_token), *as_a), PERMISSION_DENIED),
        "node B's secret on node A's stream": ((*bearer(b.secret), *as_a), PERMISSION_DENIED),
        "an invoke token": ((*bearer(stack.alpha_token), *as_a), PERMISSION_DENIED),
    }
    return [Case(connect, name, metadata, (code,)) for name, (metadata, code) in wrong.items()]


def register_cases(stack: Stack) -> list[Case]:
    method = NODE_SERVICE.methods_by_name["Register"]
    tokens = {
        "no join token": ("", UNAUTHENTICATED),
        "a wrong join token": ("not-a-join-token", PERMISSION_DENIED),
        "the admin token as join token": (stack.plane.admin_token, PERMISSION_DENIED),
        "a node secret as join token": (stack.node_a.secret, PERMISSION_DENIED),
        "an invoke token as join token": (stack.alpha_token, PERMISSION_DENIED),
    }
    cases = [
        Case(method, name, None, (code,), npb.RegisterRequest(join_token=token, node_name="intruder"))
        for name, (token, code) in tokens.items()
    ]
    takeover = npb.RegisterRequest(
        join_token=stack.plane.join_token,
        node_name="node-a",
        node_id=stack.node_a.node_id,
        node_secret=stack.node_b.secret,
    )
    cases.append(Case(method, "node A's id and node B's secret", None, (PERMISSION_DENIED,), takeover))
    return cases


def gateway_cases(stack: Stack) -> list[Case]:
    wrong = {
        "no token": None,
        "a wrong token": bearer("not-a-token"),
        "another deployment's invoke token": bearer(stack.beta_token),
        "the admin token": bearer(stack.plane.admin_token),
        "a node secret": bearer(stack.node_a.secret),
    }
    return [
        Case(INFERENCE_SERVICE.methods_by_name[rpc], name, metadata, (UNAUTHENTICATED,) if metadata is None else (PERMISSION_DENIED,))
        for rpc in TOKEN_RPCS
        for name, metadata in wrong.items()
    ]


def _mismatches(answers: Sequence[tuple[Case, grpc.StatusCode]]) -> list[str]:
    return [f"{case.label}: {code.name}" for case, code in answers if code not in case.expected]


async def test_admin_and_routing_apis_refuse_every_wrong_credential(stack: Stack) -> None:
    cases = admin_cases(stack)
    answers = [(case, await _answer(stack.plane.address, case)) for case in cases]
    assert _mismatches(answers) == []
    # The admin token itself passes the same calls' authentication.
    for method in (*DEPLOYMENT_SERVICE.methods, *ROUTING_SERVICE.methods):
        code = await _answer(stack.plane.address, Case(method, "admin", bearer(stack.plane.admin_token), ()))
        assert code not in REFUSALS, f"{method.name} refused the admin token: {code.name}"
    print(f"admin and routing APIs: {len(cases)} wrong credentials, all refused")


async def test_node_service_refuses_every_wrong_credential(stack: Stack) -> None:
    cases = [*connect_cases(stack), *register_cases(stack)]
    answers = [(case, await _answer(stack.plane.address, case)) for case in cases]
    assert _mismatches(answers) == []
    # Node A's own credentials open its stream; its own id and secret re-register it.
    a = stack.node_a
    connect = NODE_SERVICE.methods_by_name["Connect"]
    heartbeat = npb.ConnectRequest(heartbeat=npb.Heartbeat(agent_version="auth-test"))
    own = Case(connect, "node A's own", (*bearer(a.secret), (NODE_ID_KEY, a.node_id)), (), heartbeat)
    assert await _answer(stack.plane.address, own) == grpc.StatusCode.OK
    again = npb.RegisterRequest(node_name="node-a", node_id=a.node_id, node_secret=a.secret)
    register = NODE_SERVICE.methods_by_name["Register"]
    assert await _answer(stack.plane.address, Case(register, "own", None, (), again)) == grpc.StatusCode.OK
    assert {n.name for n in stack.plane.nodes()} == {"node-a", "node-b"}, "a refused Register added a node"
    print(f"node service: {len(cases)} wrong credentials, all refused")


async def test_gateway_refuses_every_wrong_invoke_token(stack: Stack) -> None:
    cases = gateway_cases(stack)
    answers = [(case, await _answer(stack.gateway.address, case)) for case in cases]
    # The transparent proxy: any other method, addressed to alpha by metadata.
    proxied = INFERENCE_SERVICE.methods_by_name["ModelInfer"]
    for name, token in (("no token", None), ("another deployment's invoke token", stack.beta_token)):
        metadata = (("gpufleet-deployment", "alpha"), *(bearer(token) if token else ()))
        async with grpc.aio.insecure_channel(stack.gateway.address) as channel:
            try:
                await channel.unary_unary("/custom.v1.Service/Method", None, None)(b"", metadata=metadata, timeout=10)
            except grpc.aio.AioRpcError as err:
                code = err.code()
            else:
                code = grpc.StatusCode.OK
        expected = (UNAUTHENTICATED,) if token is None else (PERMISSION_DENIED,)
        answers.append((Case(proxied, f"proxy /custom.v1.Service/Method, {name}", metadata, expected), code))
    assert _mismatches(answers) == []
    # alpha's own token passes: ModelReady answers (not ready: alpha has no instance).
    ready = INFERENCE_SERVICE.methods_by_name["ModelReady"]
    own = Case(ready, "alpha's own", bearer(stack.alpha_token), ())
    assert await _answer(stack.gateway.address, own) == grpc.StatusCode.OK
    print(f"gateway: {len(answers)} wrong invoke tokens, all refused")
