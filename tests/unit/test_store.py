"""SqliteStore on a real SQLite file: schema, revisions, paging, events, deletion, watching."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gpufleet.server import errors
from gpufleet.server.store import (
    ChangeType,
    ObjectKind,
    SqliteStore,
    StoredEvent,
    SubscriptionLagged,
)
from gpufleet.server.store.broadcast import ChangeHub
from gpufleet.server.store.migrations import MIGRATIONS
from gpufleet.v1 import deployment_pb2, instance_pb2, node_pb2

HASH = "0" * 64


def spec(command: str = "python -m model", max_instances: int = 3) -> deployment_pb2.DeploymentSpec:
    return deployment_pb2.DeploymentSpec(
        command=command, port=8000, scaling=deployment_pb2.ScalingSpec(max_instances=max_instances)
    )


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    opened = await SqliteStore.open(tmp_path / "state.db")
    yield opened
    await opened.close()


async def add_instance(store: SqliteStore, deployment: str, instance_id: str) -> int:
    await store.put_node(node_pb2.Node(id="node-1", name="n1"), HASH)
    return await store.put_instance(
        instance_pb2.Instance(
            id=instance_id,
            deployment=deployment,
            node_id="node-1",
            generation=1,
            state=instance_pb2.INSTANCE_STATE_READY,
            gpu_uuids=["GPU-1"],
        ),
        spec(),
    )


async def test_pragmas_are_set(store: SqliteStore, tmp_path: Path) -> None:
    settings = await store.settings()
    assert settings == {
        "journal_mode": "wal",
        "synchronous": "2",  # FULL
        "foreign_keys": "1",
        "busy_timeout": "5000",
    }
    # WAL is a property of the file: a fresh connection sees it too.
    with sqlite3.connect(tmp_path / "state.db") as other:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_foreign_keys_are_enforced(store: SqliteStore) -> None:
    await store.put_node(node_pb2.Node(id="node-1"), HASH)
    with pytest.raises(errors.NotFound, match="deployment 'ghost'"):
        await store.put_instance(
            instance_pb2.Instance(id="i1", deployment="ghost", node_id="node-1"), spec()
        )
    assert await store.current_revision() == 0


async def test_migrations_are_idempotent_and_keep_data(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    first = await SqliteStore.open(path)
    created = await first.create_deployment("echo", {"team": "a"}, spec(), HASH)
    await first.close()
    for _ in range(2):
        again = await SqliteStore.open(path)
        assert (await again.get_deployment("echo")).deployment == created.deployment
        assert await again.current_revision() == created.deployment.revision
        await again.close()
    with sqlite3.connect(path) as db:
        versions = [row[0] for row in db.execute("SELECT version FROM schema_version")]
    assert versions == [m.version for m in MIGRATIONS]


async def test_refuses_a_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    await (await SqliteStore.open(path)).close()
    with sqlite3.connect(path) as db:
        db.execute("INSERT INTO schema_version VALUES (?, 0)", (MIGRATIONS[-1].version + 1,))
    with pytest.raises(errors.StartupError, match="newer than this gpufleet knows"):
        await SqliteStore.open(path)


async def test_create_get_and_duplicate(store: SqliteStore) -> None:
    created = await store.create_deployment("echo", {"team": "a"}, spec(), HASH)
    d = created.deployment
    assert (d.name, d.revision, d.generation, d.observed_generation) == ("echo", 1, 1, 0)
    assert d.create_time == d.update_time and d.create_time.seconds > 0
    assert not d.HasField("delete_time")
    assert created.invoke_token_sha256 == HASH
    assert (await store.get_deployment("echo")) == created
    with pytest.raises(errors.AlreadyExists, match="already exists"):
        await store.create_deployment("echo", {}, spec(), HASH)
    with pytest.raises(errors.NotFound, match="'nope' does not exist"):
        await store.get_deployment("nope")
    assert await store.current_revision() == 1


async def test_revisions_are_monotonic_and_each_change_is_logged(store: SqliteStore) -> None:
    seen = [(await store.create_deployment("a", {}, spec(), HASH)).deployment.revision]
    seen.append((await store.create_deployment("b", {}, spec(), HASH)).deployment.revision)
    updated = await store.update_deployment("a", {"x": "1"}, spec(), seen[0])
    seen.append(updated.deployment.revision)
    seen.append((await store.scale_deployment("b", 1, 5)).deployment.revision)
    seen.append((await store.set_observed_generation("a", 1)).deployment.revision)
    seen.append((await store.set_invoke_token_hash("b", "1" * 64)).deployment.revision)
    seen.append(await add_instance(store, "a", "a-1"))
    seen.append(await store.delete_instance("a-1"))
    seen.append((await store.mark_deployment_deleted("a")).record.deployment.revision)
    assert seen == list(range(1, len(seen) + 1))
    events = await store.list_events_since(0)
    assert [e.revision for e in events] == seen
    assert [(e.type, e.kind, e.name) for e in events] == [
        (ChangeType.CREATED, ObjectKind.DEPLOYMENT, "a"),
        (ChangeType.CREATED, ObjectKind.DEPLOYMENT, "b"),
        (ChangeType.UPDATED, ObjectKind.DEPLOYMENT, "a"),
        (ChangeType.UPDATED, ObjectKind.DEPLOYMENT, "b"),
        (ChangeType.UPDATED, ObjectKind.DEPLOYMENT, "a"),
        (ChangeType.UPDATED, ObjectKind.DEPLOYMENT, "b"),
        (ChangeType.CREATED, ObjectKind.INSTANCE, "a-1"),
        (ChangeType.DELETED, ObjectKind.INSTANCE, "a-1"),
        (ChangeType.DELETED, ObjectKind.DEPLOYMENT, "a"),
    ]
    # Each deployment payload is the object as of that revision.
    assert events[2].deployment().labels == {"x": "1"}
    assert events[2].deployment().revision == 3
    assert events[6].instance().gpu_uuids == ["GPU-1"]


async def test_revisions_continue_after_reopen(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    first = await SqliteStore.open(path)
    await first.create_deployment("a", {}, spec(), HASH)
    await first.create_deployment("b", {}, spec(), HASH)
    await first.close()
    second = await SqliteStore.open(path)
    assert (await second.create_deployment("c", {}, spec(), HASH)).deployment.revision == 3
    await second.close()


async def test_stale_update_is_rejected_and_writes_nothing(store: SqliteStore) -> None:
    first = await store.create_deployment("echo", {}, spec(), HASH)
    second = await store.update_deployment("echo", {}, spec("v2"), first.deployment.revision)
    with pytest.raises(errors.RevisionMismatch) as caught:
        await store.update_deployment("echo", {}, spec("v3"), first.deployment.revision)
    assert (caught.value.expected, caught.value.actual) == (1, 2)
    assert "read it again and retry" in str(caught.value)
    assert await store.get_deployment("echo") == second
    assert await store.current_revision() == 2
    with pytest.raises(errors.NotFound):
        await store.update_deployment("nope", {}, spec(), 1)


async def test_generation_counts_spec_changes_only(store: SqliteStore) -> None:
    rec = await store.create_deployment("echo", {"a": "1"}, spec(), HASH)
    rec = await store.update_deployment("echo", {"a": "2"}, spec(), rec.deployment.revision)
    assert (rec.deployment.revision, rec.deployment.generation) == (2, 1)
    rec = await store.update_deployment("echo", {"a": "2"}, spec("v2"), rec.deployment.revision)
    assert (rec.deployment.revision, rec.deployment.generation) == (3, 2)
    # A change to nothing is not a change: same revision, no event.
    same = await store.update_deployment("echo", {"a": "2"}, spec("v2"), rec.deployment.revision)
    assert same == rec
    rec = await store.scale_deployment("echo", 2, None)
    assert rec.deployment.generation == 3
    assert rec.deployment.spec.scaling.min_instances == 2
    assert rec.deployment.spec.scaling.max_instances == 3
    assert await store.scale_deployment("echo", 2, 3) == rec
    assert await store.current_revision() == 4


async def test_scale_checks_revision_when_given(store: SqliteStore) -> None:
    rec = await store.create_deployment("echo", {}, spec(), HASH)
    with pytest.raises(errors.RevisionMismatch):
        await store.scale_deployment("echo", 1, None, expected_revision=rec.deployment.revision + 1)
    scaled = await store.scale_deployment(
        "echo", None, 7, expected_revision=rec.deployment.revision
    )
    assert scaled.deployment.spec.scaling.max_instances == 7


async def test_paging_and_label_filter(store: SqliteStore) -> None:
    names = [f"d{i:02d}" for i in range(25)]
    for i, name in enumerate(reversed(names)):
        labels = {"team": "a" if i % 2 else "b", "tier": "prod" if i % 3 else "dev"}
        await store.create_deployment(name, labels, spec(), HASH)

    pages: list[list[str]] = []
    token = ""
    while True:
        page = await store.list_deployments(10, token)
        pages.append([r.deployment.name for r in page.deployments])
        token = page.next_page_token
        if not token:
            break
    assert [len(p) for p in pages] == [10, 10, 5]
    assert [n for p in pages for n in p] == names

    selected = await store.list_deployments(100, "", {"team": "a", "tier": "prod"})
    expected = sorted(
        name
        for i, name in enumerate(reversed(names))
        if i % 2 and i % 3
    )
    assert [r.deployment.name for r in selected.deployments] == expected
    assert selected.next_page_token == ""
    filtered_pages = await store.list_deployments(2, "", {"team": "a"})
    assert all(r.deployment.labels["team"] == "a" for r in filtered_pages.deployments)
    nxt = await store.list_deployments(2, filtered_pages.next_page_token, {"team": "a"})
    assert nxt.deployments[0].deployment.name > filtered_pages.deployments[-1].deployment.name
    assert (await store.list_deployments(5, "", {"team": "nobody"})).deployments == []


async def test_label_filter_matches_exact_key_and_value(store: SqliteStore) -> None:
    await store.create_deployment("a", {"k.x/y": "v"}, spec(), HASH)
    await store.create_deployment("b", {"k": "v", "other": "k.x/y"}, spec(), HASH)
    page = await store.list_deployments(10, "", {"k.x/y": "v"})
    assert [r.deployment.name for r in page.deployments] == ["a"]


@pytest.mark.parametrize("token", ["garbage!", "eyJ2IjoyfQ", "bm90IGpzb24"])
async def test_bad_page_token_is_invalid_argument(store: SqliteStore, token: str) -> None:
    with pytest.raises(errors.InvalidArgument) as caught:
        await store.list_deployments(10, token)
    assert [v.field for v in caught.value.violations] == ["page_token"]


async def test_events_are_compacted_to_the_retention(tmp_path: Path) -> None:
    store = await SqliteStore.open(tmp_path / "state.db", event_retention=5)
    try:
        rec = await store.create_deployment("echo", {}, spec(), HASH)
        for i in range(11):
            rec = await store.update_deployment(
                "echo", {"i": str(i)}, spec(), rec.deployment.revision
            )
        assert await store.current_revision() == 12
        kept = await store.list_events_since(7)
        assert [e.revision for e in kept] == [8, 9, 10, 11, 12]
        for too_old in (0, 6):
            with pytest.raises(errors.OutOfRange, match="compacted"):
                await store.list_events_since(too_old)
        with pytest.raises(errors.OutOfRange, match="ahead of"):
            await store.list_events_since(13)
        assert await store.list_events_since(12) == []
        assert [e.revision for e in await store.list_events_since(9, limit=2)] == [10, 11]
    finally:
        await store.close()
    with sqlite3.connect(tmp_path / "state.db") as db:
        assert db.execute("SELECT count(*) FROM events").fetchone()[0] == 5


async def test_delete_without_instances_removes_at_once(store: SqliteStore) -> None:
    rec = await store.create_deployment("echo", {}, spec(), HASH)
    with pytest.raises(errors.RevisionMismatch):
        await store.mark_deployment_deleted("echo", expected_revision=rec.deployment.revision + 1)
    result = await store.mark_deployment_deleted("echo", expected_revision=rec.deployment.revision)
    assert result.removed
    assert result.record.deployment.HasField("delete_time")
    assert result.record.deployment.revision == 2
    with pytest.raises(errors.NotFound):
        await store.get_deployment("echo")
    with pytest.raises(errors.NotFound):
        await store.mark_deployment_deleted("echo")
    last = (await store.list_events_since(1))[-1]
    assert (last.type, last.name, last.revision) == (ChangeType.DELETED, "echo", 2)
    # The name is free again.
    assert (await store.create_deployment("echo", {}, spec(), HASH)).deployment.revision == 3


async def test_delete_with_instances_drains_then_purges(store: SqliteStore) -> None:
    await store.create_deployment("echo", {}, spec(), HASH)
    await add_instance(store, "echo", "echo-1")
    result = await store.mark_deployment_deleted("echo")
    assert not result.removed
    draining = result.record.deployment
    assert draining.HasField("delete_time")
    assert (await store.get_deployment("echo")).deployment == draining
    # Deleting again changes nothing.
    again = await store.mark_deployment_deleted("echo")
    assert again.record.deployment == draining and not again.removed
    with pytest.raises(errors.FailedPrecondition, match="being deleted"):
        await store.update_deployment("echo", {}, spec("v2"), draining.revision)
    with pytest.raises(errors.FailedPrecondition):
        await store.scale_deployment("echo", 1, None)
    with pytest.raises(errors.AlreadyExists, match="still being deleted"):
        await store.create_deployment("echo", {}, spec(), HASH)
    assert not await store.purge_deployment("echo")
    await store.delete_instance("echo-1")
    assert await store.purge_deployment("echo")
    assert not await store.purge_deployment("echo")
    with pytest.raises(errors.NotFound):
        await store.get_deployment("echo")


async def test_purge_ignores_live_deployments(store: SqliteStore) -> None:
    await store.create_deployment("echo", {}, spec(), HASH)
    assert not await store.purge_deployment("echo")
    assert not await store.purge_deployment("missing")
    await store.get_deployment("echo")


async def test_nodes_and_instances_round_trip(store: SqliteStore) -> None:
    await store.create_deployment("echo", {}, spec(), HASH)
    node = node_pb2.Node(
        id="node-1",
        name="gpu-box",
        labels={"zone": "a"},
        state=node_pb2.NODE_STATE_READY,
        gpus=[node_pb2.Gpu(uuid="GPU-1", memory_total_mib=81559)],
        cpu_millis=16000,
        memory_mib=65536,
        agent_version="0.1.0",
        advertise_host="10.0.0.5",
    )
    node.last_heartbeat_time.FromMicroseconds(1_700_000_000_000_000)
    await store.put_node(node, HASH)
    assert await store.list_nodes() == [node]
    instance = instance_pb2.Instance(
        id="echo-1",
        deployment="echo",
        node_id="node-1",
        generation=1,
        gpu_uuids=["GPU-1"],
        state=instance_pb2.INSTANCE_STATE_STARTING,
        address="10.0.0.5:9000",
        pid=42,
        gpu_memory_reserved_mib=1024,
    )
    first = await store.put_instance(instance, spec())
    listed = await store.list_instances("echo")
    assert len(listed) == 1 and listed[0].create_time.seconds > 0
    instance.state = instance_pb2.INSTANCE_STATE_READY
    second = await store.put_instance(instance, spec())
    assert second == first + 1
    again = await store.list_instances()
    assert again[0].state == instance_pb2.INSTANCE_STATE_READY
    assert again[0].create_time == listed[0].create_time
    assert await store.list_instances("other") == []
    kinds = [(e.type, e.kind) for e in await store.list_events_since(first - 1)]
    assert kinds == [
        (ChangeType.CREATED, ObjectKind.INSTANCE),
        (ChangeType.UPDATED, ObjectKind.INSTANCE),
    ]
    with pytest.raises(errors.NotFound):
        await store.delete_instance("nope")


async def test_snapshot_is_consistent(store: SqliteStore) -> None:
    await store.create_deployment("b", {}, spec(), HASH)
    await store.create_deployment("a", {}, spec(), HASH)
    await add_instance(store, "b", "b-1")
    snap = await store.snapshot()
    assert snap.revision == 3
    assert [r.deployment.name for r in snap.deployments] == ["a", "b"]
    assert [i.id for i in snap.instances] == ["b-1"]


async def test_subscription_gets_committed_events_in_order(store: SqliteStore) -> None:
    with store.subscribe() as sub:
        await store.create_deployment("a", {}, spec(), HASH)
        await store.create_deployment("b", {}, spec(), HASH)
        got = [await sub.next(), await sub.next()]
    assert [(e.revision, e.name) for e in got] == [(1, "a"), (2, "b")]


async def test_failed_write_publishes_nothing(store: SqliteStore) -> None:
    await store.create_deployment("a", {}, spec(), HASH)
    with store.subscribe() as sub:
        with pytest.raises(errors.AlreadyExists):
            await store.create_deployment("a", {}, spec(), HASH)
        await store.create_deployment("b", {}, spec(), HASH)
        event = await sub.next()
    assert (event.revision, event.name) == (2, "b")


async def test_cancelled_caller_does_not_lose_a_started_write(store: SqliteStore) -> None:
    with store.subscribe() as sub:
        task = asyncio.ensure_future(store.create_deployment("a", {}, spec(), HASH))
        await asyncio.sleep(0)  # let the write start
        task.cancel()
        event = await asyncio.wait_for(sub.next(), timeout=10)
    assert event.name == "a"
    assert (await store.get_deployment("a")).deployment.revision == event.revision


async def test_close_ends_subscriptions(store: SqliteStore) -> None:
    sub = store.subscribe()
    waiter = asyncio.ensure_future(sub.next())
    await asyncio.sleep(0)
    store.close_subscriptions()
    with pytest.raises(errors.Unavailable, match="resume the watch"):
        await asyncio.wait_for(waiter, timeout=10)
    with pytest.raises(errors.Unavailable):
        await store.subscribe().next()
    # Writes still work until close().
    await store.create_deployment("a", {}, spec(), HASH)


async def test_slow_subscriber_is_marked_lagged() -> None:
    hub = ChangeHub()

    def event(revision: int) -> StoredEvent:
        return StoredEvent(revision, ChangeType.UPDATED, ObjectKind.DEPLOYMENT, "a", b"")

    sub = hub.subscribe(max_pending=3)
    hub.publish([event(1), event(2)])
    assert (await sub.next()).revision == 1
    hub.publish([event(3), event(4), event(5)])
    with pytest.raises(SubscriptionLagged):
        await sub.next()
    sub.close()
    hub.publish([event(6)])  # no error after unsubscribe


async def test_closed_store_refuses_calls(tmp_path: Path) -> None:
    store = await SqliteStore.open(tmp_path / "state.db")
    await store.close()
    await store.close()
    with pytest.raises(RuntimeError, match="closed"):
        await store.get_deployment("a")
    with pytest.raises(RuntimeError, match="closed"):
        await store.create_deployment("a", {}, spec(), HASH)
