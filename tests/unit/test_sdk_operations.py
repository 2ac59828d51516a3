"""Pure parts of the SDK: apply outcomes, label selectors, waiting for a deletion."""

from __future__ import annotations

import pytest

from gpufleet.client.config import ClientConfig
from gpufleet.client.operations import (
    ApplyAction,
    DeletionTracker,
    desired_for_update,
    label_selector,
    same_desired_state,
    update_action,
)
from gpufleet.v1 import deployment_pb2, deployment_service_pb2 as pb, instance_pb2


def _deployment(
    name: str = "echo", generation: int = 1, **labels: str
) -> deployment_pb2.Deployment:
    return deployment_pb2.Deployment(
        name=name,
        labels=labels,
        generation=generation,
        revision=generation + 10,
        spec=deployment_pb2.DeploymentSpec(command="run", port=9000),
    )


def _event(
    kind: pb.EventType.ValueType, name: str = "echo", revision: int = 1
) -> pb.WatchEventsResponse:
    return pb.WatchEventsResponse(
        revision=revision, type=kind, deployment=deployment_pb2.Deployment(name=name)
    )


def test_same_desired_state_compares_only_labels_and_spec() -> None:
    stored = _deployment(team="a")
    stored.status.ready_instances = 3
    desired = deployment_pb2.Deployment(name="echo", labels={"team": "a"}, spec=stored.spec)
    assert same_desired_state(stored, desired)
    desired.labels["team"] = "b"
    assert not same_desired_state(stored, desired)


def test_update_action_follows_generation_and_labels() -> None:
    before = _deployment(generation=2, team="a")
    assert update_action(before, _deployment(generation=2, team="a")) == ApplyAction.UNCHANGED
    assert update_action(before, _deployment(generation=3, team="a")) == ApplyAction.UPDATED
    assert update_action(before, _deployment(generation=2, team="b")) == ApplyAction.UPDATED


def test_desired_for_update_drops_output_only_fields() -> None:
    stored = _deployment(team="a")
    stored.status.phase = deployment_pb2.DEPLOYMENT_PHASE_RUNNING
    sent = desired_for_update(stored)
    assert sent == deployment_pb2.Deployment(name="echo", labels={"team": "a"}, spec=stored.spec)


def test_label_selector_from_mapping_or_string() -> None:
    assert label_selector(None) == ""
    assert label_selector({"tier": "prod", "team": "vision"}) == "team=vision,tier=prod"
    assert label_selector("a=b") == "a=b"


def test_deletion_seen_as_deleted_event_for_the_name() -> None:
    tracker = DeletionTracker("echo")
    assert not tracker.done(_event(pb.EVENT_TYPE_UPDATED))
    assert not tracker.done(_event(pb.EVENT_TYPE_DELETED, name="other"))
    instance_gone = pb.WatchEventsResponse(
        type=pb.EVENT_TYPE_DELETED, instance=instance_pb2.Instance(id="echo", deployment="echo")
    )
    assert not tracker.done(instance_gone)
    assert tracker.done(_event(pb.EVENT_TYPE_DELETED))


def test_deletion_seen_as_absence_from_the_snapshot() -> None:
    gone = DeletionTracker("echo")
    assert not gone.done(_event(pb.EVENT_TYPE_SNAPSHOT, name="other"))
    assert gone.done(_event(pb.EVENT_TYPE_SNAPSHOT_END, name=""))

    present = DeletionTracker("echo")
    assert not present.done(_event(pb.EVENT_TYPE_SNAPSHOT))
    assert not present.done(_event(pb.EVENT_TYPE_SNAPSHOT_END, name=""))
    assert present.done(_event(pb.EVENT_TYPE_DELETED))


def test_client_config_validates_and_builds_metadata() -> None:
    assert ClientConfig("h:1", "t").call_metadata() == (("authorization", "Bearer t"),)
    assert ClientConfig("h:1").call_metadata() == ()
    assert not ClientConfig("h:1").uses_tls
    assert ClientConfig("h:1", tls_root_cert=b"pem").uses_tls
    assert ("grpc.ssl_target_name_override", "localhost") in ClientConfig(
        "h:1", tls_server_name="localhost"
    ).channel_options()
    with pytest.raises(ValueError, match="tls_client_key"):
        ClientConfig("h:1", tls_client_cert=b"pem")
    with pytest.raises(ValueError, match="target"):
        ClientConfig("")
    with pytest.raises(ValueError, match="timeout"):
        ClientConfig("h:1", timeout=0)
