"""DeploymentService over real gRPC: every RPC, every error code, watch, health, reflection."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator, Awaitable, Iterable
from typing import cast

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from gpufleet.server.api.error_mapping import ERROR_DOMAIN, INTERNAL_MESSAGE
from gpufleet.v1 import deployment_pb2, deployment_service_pb2 as pb, instance_pb2, node_pb2
from tests.integration.conftest import RunningControlPlane, make_spec, rich_status

Code = grpc.StatusCode
Phase = deployment_pb2.DeploymentPhase
EventType = pb.EventType

pytestmark = pytest.mark.timeout(60)


async def create(
    cp: RunningControlPlane,
    name: str,
    labels: dict[str, str] | None = None,
    min_instances: int = 0,
    max_instances: int = 0,
) -> pb.CreateDeploymentResponse:
    spec = make_spec(min_instances=min_instances, max_instances=max_instances)
    return await cp.stub.CreateDeployment(
        pb.CreateDeploymentRequest(
            deployment=deployment_pb2.Deployment(name=name, labels=labels or {}, spec=spec)
        ),
        metadata=cp.metadata,
    )


async def expect_error(call: Awaitable[object], code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value.details()
    return caught.value


async def add_instance(
    cp: RunningControlPlane,
    deployment: str,
    instance_id: str,
    state: instance_pb2.InstanceState.ValueType = instance_pb2.INSTANCE_STATE_READY,
    reason: str = "",
) -> None:
    store = cp.plane.store
    await store.put_node(node_pb2.Node(id="node-1", name="n1"), "0" * 64)
    await store.put_instance(
        instance_pb2.Instance(
            id=instance_id, deployment=deployment, node_id="node-1", state=state, reason=reason
        ),
        make_spec(),
    )


async def test_create_and_get(control_plane: RunningControlPlane) -> None:
    cp = control_plane
    created = await create(cp, "echo", {"team": "ml"})
    d = created.deployment
    assert (d.name, d.revision, d.generation) == ("echo", 1, 1)
    assert dict(d.labels) == {"team": "ml"}
    # Stored with defaults filled in.
    assert d.spec.scaling.max_instances == 1
    assert d.spec.traffic.max_request_concurrency == 1
    assert d.spec.readiness_probe.HasField("grpc")
    assert d.status.phase == Phase.DEPLOYMENT_PHASE_STANDBY
    assert len(created.invoke_token) >= 32
    record = await cp.plane.store.get_deployment("echo")
    assert record.invoke_token_sha256 == hashlib.sha256(created.invoke_token.encode()).hexdigest()
    got = await cp.stub.GetDeployment(pb.GetDeploymentRequest(name="echo"), metadata=cp.metadata)
    assert got.deployment == d


async def test_create_ignores_output_only_fields(control_plane: RunningControlPlane) -> None:
    cp = control_plane
    given = deployment_pb2.Deployment(name="echo", spec=make_spec(), revision=99, generation=7)
    given.status.phase = Phase.DEPLOYMENT_PHASE_RUNNING
    given.delete_time.GetCurrentTime()
    resp = await cp.stub.CreateDeployment(
        pb.CreateDeploymentRequest(deployment=given), metadata=cp.metadata
    )
    assert (resp.deployment.revision, resp.deployment.generation) == (1, 1)
    assert not resp.deployment.HasField("delete_time")
    assert resp.deployment.status.phase == Phase.DEPLOYMENT_PHASE_STANDBY


async def test_create_duplicate_is_already_exists(control_plane: RunningControlPlane) -> None:
    await create(control_plane, "echo")
    err = await expect_error(create(control_plane, "echo"), Code.ALREADY_EXISTS)
    details = rich_status(err)
    assert details.error_info is not None
    assert details.error_info.domain == ERROR_DOMAIN
    assert details.error_info.reason == "ALREADY_EXISTS"
    assert details.error_info.metadata["name"] == "echo"
    assert details.status.message == err.details()


async def test_invalid_spec_lists_every_violation(control_plane: RunningControlPlane) -> None:
    cp = control_plane
    bad = deployment_pb2.Deployment(
        name="Bad_Name",
        spec=deployment_pb2.DeploymentSpec(
            port=70000,
            env={"1X": "v"},
            gpu=deployment_pb2.GpuRequest(count=1, core_percent=150),
            scaling=deployment_pb2.ScalingSpec(min_instances=5, max_instances=2),
        ),
    )
    err = await expect_error(
        cp.stub.CreateDeployment(pb.CreateDeploymentRequest(deployment=bad), metadata=cp.metadata),
        Code.INVALID_ARGUMENT,
    )
    details = rich_status(err)
    assert details.bad_request is not None
    fields = {v.field for v in details.bad_request.field_violations}
    assert {
        "deployment.name",
        "deployment.spec.command",
        "deployment.spec.port",
        'deployment.spec.env["1X"]',
        "deployment.spec.gpu.core_percent",
    } <= fields
    assert any(f.startswith("deployment.spec.scaling") for f in fields)
    assert all(v.description for v in details.bad_request.field_violations)
    assert details.error_info is not None and details.error_info.reason == "INVALID_ARGUMENT"
    # Nothing was stored.
    listed = await cp.stub.ListDeployments(pb.ListDeploymentsRequest(), metadata=cp.metadata)
    assert list(listed.deployments) == []


async def test_get_errors(control_plane: RunningControlPlane) -> None:
    cp = control_plane
    err = await expect_error(
        cp.stub.GetDeployment(pb.GetDeploymentRequest(name="missing"), metadata=cp.metadata),
        Code.NOT_FOUND,
    )
    assert "'missing' does not exist" in (err.details() or "")
    info = rich_status(err).error_info
    assert info is not None and info.reason == "NOT_FOUND"
    err = await expect_error(
        cp.stub.GetDeployment(pb.GetDeploymentRequest(name="NOPE!"), metadata=cp.metadata),
        Code.INVALID_ARGUMENT,
    )
    bad_request = rich_status(err).bad_request
    assert bad_request is not None
    assert [v.field for v in bad_request.field_violations] == ["name"]


async def test_list_pages_and_filters(control_plane: RunningControlPlane) -> None:
    cp = control_plane
    for i in range(7):
        await create(cp, f"d{i}", {"team": "a" if i % 2 else "b"})
    names: list[str] = []
    token = ""
    pages = 0
    while True:
        page = await cp.stub.ListDeployments(
            pb.ListDeploymentsRequest(page_size=3, page_token=token), metadata=cp.metadata
        )
        pages += 1
        names.extend(d.name for d in page.deployments)
        assert all(d.status.phase == Phase.DEPLOYMENT_PHASE_STANDBY for d in page.deployments)
        token = page.next_page_token
        if not token:
            break
    assert pages == 3
    assert names == [f"d{i}" for i in range(7)]
    team_a = await cp.stub.ListDeployments(
        pb.ListDeploymentsRequest(label_selector="team=a"), metadata=cp.metadata
    )
    assert [d.name for d in team_a.deployments] == ["d1", "d3", "d5"]


async def test_list_rejects_bad_requests_all_at_once(control_plane: RunningControlPlane) -> None:
    cp = control_plane
    err = await expect_error(
        cp.stub.ListDeployments(
            pb.ListDeploymentsRequest(page_size=5000, label_selector="novalue"),
            metadata=cp.metadata,
        ),
        Code.INVALID_ARGUMENT,
    )
    bad_request = rich_status(err).bad_request
    assert bad_request is not None
    assert {v.field for v in bad_request.field_violations} == {"page_size", "label_selector"}
    await expect_error(
        cp.stub.ListDeployments(
            pb.ListDeploymentsRequest(page_token="not-a-token"), metadata=cp.metadata
        ),
        Code.INVALID_ARGUMENT,
    )


async def test_update_checks_revision(control_plane: RunningControlPlane) -> None:
    cp = control_plane
    first = (await create(cp, "echo")).deployment
    changed = deployment_pb2.Deployment(
        name="echo", labels={"v": "2"}, spec=make_spec("python -m echo_server --v2")
    )
    updated = await cp.stub.UpdateDeployment(
        pb.UpdateDeploymentRequest(deployment=changed, revision=first.revision),
        metadata=cp.metadata,
    )
    assert updated.deployment.generation == 2
    assert updated.deployment.revision > first.revision
    assert updated.deployment.spec.command.endswith("--v2")

    stale = await expect_error(
        cp.stub.UpdateDeployment(
            pb.UpdateDeploymentRequest(deployment=changed, revision=first.revision),
            metadata=cp.metadata,
        ),
        Code.ABORTED,
    )
    info = rich_status(stale).error_info
    assert info is not None and info.reason == "REVISION_MISMATCH"
    assert info.metadata["revision"] == str(updated.deployment.revision)

    zero = await expect_error(
        cp.stub.UpdateDeployment(
            pb.UpdateDeploymentRequest(deployment=deployment_pb2.Deployment(name="echo")),
            metadata=cp.metadata,
        ),
        Code.INVALID_ARGUMENT,
    )
    bad_request = rich_status(zero).bad_request
    assert bad_request is not None
    violations = {v.field: v.description for v in bad_request.field_violations}
    assert "revision you read" in violations["revision"]
    assert "deployment.spec.command" in violations

    await expect_error(
        cp.stub.UpdateDeployment(
            pb.UpdateDeploymentRequest(
                deployment=deployment_pb2.Deployment(name="ghost", spec=make_spec()), revision=1
            ),
            metadata=cp.metadata,
        ),
        Code.NOT_FOUND,
    )


async def test_delete_without_instances_removes(control_plane: RunningControlPlane) -> None:
    cp = control_plane
    d = (await create(cp, "echo")).deployment
    await expect_error(
        cp.stub.DeleteDeployment(
            pb.DeleteDeploymentRequest(name="echo", revision=d.revision + 5), metadata=cp.metadata
        ),
        Code.ABORTED,
    )
    resp = await cp.stub.DeleteDeployment(
        pb.DeleteDeploymentRequest(name="echo", revision=d.revision), metadata=cp.metadata
    )
    assert resp.removed and not resp.HasField("deployment")
    await expect_error(
        cp.stub.GetDeployment(pb.GetDeploymentRequest(name="echo"), metadata=cp.metadata),
        Code.NOT_FOUND,
    )
    await expect_error(
        cp.stub.DeleteDeployment(pb.DeleteDeploymentRequest(name="echo"), metadata=cp.metadata),
        Code.NOT_FOUND,
    )
    await expect_error(
        cp.stub.DeleteDeployment(pb.DeleteDeploymentRequest(name="-x"), metadata=cp.metadata),
        Code.INVALID_ARGUMENT,
    )


async def test_delete_with_instances_drains(control_plane: RunningControlPlane) -> None:
    cp = control_plane
    await create(cp, "echo", min_instances=1, max_instances=2)
    await add_instance(cp, "echo", "echo-1")
    running = await cp.stub.GetDeployment(
        pb.GetDeploymentRequest(name="echo"), metadata=cp.metadata
    )
    assert running.deployment.status.phase == Phase.DEPLOYMENT_PHASE_RUNNING
    assert running.deployment.status.ready_instances == 1
    assert running.deployment.status.desired_instances == 1

    resp = await cp.stub.DeleteDeployment(
        pb.DeleteDeploymentRequest(name="echo"), metadata=cp.metadata
    )
    assert not resp.removed
    assert resp.deployment.HasField("delete_time")
    assert resp.deployment.status.phase == Phase.DEPLOYMENT_PHASE_DRAINING
    listed = await cp.stub.ListInstances(
        pb.ListInstancesRequest(deployment="echo"), metadata=cp.metadata
    )
    assert [i.id for i in listed.instances] == ["echo-1"]
    err = await expect_error(
        cp.stub.ScaleDeployment(
            pb.ScaleDeploymentRequest(name="echo", min_instances=0), metadata=cp.metadata
        ),
        Code.FAILED_PRECONDITION,
    )
    assert "being deleted" in (err.details() or "")
    await expect_error(create(cp, "echo"), Code.ALREADY_EXISTS)

    await cp.plane.store.delete_instance("echo-1")
    assert await cp.plane.store.purge_deployment("echo")
    await expect_error(
        cp.stub.GetDeployment(pb.GetDeploymentRequest(name="echo"), metadata=cp.metadata),
        Code.NOT_FOUND,
    )


async def test_status_follows_instances(control_plane: RunningControlPlane) -> None:
    cp = control_plane
    await create(cp, "echo", max_instances=3)

    async def phase() -> deployment_pb2.DeploymentStatus:
        got = await cp.stub.GetDeployment(
            pb.GetDeploymentRequest(name="echo"), metadata=cp.metadata
        )
        return got.deployment.status

    assert (await phase()).phase == Phase.DEPLOYMENT_PHASE_STANDBY
    await add_instance(cp, "echo", "echo-1", instance_pb2.INSTANCE_STATE_STARTING)
    assert (await phase()).phase == Phase.DEPLOYMENT_PHASE_STARTING
    await add_instance(cp, "echo", "echo-2", instance_pb2.INSTANCE_STATE_FAILED, "exit code 1")
    failed = await phase()
    assert failed.phase == Phase.DEPLOYMENT_PHASE_FAILED
    assert "echo-2" in failed.message and "exit code 1" in failed.message
    await add_instance(cp, "echo", "echo-3", instance_pb2.INSTANCE_STATE_READY)
    running = await phase()
    assert (running.phase, running.ready_instances) == (Phase.DEPLOYMENT_PHASE_RUNNING, 1)


async def test_scale(control_plane: RunningControlPlane) -> None:
    cp = control_plane
    d = (await create(cp, "echo", max_instances=2)).deployment
    scaled = await cp.stub.ScaleDeployment(
        pb.ScaleDeploymentRequest(name="echo", min_instances=2), metadata=cp.metadata
    )
    assert scaled.deployment.spec.scaling.min_instances == 2
    assert scaled.deployment.spec.scaling.max_instances == 2
    assert scaled.deployment.generation == d.generation + 1
    assert scaled.deployment.status.desired_instances == 2

    err = await expect_error(
        cp.stub.ScaleDeployment(
            pb.ScaleDeploymentRequest(name="echo", max_instances=1), metadata=cp.metadata
        ),
        Code.INVALID_ARGUMENT,
    )
    bad_request = rich_status(err).bad_request
    assert bad_request is not None
    assert [v.field for v in bad_request.field_violations] == ["max_instances"]
    await expect_error(
        cp.stub.ScaleDeployment(pb.ScaleDeploymentRequest(name="echo"), metadata=cp.metadata),
        Code.INVALID_ARGUMENT,
    )
    await expect_error(
        cp.stub.ScaleDeployment(
            pb.ScaleDeploymentRequest(name="echo", max_instances=5, revision=d.revision),
            metadata=cp.metadata,
        ),
        Code.ABORTED,
    )
    await expect_error(
        cp.stub.ScaleDeployment(
            pb.ScaleDeploymentRequest(name="ghost", max_instances=5), metadata=cp.metadata
        ),
        Code.NOT_FOUND,
    )
    both = await cp.stub.ScaleDeployment(
        pb.ScaleDeploymentRequest(
            name="echo",
            min_instances=0,
            max_instances=9,
            revision=scaled.deployment.revision,
        ),
        metadata=cp.metadata,
    )
    scaling = both.deployment.spec.scaling
    assert (scaling.min_instances, scaling.max_instances) == (0, 9)


async def test_rotate_invoke_token(control_plane: RunningControlPlane) -> None:
    cp = control_plane
    created = await create(cp, "echo")
    rotated = await cp.stub.RotateInvokeToken(
        pb.RotateInvokeTokenRequest(name="echo"), metadata=cp.metadata
    )
    assert rotated.invoke_token and rotated.invoke_token != created.invoke_token
    record = await cp.plane.store.get_deployment("echo")
    assert record.invoke_token_sha256 == hashlib.sha256(rotated.invoke_token.encode()).hexdigest()
    await expect_error(
        cp.stub.RotateInvokeToken(pb.RotateInvokeTokenRequest(name="ghost"), metadata=cp.metadata),
        Code.NOT_FOUND,
    )


async def test_list_nodes_and_instances(control_plane: RunningControlPlane) -> None:
    cp = control_plane
    empty = await cp.stub.ListNodes(pb.ListNodesRequest(), metadata=cp.metadata)
    assert list(empty.nodes) == []
    await create(cp, "echo")
    await create(cp, "other")
    await add_instance(cp, "other", "other-1")
    await add_instance(cp, "echo", "echo-1")
    nodes = await cp.stub.ListNodes(pb.ListNodesRequest(), metadata=cp.metadata)
    assert [n.id for n in nodes.nodes] == ["node-1"]
    everything = await cp.stub.ListInstances(pb.ListInstancesRequest(), metadata=cp.metadata)
    assert [i.id for i in everything.instances] == ["echo-1", "other-1"]
    await expect_error(
        cp.stub.ListInstances(pb.ListInstancesRequest(deployment="ghost"), metadata=cp.metadata),
        Code.NOT_FOUND,
    )
    await expect_error(
        cp.stub.ListInstances(pb.ListInstancesRequest(deployment="Bad!"), metadata=cp.metadata),
        Code.INVALID_ARGUMENT,
    )


async def test_unexpected_error_is_internal_without_details(
    control_plane: RunningControlPlane,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cp = control_plane

    async def broken(name: str) -> object:
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(cp.plane.store, "get_deployment", broken)
    with caplog.at_level(logging.ERROR):
        err = await expect_error(
            cp.stub.GetDeployment(pb.GetDeploymentRequest(name="echo"), metadata=cp.metadata),
            Code.INTERNAL,
        )
    assert err.details() == INTERNAL_MESSAGE
    assert "secret" not in str(err.trailing_metadata())
    assert any(
        r.exc_info is not None and "secret internal detail" in str(r.exc_info[1])
        for r in caplog.records
    )


class Watch:
    """A WatchEvents stream read in the background into a queue."""

    def __init__(self, cp: RunningControlPlane, since: int) -> None:
        self.call = cp.stub.WatchEvents(
            pb.WatchEventsRequest(since_revision=since), metadata=cp.metadata
        )
        self.queue: asyncio.Queue[pb.WatchEventsResponse] = asyncio.Queue()
        self.task = asyncio.ensure_future(self._pump())

    async def _pump(self) -> None:
        async for event in self.call:
            await self.queue.put(event)

    async def next(self) -> pb.WatchEventsResponse:
        return await asyncio.wait_for(self.queue.get(), timeout=10)

    async def until(self, revision: int) -> list[pb.WatchEventsResponse]:
        """Events up to and including `revision`."""
        events: list[pb.WatchEventsResponse] = []
        while not events or events[-1].revision < revision:
            events.append(await self.next())
        return events

    def cancel(self) -> None:
        self.call.cancel()
        self.task.cancel()


@pytest.fixture
async def watches() -> AsyncIterator[list[Watch]]:
    opened: list[Watch] = []
    yield opened
    for watch in opened:
        watch.cancel()


async def test_watch_snapshot_then_live(
    control_plane: RunningControlPlane, watches: list[Watch]
) -> None:
    cp = control_plane
    await create(cp, "b")
    await create(cp, "a", min_instances=1)
    await add_instance(cp, "a", "a-1")
    watch = Watch(cp, 0)
    watches.append(watch)
    snapshot = [await watch.next() for _ in range(4)]
    assert [e.type for e in snapshot] == [EventType.EVENT_TYPE_SNAPSHOT] * 3 + [
        EventType.EVENT_TYPE_SNAPSHOT_END
    ]
    assert [e.deployment.name for e in snapshot[:2]] == ["a", "b"]
    assert snapshot[0].deployment.status.phase == Phase.DEPLOYMENT_PHASE_RUNNING
    assert snapshot[2].instance.id == "a-1"
    assert snapshot[3].revision == 3

    created = (await create(cp, "c")).deployment
    live = await watch.next()
    assert (live.type, live.revision, live.deployment.name) == (
        EventType.EVENT_TYPE_CREATED,
        created.revision,
        "c",
    )
    assert live.deployment.status.phase == Phase.DEPLOYMENT_PHASE_STANDBY
    await cp.stub.DeleteDeployment(pb.DeleteDeploymentRequest(name="c"), metadata=cp.metadata)
    deleted = await watch.next()
    assert (deleted.type, deleted.deployment.name) == (EventType.EVENT_TYPE_DELETED, "c")
    assert deleted.deployment.HasField("delete_time")


async def test_watch_resumes_without_gaps_or_duplicates(
    control_plane: RunningControlPlane, watches: list[Watch]
) -> None:
    cp = control_plane
    first = Watch(cp, 0)
    watches.append(first)
    end = await first.next()
    assert end.type == EventType.EVENT_TYPE_SNAPSHOT_END and end.revision == 0
    d = (await create(cp, "echo")).deployment
    seen = await first.until(d.revision)
    first.cancel()

    # Changes while no one watches, then resume from the last revision seen.
    revision = d.revision
    for i in range(5):
        changed = deployment_pb2.Deployment(name="echo", labels={"i": str(i)}, spec=make_spec())
        resp = await cp.stub.UpdateDeployment(
            pb.UpdateDeploymentRequest(deployment=changed, revision=revision),
            metadata=cp.metadata,
        )
        revision = resp.deployment.revision
    resumed = Watch(cp, seen[-1].revision)
    watches.append(resumed)

    # Concurrent writes while the resumed watch replays and switches to live.
    async def writer() -> int:
        last = 0
        for i in range(20):
            last = (await create(cp, f"w{i}")).deployment.revision
        return last

    last = await writer()
    events = await resumed.until(last)
    revisions = [e.revision for e in events]
    assert revisions == list(range(seen[-1].revision + 1, last + 1))
    assert [e.type for e in events[:5]] == [EventType.EVENT_TYPE_UPDATED] * 5
    assert events[4].deployment.labels["i"] == "4"
    assert {e.deployment.name for e in events[5:]} == {f"w{i}" for i in range(20)}


async def test_watch_during_concurrent_writes_has_no_gap(
    control_plane: RunningControlPlane, watches: list[Watch]
) -> None:
    cp = control_plane
    for i in range(5):
        await create(cp, f"pre{i}")

    async def writer(prefix: str) -> int:
        last = 0
        for i in range(15):
            last = (await create(cp, f"{prefix}{i}")).deployment.revision
        return last

    writers = [asyncio.ensure_future(writer(p)) for p in ("x", "y")]
    watch = Watch(cp, 0)
    watches.append(watch)
    lasts = await asyncio.gather(*writers)
    events = await watch.until(max(lasts))
    snapshot = [e for e in events if e.type == EventType.EVENT_TYPE_SNAPSHOT]
    end = next(e for e in events if e.type == EventType.EVENT_TYPE_SNAPSHOT_END)
    live = events[len(snapshot) + 1 :]
    names = [e.deployment.name for e in snapshot] + [e.deployment.name for e in live]
    assert len(names) == len(set(names)) == 35
    assert [e.revision for e in live] == list(range(end.revision + 1, max(lasts) + 1))


async def test_watch_bad_revisions(control_plane: RunningControlPlane) -> None:
    cp = control_plane
    await create(cp, "echo")
    ahead = cp.stub.WatchEvents(pb.WatchEventsRequest(since_revision=50), metadata=cp.metadata)
    err = await expect_error(ahead.read(), Code.OUT_OF_RANGE)
    info = rich_status(err).error_info
    assert info is not None and info.reason == "REVISION_COMPACTED"
    assert "watch again from revision 0" in (err.details() or "")
    negative = cp.stub.WatchEvents(pb.WatchEventsRequest(since_revision=-1), metadata=cp.metadata)
    await expect_error(negative.read(), Code.INVALID_ARGUMENT)


async def test_watch_ends_unavailable_on_shutdown(control_plane: RunningControlPlane) -> None:
    cp = control_plane
    call = cp.stub.WatchEvents(pb.WatchEventsRequest(since_revision=0), metadata=cp.metadata)
    first = await call.read()
    assert isinstance(first, pb.WatchEventsResponse)
    assert first.type == EventType.EVENT_TYPE_SNAPSHOT_END
    stopping = asyncio.ensure_future(cp.plane.stop(grace=5.0))
    await expect_error(call.read(), Code.UNAVAILABLE)
    await asyncio.wait_for(stopping, timeout=10)


async def test_health_reports_serving(control_plane: RunningControlPlane) -> None:
    stub = health_pb2_grpc.HealthStub(control_plane.channel)
    for service in ("", "gpufleet.v1.DeploymentService"):
        resp = await stub.Check(health_pb2.HealthCheckRequest(service=service))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_lists_services_and_files(control_plane: RunningControlPlane) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(control_plane.channel)

    async def ask(
        request: reflection_pb2.ServerReflectionRequest,
    ) -> reflection_pb2.ServerReflectionResponse:
        call = stub.ServerReflectionInfo(iter([request]))
        responses = [r async for r in call]
        assert len(responses) == 1
        return responses[0]

    listed = await ask(reflection_pb2.ServerReflectionRequest(list_services=""))
    names = {s.name for s in listed.list_services_response.service}
    assert names == {
        "gpufleet.v1.DeploymentService",
        "gpufleet.v1.NodeService",
        "gpufleet.v1.RoutingService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }
    files = await ask(
        reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="gpufleet.v1.DeploymentService"
        )
    )
    assert files.file_descriptor_response.file_descriptor_proto


async def test_an_error_about_huge_input_still_arrives_as_that_error(
    control_plane: RunningControlPlane,
) -> None:
    # 64 invalid env keys of 2,000 characters each: echoed whole, the violations would pass
    # grpc's 8 KiB metadata limit and the client would get RESOURCE_EXHAUSTED instead.
    spec = make_spec()
    for index in range(64):
        spec.env[f"{index}" + "x" * 2000] = "v"
    deployment = deployment_pb2.Deployment(name="huge", spec=spec, labels={"k": "v" * 5000})
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await control_plane.stub.CreateDeployment(
            pb.CreateDeploymentRequest(deployment=deployment), metadata=control_plane.metadata
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = rich_status(refused.value)
    assert details.bad_request is not None
    violations = details.bad_request.field_violations
    assert 1 < len(violations) <= 9
    assert violations[-1].field == "..." and "more violations" in violations[-1].description
    trailers = cast(Iterable[tuple[str, str | bytes]], refused.value.trailing_metadata() or ())
    assert sum(len(key) + len(value) for key, value in trailers) < 6 * 1024
