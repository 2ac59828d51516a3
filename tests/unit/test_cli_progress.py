"""Rollout progress for `apply --wait` / `scale --wait`: the pure tracker over scripted
WatchEvents, the plain and rich displays, and the wait's exit codes."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any, cast

import grpc
import pytest

from gpufleet.client.cli.progress import Outcome, RolloutTracker, Target
from gpufleet.client.cli.progress_display import (
    PlainDisplay,
    RichDisplay,
    make_display,
    wait_until_ready,
)
from gpufleet.client.errors import RPCError
from gpufleet.client.sdk import Client
from gpufleet.v1 import deployment_pb2, deployment_service_pb2 as pb, instance_pb2

State = instance_pb2.InstanceState
Phase = deployment_pb2.DeploymentPhase


def deployment_event(
    name: str,
    *,
    generation: int = 1,
    observed: int = 1,
    ready: int = 0,
    desired: int = 0,
    phase: int = Phase.DEPLOYMENT_PHASE_STARTING,
    message: str = "",
    kind: int = pb.EVENT_TYPE_UPDATED,
    deleting: bool = False,
) -> pb.WatchEventsResponse:
    deployment = deployment_pb2.Deployment(
        name=name,
        generation=generation,
        observed_generation=observed,
        status=deployment_pb2.DeploymentStatus(
            phase=cast(Any, phase), ready_instances=ready, desired_instances=desired, message=message
        ),
    )
    if deleting:
        deployment.delete_time.GetCurrentTime()
    return pb.WatchEventsResponse(type=cast(Any, kind), deployment=deployment)


def instance_event(
    instance_id: str,
    state: int,
    *,
    deployment: str = "echo",
    generation: int = 1,
    crash_loop: bool = False,
    kind: int = pb.EVENT_TYPE_UPDATED,
) -> pb.WatchEventsResponse:
    return pb.WatchEventsResponse(
        type=cast(Any, kind),
        instance=instance_pb2.Instance(
            id=instance_id,
            deployment=deployment,
            generation=generation,
            state=cast(Any, state),
            crash_loop=crash_loop,
        ),
    )


SNAPSHOT_END = pb.WatchEventsResponse(type=pb.EVENT_TYPE_SNAPSHOT_END)


def snapshot(*events: pb.WatchEventsResponse) -> list[pb.WatchEventsResponse]:
    for event in events:
        event.type = pb.EVENT_TYPE_SNAPSHOT
    return [*events, SNAPSHOT_END]


def feed_all(tracker: RolloutTracker, events: list[pb.WatchEventsResponse]) -> None:
    for event in events:
        tracker.feed(event)


def only(tracker: RolloutTracker) -> Any:
    (progress,) = tracker.view()
    return progress


def test_nothing_is_decided_before_the_snapshot_ends() -> None:
    tracker = RolloutTracker([Target("echo", 1)])
    event = deployment_event("echo", ready=1, desired=1, phase=Phase.DEPLOYMENT_PHASE_RUNNING)
    event.type = pb.EVENT_TYPE_SNAPSHOT
    assert tracker.feed(event) is False
    assert not tracker.finished() and not tracker.started
    assert tracker.feed(SNAPSHOT_END) is True
    assert tracker.finished()


def test_new_deployment_goes_from_starting_to_ready() -> None:
    tracker = RolloutTracker([Target("echo", 1)])
    feed_all(tracker, snapshot(deployment_event("echo", observed=0, desired=2)))
    assert only(tracker).outcome is Outcome.WAITING
    feed_all(
        tracker,
        [
            instance_event("echo-a", State.INSTANCE_STATE_PENDING, kind=pb.EVENT_TYPE_CREATED),
            instance_event("echo-b", State.INSTANCE_STATE_PENDING, kind=pb.EVENT_TYPE_CREATED),
            deployment_event("echo", desired=2),
            instance_event("echo-a", State.INSTANCE_STATE_READY),
        ],
    )
    progress = only(tracker)
    assert (progress.outcome, progress.ready, progress.starting) == (Outcome.WAITING, 1, 1)
    assert progress.line() == "deployment/echo: 1/2 ready, 1 starting (Starting)"
    feed_all(
        tracker,
        [
            instance_event("echo-b", State.INSTANCE_STATE_READY),
            deployment_event("echo", ready=2, desired=2, phase=Phase.DEPLOYMENT_PHASE_RUNNING),
        ],
    )
    assert tracker.finished()
    assert only(tracker).line() == "deployment/echo ready: 2/2 instances"


def test_a_rollout_is_not_ready_while_old_ready_instances_fill_the_count() -> None:
    tracker = RolloutTracker([Target("echo", 2)])
    running: dict[str, Any] = {"ready": 2, "desired": 2, "phase": Phase.DEPLOYMENT_PHASE_RUNNING}
    feed_all(
        tracker,
        snapshot(
            deployment_event("echo", generation=2, observed=1, **running),
            instance_event("echo-a", State.INSTANCE_STATE_READY),
            instance_event("echo-b", State.INSTANCE_STATE_READY),
        ),
    )
    assert only(tracker).outcome is Outcome.WAITING  # spec not observed yet
    feed_all(
        tracker,
        [
            instance_event("echo-c", State.INSTANCE_STATE_PENDING, generation=2, kind=pb.EVENT_TYPE_CREATED),
            deployment_event(
                "echo", generation=2, observed=2,
                message="rolling out generation 2: 0 of 2 instance(s) updated", **running,
            ),
        ],
    )
    assert only(tracker).outcome is Outcome.WAITING
    # The new instance is ready and an old one drains, but the rollout is not over.
    feed_all(
        tracker,
        [
            instance_event("echo-c", State.INSTANCE_STATE_READY, generation=2),
            instance_event("echo-a", State.INSTANCE_STATE_DRAINING),
        ],
    )
    assert only(tracker).outcome is Outcome.WAITING
    feed_all(
        tracker,
        [
            instance_event("echo-d", State.INSTANCE_STATE_READY, generation=2, kind=pb.EVENT_TYPE_CREATED),
            instance_event("echo-b", State.INSTANCE_STATE_DRAINING),
            deployment_event("echo", generation=2, observed=2, **running),
        ],
    )
    assert tracker.finished()


def test_unplaceable_instances_keep_it_waiting_with_the_reason() -> None:
    tracker = RolloutTracker([Target("big", 1)])
    feed_all(
        tracker,
        snapshot(deployment_event("big", desired=1, message="no GPU has 90000 MiB free")),
    )
    progress = only(tracker)
    assert progress.outcome is Outcome.WAITING
    assert progress.summary() == "0/1 ready (Starting): no GPU has 90000 MiB free"


def test_crash_loops_count_as_failed_not_starting() -> None:
    tracker = RolloutTracker([Target("echo", 1)])
    feed_all(
        tracker,
        snapshot(
            deployment_event(
                "echo", desired=1, phase=Phase.DEPLOYMENT_PHASE_FAILED,
                message="instance echo-a: exit code 1 (crash loop)",
            ),
            instance_event("echo-a", State.INSTANCE_STATE_STARTING, crash_loop=True),
        ),
    )
    progress = only(tracker)
    assert (progress.starting, progress.failed) == (0, 1)
    assert progress.line() == (
        "deployment/echo: 0/1 ready, 1 failed (Failed): instance echo-a: exit code 1 (crash loop)"
    )


def test_scale_to_zero_is_ready_in_standby() -> None:
    tracker = RolloutTracker([Target("lazy", 3)])
    feed_all(
        tracker,
        snapshot(deployment_event("lazy", generation=3, observed=3, phase=Phase.DEPLOYMENT_PHASE_STANDBY)),
    )
    assert tracker.finished()
    assert only(tracker).line() == "deployment/lazy ready: standby, the first call starts an instance"


@pytest.mark.parametrize(
    "events",
    [
        [deployment_event("echo", desired=1), deployment_event("echo", kind=pb.EVENT_TYPE_DELETED)],
        [deployment_event("echo", desired=1, deleting=True, phase=Phase.DEPLOYMENT_PHASE_DRAINING)],
    ],
)
def test_a_deleted_deployment_is_gone(events: list[pb.WatchEventsResponse]) -> None:
    tracker = RolloutTracker([Target("echo", 1)])
    feed_all(tracker, snapshot(events[0]) + events[1:])
    assert only(tracker).outcome is Outcome.GONE
    assert not tracker.finished()


def test_missing_from_the_snapshot_is_gone_and_others_are_ignored() -> None:
    tracker = RolloutTracker([Target("echo", 1)])
    assert tracker.feed(deployment_event("other", desired=1)) is False
    assert tracker.feed(instance_event("other-a", State.INSTANCE_STATE_READY, deployment="other")) is False
    feed_all(tracker, [SNAPSHOT_END])
    assert only(tracker).outcome is Outcome.GONE
    assert only(tracker).line() == "deployment/echo was deleted"


def test_deleted_instances_stop_counting() -> None:
    tracker = RolloutTracker([Target("echo", 1)])
    feed_all(
        tracker,
        snapshot(
            deployment_event("echo", ready=1, desired=1, phase=Phase.DEPLOYMENT_PHASE_RUNNING),
            instance_event("echo-a", State.INSTANCE_STATE_READY),
            instance_event("echo-old", State.INSTANCE_STATE_FAILED),
        ),
    )
    assert only(tracker).outcome is Outcome.WAITING
    tracker.feed(instance_event("echo-old", State.INSTANCE_STATE_FAILED, kind=pb.EVENT_TYPE_DELETED))
    assert tracker.finished()


# -- displays -------------------------------------------------------------------------------


class TtyBuffer(io.StringIO):
    def isatty(self) -> bool:
        return True


def _views() -> Iterator[RolloutTracker]:
    tracker = RolloutTracker([Target("echo", 1)])
    feed_all(tracker, snapshot(deployment_event("echo", desired=2)))
    yield tracker
    feed_all(tracker, [instance_event("echo-a", State.INSTANCE_STATE_STARTING, kind=pb.EVENT_TYPE_CREATED)])
    yield tracker
    yield tracker  # no change: no new line
    feed_all(
        tracker,
        [
            instance_event("echo-a", State.INSTANCE_STATE_READY),
            instance_event("echo-b", State.INSTANCE_STATE_READY, kind=pb.EVENT_TYPE_CREATED),
            deployment_event("echo", ready=2, desired=2, phase=Phase.DEPLOYMENT_PHASE_RUNNING),
        ],
    )
    yield tracker


def test_plain_display_prints_a_line_per_change_without_control_codes() -> None:
    out = io.StringIO()
    display = make_display(out, ["echo"])
    assert isinstance(display, PlainDisplay)
    with display:
        for tracker in _views():
            display.show(tracker.view())
    assert out.getvalue().splitlines() == [
        "deployment/echo: 0/2 ready (Starting)",
        "deployment/echo: 0/2 ready, 1 starting (Starting)",
        "deployment/echo ready: 2/2 instances",
    ]
    assert "\x1b" not in out.getvalue()


def test_rich_display_on_a_terminal() -> None:
    out = TtyBuffer()
    display = make_display(out, ["echo"])
    assert isinstance(display, RichDisplay)
    with display:
        for tracker in _views():
            display.show(tracker.view())
    text = out.getvalue()
    assert "\x1b[" in text
    assert "deployment/echo" in text and "ready" in text


# -- the wait ----------------------------------------------------------------------------------


class FakeClient:
    def __init__(self, events: list[pb.WatchEventsResponse], then: RPCError | None) -> None:
        self._events = events
        self._then = then
        self.timeouts: list[float | None] = []

    def watch_events(self, since_revision: int = 0, *, timeout: float | None = None) -> Iterator[pb.WatchEventsResponse]:
        assert since_revision == 0
        self.timeouts.append(timeout)
        return self._stream()

    def _stream(self) -> Iterator[pb.WatchEventsResponse]:
        yield from self._events
        if self._then is not None:
            raise self._then


def wait(events: list[pb.WatchEventsResponse], then: RPCError | None, out: io.StringIO) -> tuple[int, FakeClient]:
    client = FakeClient(events, then)
    code = wait_until_ready(cast(Client, client), [Target("echo", 1)], 7.0, out)
    return code, client


def test_wait_exits_0_once_ready(capsys: pytest.CaptureFixture[str]) -> None:
    events = snapshot(deployment_event("echo", ready=1, desired=1, phase=Phase.DEPLOYMENT_PHASE_RUNNING))
    # A stream that would fail after the ready event is never read that far.
    code, client = wait(events, RPCError(grpc.StatusCode.INTERNAL, "not reached"), io.StringIO())
    assert code == 0 and client.timeouts == [7.0]
    assert capsys.readouterr().err == ""


def test_wait_exits_1_with_the_status_on_timeout(capsys: pytest.CaptureFixture[str]) -> None:
    events = snapshot(
        deployment_event("echo", desired=1, phase=Phase.DEPLOYMENT_PHASE_FAILED, message="instance echo-a: exit code 3")
    )
    code, _ = wait(events, RPCError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline"), io.StringIO())
    assert code == 1
    err = capsys.readouterr().err
    assert "error: deployment/echo is not ready after 7s: 0/1 ready (Failed): instance echo-a: exit code 3" in err
    assert "gpufleet instances echo" in err


def test_wait_reports_a_watch_the_server_ended(capsys: pytest.CaptureFixture[str]) -> None:
    code, _ = wait(snapshot(deployment_event("echo", desired=1)), None, io.StringIO())
    assert code == 1
    assert "is not ready and the control plane ended the watch" in capsys.readouterr().err


def test_wait_passes_other_errors_on() -> None:
    with pytest.raises(RPCError) as raised:
        wait([], RPCError(grpc.StatusCode.UNAVAILABLE, "down"), io.StringIO())
    assert raised.value.code == grpc.StatusCode.UNAVAILABLE


def test_wait_stops_when_the_deployment_is_deleted(capsys: pytest.CaptureFixture[str]) -> None:
    events = snapshot(deployment_event("echo", desired=1)) + [
        deployment_event("echo", kind=pb.EVENT_TYPE_DELETED)
    ]
    code, _ = wait(events, RPCError(grpc.StatusCode.INTERNAL, "not reached"), io.StringIO())
    assert code == 1
    assert "error: deployment/echo was deleted" in capsys.readouterr().err
