from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from gpufleet.client.cli.commands.gateway import forwarded_args
from gpufleet.client.cli.main import build_parser as build_cli_parser
from gpufleet.gateway.app import split_listen
from gpufleet.gateway.main import build_parser, config_from_args, resolve_token
from gpufleet.gateway.settings import DEFAULT_LISTEN, GatewayConfig
from gpufleet.server.errors import StartupError


def test_config_defaults_and_validation() -> None:
    config = GatewayConfig(server_address="cp:50051", admin_token="t")
    assert config.listen == DEFAULT_LISTEN and config.gateway_id
    for bad in (
        {"server_address": " "},
        {"admin_token": ""},
        {"gateway_id": ""},
        {"reconnect_initial_backoff_s": 0.0},
        {"reconnect_max_backoff_s": 0.1, "reconnect_initial_backoff_s": 1.0},
        {"max_message_bytes": 0},
    ):
        fields = {"server_address": "cp:1", "admin_token": "t", **bad}
        with pytest.raises(ValueError):
            GatewayConfig(**fields)  # type: ignore[arg-type]


def test_split_listen() -> None:
    assert split_listen("127.0.0.1:0") == ("127.0.0.1", 0)
    assert split_listen("[::1]:8001") == ("[::1]", 8001)
    for bad in ("nowhere", ":80", "host:99999", "host:x"):
        with pytest.raises(StartupError, match="HOST:PORT"):
            split_listen(bad)


def test_token_resolution_order(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "admin-token").write_text("from-state\n")
    file = tmp_path / "file"
    file.write_text(" from-file \n")
    env = {"GPUFLEET_STATE_DIR": str(state)}
    assert resolve_token("flag", None, env, tmp_path) == "flag"
    assert resolve_token(None, file, {"GPUFLEET_TOKEN": "env"}, tmp_path) == "from-file"
    assert resolve_token(None, None, {**env, "GPUFLEET_TOKEN": "env"}, tmp_path) == "env"
    assert resolve_token(None, None, env, tmp_path) == "from-state"
    home = tmp_path / "home"
    (home / ".gpufleet").mkdir(parents=True)
    (home / ".gpufleet" / "admin-token").write_text("from-home")
    assert resolve_token(None, None, {}, home) == "from-home"
    with pytest.raises(StartupError, match="no admin token"):
        resolve_token(None, None, {}, tmp_path / "nobody")
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(StartupError, match="empty"):
        resolve_token(None, tmp_path / "empty", {}, tmp_path)


def test_config_from_args(tmp_path: Path) -> None:
    args = build_parser().parse_args(
        ["--token", "t", "--listen", "0.0.0.0:9000", "--gateway-id", "g1", "--server-tls"]
    )
    config = config_from_args(args, {"GPUFLEET_SERVER": "cp:7"}, tmp_path)
    assert (config.server_address, config.admin_token) == ("cp:7", "t")
    assert config.listen == "0.0.0.0:9000"
    assert (config.gateway_id, config.server_tls) == ("g1", True)
    defaulted = config_from_args(build_parser().parse_args(["--token", "t"]), {}, tmp_path)
    assert defaulted.server_address == "127.0.0.1:50051"


def test_cli_forwards_global_connection_options() -> None:
    args = build_cli_parser().parse_known_args(
        ["--server", "cp:1", "--token", "t", "--tls", "gateway", "--listen", "127.0.0.1:0"]
    )
    namespace, unknown = args
    namespace.unknown_args = unknown
    assert namespace.command == "gateway"
    assert forwarded_args(namespace) == [
        "--token", "t", "--server", "cp:1", "--server-tls", "--listen", "127.0.0.1:0"
    ]
    bare = argparse.Namespace(unknown_args=["--server", "x:1"])
    assert forwarded_args(bare) == ["--server", "x:1"]
    # A token file given after `gateway` replaces the global --token (they exclude each
    # other in the gateway's parser).
    file_after = argparse.Namespace(token="t", unknown_args=["--token-file=/f"])
    assert forwarded_args(file_after) == ["--token-file=/f"]
