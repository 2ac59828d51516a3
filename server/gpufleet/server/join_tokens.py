"""Join tokens: what an agent presents to NodeService.Register to join the cluster.

The first start of a state dir creates one, written to `<state_dir>/join-token` (0600) and
printed once, like the admin token. SQLite keeps only its SHA-256, with an optional expiry
(the default token does not expire). A token found in the file but not in the database
(a database restored from elsewhere) is stored again on start.
"""

from __future__ import annotations

import enum
import logging
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from gpufleet.server.errors import StartupError
from gpufleet.server.store import Store
from gpufleet.server.tokens import sha256_hex, write_secret_file

_log = logging.getLogger(__name__)

JOIN_TOKEN_FILE = "join-token"


@dataclass(frozen=True)
class JoinToken:
    """The join token of a state dir."""

    token: str
    """The secret agents pass as --join-token."""
    path: Path
    """The 0600 file holding it."""
    created: bool
    """True when this start created it (it should be shown to the operator once)."""


class JoinTokenCheck(enum.Enum):
    """Verdict on a presented join token."""

    VALID = "valid"
    UNKNOWN = "unknown"
    EXPIRED = "expired"


async def load_or_create_join_token(
    state_dir: Path, store: Store, expire_time_us: int | None = None
) -> JoinToken:
    """Read `<state_dir>/join-token` or create it, and make sure the store knows its hash.

    expire_time_us applies to a newly created token only; None means it never expires.
    Raises StartupError when the file cannot be read.
    """
    path = state_dir / JOIN_TOKEN_FILE
    created = False
    try:
        token = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        token = new_join_token()
        write_secret_file(path, token + "\n")
        created = True
    except (OSError, UnicodeDecodeError) as err:
        raise StartupError(
            f"cannot read the join token {path}: {err}; fix its permissions, or delete it to "
            "create a new join token"
        ) from err
    if not token:
        raise StartupError(f"the join token file {path} is empty; delete it to create a new one")
    if not created:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            _log.warning(
                "join token file %s is readable by others (mode %o); run: chmod 600 %s",
                path,
                mode,
                path,
            )
    await store.add_join_token(sha256_hex(token), expire_time_us if created else None)
    return JoinToken(token, path, created)


def new_join_token() -> str:
    """A fresh random join token (URL-safe, 256 bits)."""
    return secrets.token_urlsafe(32)


async def check_join_token(store: Store, presented: str, now_us: int) -> JoinTokenCheck:
    """Whether a presented join token is stored and not expired."""
    record = await store.get_join_token(sha256_hex(presented))
    if record is None:
        return JoinTokenCheck.UNKNOWN
    if record.expire_time_us is not None and record.expire_time_us <= now_us:
        return JoinTokenCheck.EXPIRED
    return JoinTokenCheck.VALID
