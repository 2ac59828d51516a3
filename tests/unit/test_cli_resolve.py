"""Where the CLI finds the server address and the admin token."""

from __future__ import annotations

import pytest

from gpufleet.client.resolve import (
    DEFAULT_SERVER,
    TokenNotFoundError,
    resolve_server,
    resolve_token,
    state_dir,
)


def test_server_flag_then_env_then_default() -> None:
    env = {"GPUFLEET_SERVER": "10.0.0.1:7000"}
    assert resolve_server("h:1", env) == "h:1"
    assert resolve_server(None, env) == "10.0.0.1:7000"
    assert resolve_server(None, {}) == DEFAULT_SERVER == "127.0.0.1:50051"


def test_state_dir_env_then_home(tmp_path) -> None:
    assert state_dir({"GPUFLEET_STATE_DIR": str(tmp_path / "s")}) == tmp_path / "s"
    assert state_dir({}, home=tmp_path) == tmp_path / ".gpufleet"


def test_token_flag_then_env_then_state_dir_file(tmp_path) -> None:
    (tmp_path / "admin-token").write_text("from-file\n")
    env = {"GPUFLEET_STATE_DIR": str(tmp_path)}
    assert resolve_token("from-flag", {**env, "GPUFLEET_TOKEN": "from-env"}) == "from-flag"
    assert resolve_token(None, {**env, "GPUFLEET_TOKEN": "from-env"}) == "from-env"
    assert resolve_token(None, env) == "from-file"


def test_token_file_in_home_state_dir(tmp_path) -> None:
    (tmp_path / ".gpufleet").mkdir()
    (tmp_path / ".gpufleet" / "admin-token").write_text("home-token")
    assert resolve_token(None, {}, home=tmp_path) == "home-token"


def test_missing_token_says_where_it_looked(tmp_path) -> None:
    with pytest.raises(TokenNotFoundError) as info:
        resolve_token(None, {"GPUFLEET_STATE_DIR": str(tmp_path)})
    message = str(info.value)
    assert "--token" in message and "GPUFLEET_TOKEN" in message
    assert f"{tmp_path / 'admin-token'} does not exist" in message


def test_empty_token_file_is_reported(tmp_path) -> None:
    (tmp_path / "admin-token").write_text("\n")
    with pytest.raises(TokenNotFoundError, match="is empty"):
        resolve_token(None, {"GPUFLEET_STATE_DIR": str(tmp_path)})


def test_unreadable_token_file_is_reported(tmp_path) -> None:
    # A directory in place of the file fails to read even for root.
    (tmp_path / "admin-token").mkdir()
    with pytest.raises(TokenNotFoundError, match="cannot be read"):
        resolve_token(None, {"GPUFLEET_STATE_DIR": str(tmp_path)})
