"""The CLI without a server: parsing, help, local input errors and error rendering."""

from __future__ import annotations

import sys
import types

import grpc
import pytest
from google.rpc import status_pb2

from gpufleet.client.cli.errors import describe_rpc_error
from gpufleet.client.cli.main import build_parser, main
from gpufleet.client.errors import FieldViolation, RPCError

COMMAND_NAMES = ["apply", "get", "list", "delete", "scale", "watch", "rotate-token"]


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    for name in ("GPUFLEET_SERVER", "GPUFLEET_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("GPUFLEET_STATE_DIR", str(tmp_path / "state"))


@pytest.mark.parametrize("command", COMMAND_NAMES)
def test_every_command_has_help_with_an_example(command, capsys) -> None:
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert f"usage: gpufleet {command}" in out
    assert "Examples:" in out and f"gpufleet {command}" in out.split("Examples:")[1]


def test_top_level_help_lists_every_command(capsys) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ["server", *COMMAND_NAMES]:
        assert command in out


def test_no_command_is_a_usage_error(capsys) -> None:
    assert main([]) == 2
    assert "usage: gpufleet" in capsys.readouterr().err


def test_unknown_option_is_a_usage_error(capsys) -> None:
    assert main(["get", "echo", "--bogus"]) == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_client_options_work_before_and_after_the_command() -> None:
    parser = build_parser()
    after, _ = parser.parse_known_args(["get", "x", "--server", "h:1", "-o", "json"])
    assert (after.server, after.output) == ("h:1", "json")
    before, _ = parser.parse_known_args(["--server", "h:2", "-o", "yaml", "--tls", "get", "x"])
    assert (before.server, before.output, before.tls) == ("h:2", "yaml", True)
    default, _ = parser.parse_known_args(["list"])
    assert (default.server, default.output, default.tls, default.selector) == (
        None,
        "table",
        False,
        [],
    )


def test_server_command_forwards_its_arguments(monkeypatch) -> None:
    received: list[list[str] | None] = []

    def fake_server_main(argv: list[str] | None) -> int:
        received.append(argv)
        return 7

    fake = types.ModuleType("gpufleet.server.main")
    fake.main = fake_server_main  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "gpufleet.server.main", fake)
    argv = [
        "server",
        "--state-dir",
        "/tmp/x",
        "--listen",
        "127.0.0.1:0",
        "--tls-cert",
        "c.pem",
        "--help",
    ]
    assert main(argv) == 7
    assert received == [argv[1:]]


def test_server_command_without_the_server_extra(monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "gpufleet.server.main", None)
    assert main(["server"]) == 2
    assert "pip install 'gpufleet[server]'" in capsys.readouterr().err


def test_missing_token_is_explained_without_a_traceback(tmp_path, capsys) -> None:
    assert main(["list"]) == 2
    err = capsys.readouterr().err
    assert "no admin token" in err and str(tmp_path / "state" / "admin-token") in err
    assert "Traceback" not in err


def test_bad_spec_file_is_an_input_error_before_any_call(tmp_path, capsys) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text("name: echo\nspec:\n  gpu: {cores: 1}\n")
    # An unreachable server proves nothing was sent: the spec is rejected first.
    assert main(["--token", "t", "--server", "127.0.0.1:9", "apply", "-f", str(spec)]) == 2
    err = capsys.readouterr().err
    assert f"{spec}: document 1: spec.gpu.cores: unknown field" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["scale", "echo"], "--min N, --max N or both"),
        (["scale", "echo", "--min", "-1"], "--min must be 0 or more"),
        (["list", "-l", "team"], "-l expects KEY=VALUE"),
        (["watch", "--since", "-3"], "--since must be"),
        (["get", "x", "--tls-cert", "c.pem"], "needs both --tls-cert and --tls-key"),
        (
            ["get", "x", "--tls-ca", "/nonexistent/ca.pem"],
            "cannot read --tls-ca /nonexistent/ca.pem",
        ),
    ],
)
def test_local_usage_errors(argv, message, capsys) -> None:
    assert main(["--token", "t", *argv]) == 2
    assert message in capsys.readouterr().err


def test_unreachable_server_message_names_the_address() -> None:
    error = RPCError(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses")
    code, message = describe_rpc_error(error, "10.1.2.3:50051")
    assert code == 3
    assert "cannot connect to the control plane at 10.1.2.3:50051" in message
    assert "gpufleet server" in message


def test_unavailable_answered_by_the_server_is_a_server_error() -> None:
    error = RPCError(
        grpc.StatusCode.UNAVAILABLE,
        "draining",
        status=status_pb2.Status(code=14, message="draining"),
    )
    assert describe_rpc_error(error, "h:1")[0] == 1


def test_field_violations_each_on_their_own_line() -> None:
    error = RPCError(
        grpc.StatusCode.INVALID_ARGUMENT,
        "invalid deployment spec",
        field_violations=[
            FieldViolation("spec.gpu.core_percent", "must be 1-100, got 150"),
            FieldViolation("spec.port", "must be 0-65535"),
        ],
        reason="INVALID_SPEC",
    )
    code, message = describe_rpc_error(error, "h:1")
    assert code == 1
    assert message.splitlines() == [
        "error: INVALID_ARGUMENT: invalid deployment spec",
        "  spec.gpu.core_percent: must be 1-100, got 150",
        "  spec.port: must be 0-65535",
        "  reason: INVALID_SPEC",
    ]


def test_unauthenticated_explains_where_the_token_comes_from() -> None:
    code, message = describe_rpc_error(
        RPCError(grpc.StatusCode.UNAUTHENTICATED, "bad token"), "h:1"
    )
    assert code == 1
    assert "error: UNAUTHENTICATED: bad token" in message and "GPUFLEET_TOKEN" in message
