"""Secrets: the admin token file, invoke tokens and their hashes."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from gpufleet.server.errors import StartupError

_log = logging.getLogger(__name__)

ADMIN_TOKEN_FILE = "admin-token"


@dataclass(frozen=True)
class AdminToken:
    """The admin token and where it lives."""

    token: str
    """The secret sent as `authorization: Bearer <token>`."""
    path: Path
    """The 0600 file holding it."""
    created: bool
    """True when this start created it (it should be shown to the operator once)."""


def load_or_create_admin_token(state_dir: Path) -> AdminToken:
    """Read `<state_dir>/admin-token`, or create it (0600, written atomically) if missing."""
    path = state_dir / ADMIN_TOKEN_FILE
    try:
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        token = secrets.token_urlsafe(32)
        write_secret_file(path, token + "\n")
        return AdminToken(token, path, created=True)
    except (OSError, UnicodeDecodeError) as err:
        raise StartupError(
            f"cannot read the admin token {path}: {err}; fix its permissions, or delete it to "
            "create a new token"
        ) from err
    token = text.strip()
    if not token:
        raise StartupError(f"the admin token file {path} is empty; delete it to create a new token")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        _log.warning(
            "admin token file %s is readable by others (mode %o); run: chmod 600 %s",
            path,
            mode,
            path,
        )
    return AdminToken(token, path, created=False)


def write_secret_file(path: Path, content: str) -> None:
    """Write `content` to `path` with mode 0600 via a temp file and rename, synced to disk.

    A crash leaves either no file or the whole file, never a partial secret.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as out:
            out.write(content)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def new_invoke_token() -> str:
    """A fresh random invoke token (URL-safe, 256 bits)."""
    return secrets.token_urlsafe(32)


def sha256_hex(token: str) -> str:
    """Lowercase hex SHA-256 of a token, as stored and sent to gateways."""
    return hashlib.sha256(token.encode()).hexdigest()


def tokens_equal(presented: str, expected: str) -> bool:
    """Constant-time comparison, so timing does not reveal how much of a token matched."""
    return hmac.compare_digest(presented.encode(), expected.encode())
