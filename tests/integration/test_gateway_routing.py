"""Route rules, `deploy-route-target` and weighted service splits through a real gateway.

Both instance ids of a deployment point at one model server process: which instance a call
went to is the gateway's decision, reported in `deploy-route-target`.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from gpufleet.gateway.app import Gateway
from gpufleet.inference import grpc_service_pb2 as pb
from gpufleet.inference import grpc_service_pb2_grpc as pb_grpc
from tests.integration.test_gateway_support import (
    AUTH,
    ROUTE_TARGET_KEY,
    ModelServer,
    control_plane,
    error_info,
    failure,
    metadata_dict,
    route,
    running_gateway,
    start_model_server,
)

pytestmark = pytest.mark.timeout(60)

CANARY_CALLS = 2000
CANARY_CONCURRENCY = 16
# The canary has its own invoke token, as every deployment does in real use: a call to the
# service must work with the token of any of its deployments, whichever the split picks.
CANARY_TOKEN = "canary-secret"
CANARY_AUTH = (("authorization", f"Bearer {CANARY_TOKEN}"),)


@pytest.fixture(scope="module")
def model_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelServer]:
    server = start_model_server(tmp_path_factory.mktemp("routing"))
    yield server
    server.stop()


@pytest.fixture
async def gateway(model_server: ModelServer) -> AsyncIterator[Gateway]:
    address = model_server.address
    routes = (
        route("echo", [("inst-a", address), ("inst-b", address)], max_request_concurrency=4),
        route("svc-stable", [("stable-1", address)], service="svc", weight=90,
              max_request_concurrency=CANARY_CONCURRENCY),
        route("svc-canary", [("canary-1", address)], service="svc", weight=10,
              max_request_concurrency=CANARY_CONCURRENCY, token=CANARY_TOKEN),
    )
    async with control_plane(*routes) as plane:
        async with running_gateway(plane) as running:
            yield running


@pytest.fixture
async def stub(gateway: Gateway) -> AsyncIterator[pb_grpc.GRPCInferenceServiceAsyncStub]:
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def _request(model: str = "echo") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="INPUT0", datatype="INT32", shape=[1]).contents.int_contents.append(1)
    return request


async def _target(
    stub: pb_grpc.GRPCInferenceServiceAsyncStub,
    *metadata: tuple[str, str],
    model: str = "echo",
    auth: tuple[tuple[str, str], ...] = AUTH,
) -> str:
    call = stub.ModelInfer(_request(model), metadata=(*auth, *metadata), timeout=10)
    await call
    target = metadata_dict(await call.initial_metadata())[ROUTE_TARGET_KEY]
    assert isinstance(target, str)
    return target


async def test_default_rule_takes_idle_instances_in_turn(
    stub: pb_grpc.GRPCInferenceServiceAsyncStub,
) -> None:
    targets = [await _target(stub) for _ in range(4)]
    assert targets in (["inst-a", "inst-b"] * 2, ["inst-b", "inst-a"] * 2)


async def test_round_robin_and_least_request(stub: pb_grpc.GRPCInferenceServiceAsyncStub) -> None:
    rule = ("deploy-route-rule", "round-robin")
    rotated = [await _target(stub, rule) for _ in range(4)]
    assert rotated in (["inst-a", "inst-b"] * 2, ["inst-b", "inst-a"] * 2)
    least = ("deploy-route-rule", "least-request")
    # Serial calls stay on the first instance so that the other can go idle.
    assert [await _target(stub, least) for _ in range(3)] == ["inst-a"] * 3


async def test_instance_id_rule_pins_the_call(stub: pb_grpc.GRPCInferenceServiceAsyncStub) -> None:
    pinned = ("deploy-route-rule", "inst-b")
    assert [await _target(stub, pinned) for _ in range(3)] == ["inst-b"] * 3


async def test_unknown_instance_id_is_route_target_not_found(
    stub: pb_grpc.GRPCInferenceServiceAsyncStub,
) -> None:
    metadata = (*AUTH, ("deploy-route-rule", "inst-zzz"))
    err = await failure(stub.ModelInfer(_request(), metadata=metadata, timeout=10))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    info = error_info(err)
    assert (info.reason, info.domain) == ("ROUTE_TARGET_NOT_FOUND", "gpufleet.dev")
    assert info.metadata["instance"] == "inst-zzz"


async def test_hash_rule_is_sticky_per_key(stub: pb_grpc.GRPCInferenceServiceAsyncStub) -> None:
    rule = ("deploy-route-rule", "hash:session-id")
    owners: dict[str, set[str]] = {}
    for key in [f"user-{n}" for n in range(12)]:
        owners[key] = {await _target(stub, rule, ("session-id", key)) for _ in range(3)}
    assert all(len(targets) == 1 for targets in owners.values()), owners
    # Rendezvous hashing spreads keys: twelve keys do not all land on one instance.
    assert {next(iter(t)) for t in owners.values()} == {"inst-a", "inst-b"}


async def test_malformed_rule_is_invalid_argument(
    stub: pb_grpc.GRPCInferenceServiceAsyncStub,
) -> None:
    metadata = (*AUTH, ("deploy-route-rule", "hash:"))
    err = await failure(stub.ModelInfer(_request(), metadata=metadata, timeout=10))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    raw = metadata_dict(err.trailing_metadata())["grpc-status-details-bin"]
    details = status_pb2.Status.FromString(raw).details
    bad = error_details_pb2.BadRequest()
    assert any(d.Unpack(bad) for d in details if d.Is(error_details_pb2.BadRequest.DESCRIPTOR))
    assert bad.field_violations[0].field == "deploy-route-rule"


async def test_canary_split_90_10_over_2000_calls(
    stub: pb_grpc.GRPCInferenceServiceAsyncStub,
) -> None:
    counts: Counter[str] = Counter()
    remaining = iter(range(CANARY_CALLS))

    async def worker() -> None:
        for _ in remaining:
            counts[await _target(stub, model="svc")] += 1

    await asyncio.gather(*(worker() for _ in range(CANARY_CONCURRENCY)))
    assert sum(counts.values()) == CANARY_CALLS
    canary_share = counts["canary-1"] / CANARY_CALLS
    assert abs(canary_share - 0.10) <= 0.03, counts
    assert set(counts) == {"stable-1", "canary-1"}


async def test_a_service_takes_the_token_of_any_of_its_deployments(
    stub: pb_grpc.GRPCInferenceServiceAsyncStub,
) -> None:
    targets = {await _target(stub, model="svc", auth=CANARY_AUTH) for _ in range(20)}
    assert targets == {"stable-1", "canary-1"}


async def test_a_deployment_of_a_service_is_callable_by_its_own_name(
    stub: pb_grpc.GRPCInferenceServiceAsyncStub,
) -> None:
    assert {await _target(stub, model="svc-canary", auth=CANARY_AUTH) for _ in range(3)} == {
        "canary-1"
    }


async def test_a_deployment_called_by_name_needs_its_own_token(
    stub: pb_grpc.GRPCInferenceServiceAsyncStub,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _target(stub, model="svc-canary", auth=AUTH)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
