from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from gpufleet.gateway.admission import DeploymentAdmission
from gpufleet.gateway.config import AdmissionConfig
from gpufleet.gateway.errors import GatewayError, Reason
from gpufleet.gateway.route_table import RouteTable
from gpufleet.gateway.upstreams import UpstreamPool
from gpufleet.v1 import deployment_pb2, routing_service_pb2 as rs

pytestmark = pytest.mark.timeout(20)


def _route(
    name: str,
    *endpoints: tuple[str, str],
    concurrency: int = 1,
    service: str = "",
    weight: int = 0,
    draining: tuple[str, ...] = (),
) -> rs.DeploymentRoute:
    return rs.DeploymentRoute(
        deployment=name,
        endpoints=[
            rs.Endpoint(instance_id=i, address=a, draining=i in draining) for i, a in endpoints
        ],
        traffic=deployment_pb2.TrafficSpec(max_request_concurrency=concurrency),
        service=service,
        service_weight=weight,
        invoke_token_sha256="AB12",
    )


def _snapshot(*routes: rs.DeploymentRoute) -> rs.WatchRoutesResponse:
    return rs.WatchRoutesResponse(snapshot=True, routes=list(routes))


def _update(*routes: rs.DeploymentRoute, removed: tuple[str, ...] = ()) -> rs.WatchRoutesResponse:
    return rs.WatchRoutesResponse(routes=list(routes), removed_deployments=list(removed))


@pytest.fixture
def pool() -> UpstreamPool:
    return UpstreamPool()


async def test_snapshot_then_updates(pool: UpstreamPool) -> None:
    table = RouteTable(pool)
    assert not table.synced
    table.apply(_snapshot(_route("a", ("a-1", "h:1")), _route("b")))
    assert table.synced
    await asyncio.wait_for(table.wait_synced(), 1)
    a = table.deployment("a")
    assert a is not None and a.addresses == {"a-1": "h:1"}
    assert a.invoke_token_sha256 == "ab12"  # hex compared lowercase
    assert [s.name for s in table.deployments()] == ["a", "b"]

    table.apply(_update(_route("a", ("a-2", "h:2"), concurrency=3)))
    assert table.deployment("a") is a  # same admission: queued calls keep their place
    assert a.addresses == {"a-2": "h:2"}
    assert a.admission.config.max_request_concurrency == 3
    assert [v.instance_id for v in a.admission.endpoint_views()] == ["a-2"]

    table.apply(_update(removed=("b",)))
    assert table.deployment("b") is None

    table.apply(_snapshot(_route("c")))
    assert [s.name for s in table.deployments()] == ["c"]
    assert a.admission.closed


async def test_removal_fails_queued_calls() -> None:
    table = RouteTable(UpstreamPool())
    table.apply(_snapshot(_route("a")))
    state = table.deployment("a")
    assert state is not None
    waiting = asyncio.ensure_future(state.admission.acquire(timeout=10))
    await asyncio.sleep(0)
    assert state.admission.queue_depth == 1
    table.apply(_update(removed=("a",)))
    with pytest.raises(GatewayError) as caught:
        await waiting
    assert caught.value.reason is Reason.ROUTE_TARGET_NOT_FOUND


async def test_endpoints_without_id_or_address_are_ignored() -> None:
    table = RouteTable(UpstreamPool())
    table.apply(_snapshot(_route("a", ("", "h:1"), ("a-1", ""), ("a-2", "h:2"))))
    state = table.deployment("a")
    assert state is not None and state.addresses == {"a-2": "h:2"}


async def test_has_ready_endpoint_ignores_draining() -> None:
    table = RouteTable(UpstreamPool())
    table.apply(_snapshot(_route("a", ("a-1", "h:1"), draining=("a-1",))))
    state = table.deployment("a")
    assert state is not None and not state.has_ready_endpoint()
    table.apply(_update(_route("a", ("a-1", "h:1"))))
    assert state.has_ready_endpoint()


async def test_service_split_is_exact_and_interleaved() -> None:
    table = RouteTable(UpstreamPool())
    table.apply(
        _snapshot(
            _route("stable", service="svc", weight=90),
            _route("canary", service="svc", weight=10),
            _route("off", service="svc", weight=0),
        )
    )
    picks = []
    for _ in range(100):
        state = table.resolve("svc")
        assert state is not None
        picks.append(state.name)
    assert Counter(picks) == {"stable": 90, "canary": 10}
    assert "canary" in picks[:10]  # interleaved, not 90 in a row first
    assert [s.name for s in table.candidates("svc")] == ["canary", "stable"]
    resolved = table.resolve("stable")
    assert resolved is not None and resolved.name == "stable"
    assert table.resolve("nope") is None and table.candidates("nope") == []


async def test_service_name_takes_precedence_over_a_deployment_of_that_name() -> None:
    table = RouteTable(UpstreamPool())
    table.apply(
        _snapshot(_route("llm", service="llm", weight=1), _route("llm-canary", service="llm",
                                                                 weight=1))
    )
    names = set()
    for _ in range(4):
        state = table.resolve("llm")
        assert state is not None
        names.add(state.name)
    assert names == {"llm", "llm-canary"}


async def test_admission_factory_and_bad_config_keep_previous() -> None:
    made: list[str] = []

    def factory(name: str, config: AdmissionConfig) -> DeploymentAdmission:
        made.append(name)
        return DeploymentAdmission(name, config)

    table = RouteTable(UpstreamPool(), factory)
    table.apply(_snapshot(_route("a", concurrency=2)))
    bad = _route("a")
    bad.traffic.rate_limit_per_second = -1.0
    table.apply(_update(bad))
    state = table.deployment("a")
    assert made == ["a"]
    assert state is not None and state.admission.config.max_request_concurrency == 2


async def test_upstream_channels_close_when_unused_and_unlisted(pool: UpstreamPool) -> None:
    table = RouteTable(pool)
    table.apply(_snapshot(_route("a", ("a-1", "127.0.0.1:9"))))
    with pool.checkout("127.0.0.1:9") as upstream:
        assert pool.addresses == {"127.0.0.1:9"}
        table.apply(_update(_route("a")))
        # Still used by a call: kept until it ends.
        assert pool.addresses == {"127.0.0.1:9"}
        assert upstream.address == "127.0.0.1:9"
    assert pool.addresses == frozenset()
    # A listed address keeps its channel between calls.
    table.apply(_update(_route("a", ("a-1", "127.0.0.1:9"))))
    first = pool.checkout("127.0.0.1:9")
    first.release()
    first.release()
    second = pool.checkout("127.0.0.1:9")
    assert second.channel is first.channel
    second.release()
    await pool.close()
    assert pool.addresses == frozenset()
    with pytest.raises(RuntimeError, match="closed"):
        pool.checkout("127.0.0.1:9")
