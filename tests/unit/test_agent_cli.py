"""The node-side CLI commands without a server: nodes/instances tables, logs, help."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from gpufleet.client.cli.commands.instances import gpu_labels, instances_table
from gpufleet.client.cli.commands.nodes import node_state_name, nodes_table
from gpufleet.client.cli.main import main
from gpufleet.client.output import plain_table
from gpufleet.v1 import instance_pb2, node_pb2

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


def _timestamp(seconds_before_now: int) -> Timestamp:
    stamp = Timestamp()
    stamp.FromSeconds(int(NOW.timestamp()) - seconds_before_now)
    return stamp


def _nodes() -> list[node_pb2.Node]:
    return [
        node_pb2.Node(
            id="node-1",
            name="box",
            state=node_pb2.NODE_STATE_READY,
            last_heartbeat_time=_timestamp(3),
            gpus=[
                node_pb2.Gpu(uuid="GPU-b", index=1, memory_total_mib=81559, health=node_pb2.GPU_HEALTH_LOST),
                node_pb2.Gpu(
                    uuid="GPU-a",
                    index=0,
                    memory_total_mib=81559,
                    memory_reserved_mib=4096,
                    memory_used_mib=4100,
                    sm_utilization_percent=50,
                    instance_ids=["echo-1", "echo-2"],
                ),
            ],
        ),
        node_pb2.Node(id="node-2", name="cpu-only", state=node_pb2.NODE_STATE_LOST),
    ]


def test_nodes_table_has_a_row_per_gpu() -> None:
    table = nodes_table(_nodes(), NOW)
    assert table.columns[:5] == ("NODE", "NAME", "STATE", "HEARTBEAT", "GPU")
    assert table.rows == (
        ("node-1", "box", "Ready", "3s ago", "0", "81559", "4096", "4100", "50", "echo-1,echo-2"),
        ("", "", "", "", "1 (lost)", "81559", "0", "0", "0", "-"),
        ("node-2", "cpu-only", "Lost", "never", "-", "-", "-", "-", "-", "-"),
    )
    text = plain_table(table)
    assert "RESERVED MiB" in text and "echo-1,echo-2" in text


def test_node_state_names() -> None:
    assert node_state_name(node_pb2.NODE_STATE_SUSPECT) == "Suspect"
    assert node_state_name(node_pb2.NODE_STATE_UNSPECIFIED) == "-"


def test_instances_table() -> None:
    instances = [
        instance_pb2.Instance(
            id="echo-1",
            deployment="echo",
            node_id="node-1",
            gpu_uuids=["GPU-a"],
            state=instance_pb2.INSTANCE_STATE_READY,
            reason="ready",
            address="127.0.0.1:4000",
            pid=1234,
            restart_count=1,
            gpu_memory_reserved_mib=2048,
            gpu_memory_used_mib=2050,
            gpu_memory_overrun=True,
        ),
        instance_pb2.Instance(
            id="cpu-1",
            deployment="cpu",
            node_id="node-9",
            state=instance_pb2.INSTANCE_STATE_FAILED,
            reason="exit code 1",
            crash_loop=True,
        ),
    ]
    table = instances_table(instances, {"node-1": "box"}, gpu_labels(_nodes()))
    assert table.rows == (
        ("echo-1", "echo", "box", "0", "Ready", "ready", "127.0.0.1:4000", "1234", "1", "2050/2048!"),
        ("cpu-1", "cpu", "node-9", "-", "Failed (crash loop)", "exit code 1", "-", "-", "0", "-"),
    )


@pytest.mark.parametrize("command", ["nodes", "instances", "logs"])
def test_new_commands_have_help_with_an_example(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert f"usage: gpufleet {command}" in out
    assert "Examples:" in out and f"gpufleet {command}" in out.split("Examples:")[1]


@pytest.mark.parametrize("command", ["agent", "up"])
def test_process_commands_forward_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert f"usage: gpufleet {command}" in out and "--state-dir" in out


def _write_log(state_dir: Path, instance_id: str, current: str, rotated: str = "") -> None:
    logs = state_dir / "instances" / instance_id / "logs"
    logs.mkdir(parents=True)
    (logs / "instance.log").write_text(current)
    if rotated:
        (logs / "instance.log.1").write_text(rotated)


def test_logs_prints_the_tail_across_rotated_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write_log(tmp_path, "echo-1", "line 3\nline 4\n", rotated="line 1\nline 2\n")
    assert main(["logs", "echo-1", "--tail", "3", "--agent-state-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out == "line 2\nline 3\nline 4\n"


def test_logs_default_state_dir_follows_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("GPUFLEET_AGENT_STATE_DIR", raising=False)
    monkeypatch.setenv("GPUFLEET_STATE_DIR", str(tmp_path))
    _write_log(tmp_path / "agent", "echo-1", "hello\n")
    assert main(["logs", "echo-1"]) == 0
    assert capsys.readouterr().out == "hello\n"


def test_logs_of_an_unknown_instance_says_where_to_run_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["logs", "echo-9", "--agent-state-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no logs for instance 'echo-9'" in err
    assert "on the node that runs the instance" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["logs", "../etc"], "invalid instance id"), (["logs", "x", "--tail", "-1"], "--tail must be 0 or more")],
)
def test_logs_usage_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["up", "--simulate-gpus", "lots"], "is not COUNTxMIB"),
        (["up", "--labels", "zone"], "is not KEY=VALUE"),
        (["up", "--listen", "nowhere"], "is not HOST:PORT"),
        (["up", "--workdir", "/nonexistent/dir"], "is not a directory"),
        (["up", "--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_up_usage_errors_exit_2_before_starting_anything(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*argv, "--state-dir", str(tmp_path / "state")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gpufleet up: error:") and message in err and "Traceback" not in err
    assert not (tmp_path / "state").exists()


def test_loopback_target() -> None:
    from gpufleet.server.up import loopback_target

    assert loopback_target("0.0.0.0:7") == "127.0.0.1:7"
    assert loopback_target("[::]:7") == "[::1]:7"
    assert loopback_target("127.0.0.1:7") == "127.0.0.1:7"
