"""Where the CLI finds the control plane address and the admin token."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

DEFAULT_SERVER = "127.0.0.1:50051"
SERVER_ENV = "GPUFLEET_SERVER"
TOKEN_ENV = "GPUFLEET_TOKEN"
STATE_DIR_ENV = "GPUFLEET_STATE_DIR"
TOKEN_FILE = "admin-token"


class TokenNotFoundError(Exception):
    """No admin token in the flag, the environment or the state directory."""


def resolve_server(flag: str | None, env: Mapping[str, str]) -> str:
    """``--server``, else $GPUFLEET_SERVER, else 127.0.0.1:50051."""
    return flag or env.get(SERVER_ENV) or DEFAULT_SERVER


def state_dir(env: Mapping[str, str], home: Path | None = None) -> Path:
    """$GPUFLEET_STATE_DIR, else ~/.gpufleet (the server's default too)."""
    configured = env.get(STATE_DIR_ENV)
    if configured:
        return Path(configured).expanduser()
    return (home if home is not None else Path.home()) / ".gpufleet"


def resolve_token(flag: str | None, env: Mapping[str, str], home: Path | None = None) -> str:
    """``--token``, else $GPUFLEET_TOKEN, else the admin-token file the server wrote in its
    state directory."""
    if flag:
        return flag
    from_env = env.get(TOKEN_ENV)
    if from_env:
        return from_env
    token_file = state_dir(env, home) / TOKEN_FILE
    try:
        token = token_file.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        problem = "does not exist"
    except OSError as error:
        problem = f"cannot be read ({error.strerror or error})"
    else:
        if token:
            return token
        problem = "is empty"
    raise TokenNotFoundError(
        f"no admin token: --token is not given, ${TOKEN_ENV} is not set, and {token_file} "
        f"{problem}. Pass --token, set ${TOKEN_ENV}, or point ${STATE_DIR_ENV} at the state "
        "directory of the control plane (`gpufleet server --state-dir DIR` writes DIR/"
        f"{TOKEN_FILE} on first start)."
    )
