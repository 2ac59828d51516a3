"""Rendering: plain tables for pipes, JSON/YAML with proto field names, watch lines."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime

import yaml

from gpufleet.client.output import (
    Table,
    age,
    deployments_table,
    dumps,
    event_line,
    gpu_summary,
    message_dict,
    phase_name,
    plain_table,
    render_table,
    status_message_line,
)
from gpufleet.v1 import deployment_pb2, deployment_service_pb2 as pb, instance_pb2

NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)


def _deployment(name: str, created_s_ago: int) -> deployment_pb2.Deployment:
    deployment = deployment_pb2.Deployment(
        name=name,
        revision=12,
        spec=deployment_pb2.DeploymentSpec(
            gpu=deployment_pb2.GpuRequest(memory_mib=2048, core_percent=25),
            scaling=deployment_pb2.ScalingSpec(min_instances=0, max_instances=4),
        ),
        status=deployment_pb2.DeploymentStatus(
            phase=deployment_pb2.DEPLOYMENT_PHASE_RUNNING,
            ready_instances=1,
            desired_instances=2,
            queue_depth=3,
            in_flight=2,
        ),
    )
    deployment.create_time.FromSeconds(int(NOW.timestamp()) - created_s_ago)
    return deployment


def test_deployments_table_as_plain_aligned_text() -> None:
    table = deployments_table([_deployment("echo", 90), _deployment("a-much-longer-name", 5)], NOW)
    assert plain_table(table).splitlines() == [
        "NAME                 PHASE     READY   QUEUED   IN-FLIGHT   MIN-MAX   GPU            REVISION   AGE",
        "echo                 Running   1/2     3        2           0-4       2048 MiB 25%   12         1m",
        "a-much-longer-name   Running   1/2     3        2           0-4       2048 MiB 25%   12         5s",
    ]


def test_status_message_gets_its_own_line() -> None:
    deployment = _deployment("echo", 1)
    assert status_message_line(deployment) == ""
    deployment.status.message = "1 instance(s) cannot be placed: no GPU has 4096 MiB free"
    assert status_message_line(deployment) == (
        "message: 1 instance(s) cannot be placed: no GPU has 4096 MiB free\n"
    )


def test_render_table_writes_plain_text_when_not_a_terminal() -> None:
    stream = io.StringIO()
    render_table(Table(("A", "B"), (("1", "two"),)), stream)
    assert stream.getvalue() == "A   B\n1   two\n"


def test_render_table_uses_rich_on_a_terminal() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Terminal()
    render_table(Table(("NAME",), (("echo",),)), stream)
    assert "echo" in stream.getvalue() and "\x1b[" in stream.getvalue()


def test_summaries() -> None:
    assert gpu_summary(deployment_pb2.GpuRequest(count=2)) == "2 GPU"
    assert gpu_summary(deployment_pb2.GpuRequest(memory_mib=512)) == "512 MiB"
    assert gpu_summary(deployment_pb2.GpuRequest()) == "-"
    assert phase_name(deployment_pb2.DEPLOYMENT_PHASE_UNSPECIFIED) == "Pending"
    assert phase_name(deployment_pb2.DEPLOYMENT_PHASE_DRAINING) == "Draining"
    created = _deployment("x", 3 * 86400 + 5).create_time
    assert age(created, NOW) == "3d"
    assert age(_deployment("x", 7200).create_time, NOW) == "2h"


def test_deployment_without_create_time_shows_a_dash() -> None:
    table = deployments_table([deployment_pb2.Deployment(name="new")], NOW)
    assert table.rows[0][0] == "new" and table.rows[0][-1] == "-"


def test_json_and_yaml_use_proto_field_names() -> None:
    data = message_dict(_deployment("echo", 1))
    assert json.loads(dumps(data, "json"))["spec"]["gpu"] == {
        "memory_mib": "2048",
        "core_percent": 25,
    }
    parsed = yaml.safe_load(dumps(data, "yaml"))
    assert parsed["status"]["phase"] == "DEPLOYMENT_PHASE_RUNNING"
    assert parsed["spec"]["scaling"]["max_instances"] == 4


def test_event_lines() -> None:
    deployment_event = pb.WatchEventsResponse(
        revision=42, type=pb.EVENT_TYPE_CREATED, deployment=_deployment("echo", 1)
    )
    assert event_line(deployment_event) == "      42  CREATED        deployment/echo  Running"
    instance_event = pb.WatchEventsResponse(
        revision=43,
        type=pb.EVENT_TYPE_UPDATED,
        instance=instance_pb2.Instance(id="echo-1a2b", state=instance_pb2.INSTANCE_STATE_READY),
    )
    assert event_line(instance_event) == "      43  UPDATED        instance/echo-1a2b  Ready"
    end = pb.WatchEventsResponse(revision=44, type=pb.EVENT_TYPE_SNAPSHOT_END)
    assert event_line(end) == "      44  SNAPSHOT_END   -"
