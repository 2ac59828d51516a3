"""WatchEvents: snapshot or replay, then live changes, with no gap and no duplicate.

The watcher subscribes before it reads (snapshot or log), so every change committed after
the read is also in its subscription; it skips subscription events at or below the last
revision it sent. A watcher that falls too far behind loses its buffer and catches up from
the durable log the same way.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from gpufleet.server.api.deployment_handlers import deployment_with_status
from gpufleet.server.errors import InvalidArgument, Violation
from gpufleet.server.status import compute_status
from gpufleet.server.store import (
    ChangeType,
    ObjectKind,
    Store,
    StoredEvent,
    Subscription,
    SubscriptionLagged,
)
from gpufleet.v1 import deployment_pb2, deployment_service_pb2 as pb, instance_pb2

REPLAY_BATCH = 1000

_TYPES = {
    ChangeType.CREATED: pb.EventType.EVENT_TYPE_CREATED,
    ChangeType.UPDATED: pb.EventType.EVENT_TYPE_UPDATED,
    ChangeType.DELETED: pb.EventType.EVENT_TYPE_DELETED,
}


async def watch_events(
    store: Store, request: pb.WatchEventsRequest
) -> AsyncIterator[pb.WatchEventsResponse]:
    """Yield the events WatchEvents sends, forever (until the store closes)."""
    if request.since_revision < 0:
        raise InvalidArgument(
            [
                Violation(
                    "since_revision",
                    f"must be 0 (snapshot first) or a revision you received; got "
                    f"{request.since_revision}",
                )
            ]
        )
    subscription = store.subscribe()
    try:
        last = request.since_revision
        if last == 0:
            snapshot = await store.snapshot()
            by_deployment: dict[str, list[instance_pb2.Instance]] = {}
            for instance in snapshot.instances:
                by_deployment.setdefault(instance.deployment, []).append(instance)
            for record in snapshot.deployments:
                deployment = deployment_pb2.Deployment()
                deployment.CopyFrom(record.deployment)
                deployment.status.CopyFrom(
                    compute_status(record.deployment, by_deployment.get(deployment.name, []))
                )
                yield pb.WatchEventsResponse(
                    revision=deployment.revision,
                    type=pb.EventType.EVENT_TYPE_SNAPSHOT,
                    deployment=deployment,
                )
            for instance in snapshot.instances:
                yield pb.WatchEventsResponse(
                    revision=snapshot.revision,
                    type=pb.EventType.EVENT_TYPE_SNAPSHOT,
                    instance=instance,
                )
            yield pb.WatchEventsResponse(
                revision=snapshot.revision, type=pb.EventType.EVENT_TYPE_SNAPSHOT_END
            )
            last = snapshot.revision
        while True:
            async for response in _replay(store, last):
                last = response.revision
                yield response
            try:
                async for response in _live(store, subscription, last):
                    last = response.revision
                    yield response
            except SubscriptionLagged:
                subscription.close()
                subscription = store.subscribe()
    finally:
        subscription.close()


async def _replay(store: Store, after: int) -> AsyncIterator[pb.WatchEventsResponse]:
    while True:
        batch = await store.list_events_since(after, REPLAY_BATCH)
        for event in batch:
            yield await _to_response(store, event)
            after = event.revision
        if len(batch) < REPLAY_BATCH:
            return


async def _live(
    store: Store, subscription: Subscription, after: int
) -> AsyncIterator[pb.WatchEventsResponse]:
    while True:
        event = await subscription.next()
        if event.revision > after:
            yield await _to_response(store, event)
            after = event.revision


async def _to_response(store: Store, event: StoredEvent) -> pb.WatchEventsResponse:
    change = _TYPES[event.type]
    if event.kind == ObjectKind.DEPLOYMENT:
        deployment = await deployment_with_status(
            store, event.deployment(), gone=event.type == ChangeType.DELETED
        )
        return pb.WatchEventsResponse(revision=event.revision, type=change, deployment=deployment)
    return pb.WatchEventsResponse(revision=event.revision, type=change, instance=event.instance())
