"""`gpufleet server join-token create|list`: join tokens that expire, for adding nodes.

Both work on the state dir's database directly, so they run on the control plane host with
or without the control plane running: SQLite in WAL mode lets this process commit one row
beside it, and the control plane reads join tokens from the database at every Register, so
a new token works at once. server.lock belongs to the control plane and is not taken here.

The database keeps only a token's SHA-256; a token is shown once, when it is created. Its id
(the first 12 hex digits of that hash) names it in `list` without revealing it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sqlite3
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from gpufleet.server.errors import StartupError
from gpufleet.server.join_tokens import JOIN_TOKEN_FILE, new_join_token
from gpufleet.server.state_dir import DATABASE_FILE
from gpufleet.server.store import SqliteStore
from gpufleet.server.tokens import sha256_hex
from gpufleet.server.cli_parser import OneLineErrorParser

PROG = "gpufleet server join-token"
STATE_DIR_ENV = "GPUFLEET_STATE_DIR"
"""The same variable `gpufleet server` reads its state dir from."""
DEFAULT_TTL = "24h"
MAX_TTL_S = 366 * 86400.0
TOKEN_ID_LENGTH = 12

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd]?)")
_BUSY_TIMEOUT_S = 5.0

_EPILOG = """\
Examples:
  gpufleet server join-token create                      # valid for 24h
  TOKEN=$(gpufleet server join-token create --ttl 30m)   # the token alone is on stdout
  gpufleet server join-token list --state-dir /var/lib/gpufleet/server

Give the token to an agent: gpufleet agent --server HOST:PORT --join-token "$TOKEN", or
gpufleet agent install-systemd --server HOST:PORT --join-token "$TOKEN" on the GPU node.
A node needs it only to register once; an expired token does not remove registered nodes."""


class JoinTokenCliError(Exception):
    """The command cannot proceed; the message says why and what to do."""


@dataclass(frozen=True)
class CreatedJoinToken:
    """A token just stored."""

    token: str
    """The secret to give agents; shown only now."""
    token_id: str
    """Its public id, as `list` shows it."""
    expire_time_us: int
    """When it stops being accepted, microseconds since the epoch."""


@dataclass(frozen=True)
class JoinTokenInfo:
    """A stored token as `list` shows it (never the token itself)."""

    token_id: str
    create_time_us: int
    expire_time_us: int | None
    """None: never expires."""
    is_file_token: bool
    """True for the token in <state-dir>/join-token, the one the control plane created."""


def token_id(token_sha256: str) -> str:
    """The public id of a token, from its stored hash."""
    return token_sha256[:TOKEN_ID_LENGTH]


def parse_ttl(text: str) -> float:
    """"90s", "30m", "24h", "7d" or plain seconds -> seconds; ValueError if malformed,
    not positive or over a year."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"--ttl {text!r} is not a duration such as 30m, 24h or 7d")
    seconds = float(match.group(1)) * _UNITS[match.group(2) or "s"]
    if not 0 < seconds <= MAX_TTL_S:
        raise ValueError(f"--ttl must be more than 0 and at most 366d, got {text!r}")
    return seconds


def iso_time(time_us: int) -> str:
    """Microseconds since the epoch as ISO 8601 UTC to the second: 2025-01-02T03:04:05Z."""
    moment = datetime.fromtimestamp(time_us / 1e6, UTC).replace(microsecond=0)
    return moment.isoformat().replace("+00:00", "Z")


def relative_time(time_us: int, now_us: int) -> str:
    """"in 24h" or "5m ago", rounded in the largest unit that fits."""
    delta = (time_us - now_us) / 1e6
    amount = abs(delta)
    text = f"{round(amount)}s"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if amount >= size:
            text = f"{round(amount / size)}{unit}"
            break
    return f"in {text}" if delta >= 0 else f"{text} ago"


def expiry_text(expire_time_us: int | None, now_us: int) -> str:
    """"2025-01-02T03:04:05Z (in 23h)", or "never"."""
    if expire_time_us is None:
        return "never"
    return f"{iso_time(expire_time_us)} ({relative_time(expire_time_us, now_us)})"


def database_path(state_dir: Path) -> Path:
    """The control plane's database in `state_dir`; JoinTokenCliError if there is none."""
    path = state_dir / DATABASE_FILE
    if not path.is_file():
        raise JoinTokenCliError(
            f"no control plane database at {path}: pass the --state-dir the control plane "
            f"uses (or set ${STATE_DIR_ENV}), or start `gpufleet server` there once first"
        )
    return path


async def create_join_token(state_dir: Path, ttl_s: float, now_s: float) -> CreatedJoinToken:
    """Store a new token expiring `ttl_s` after `now_s` (seconds since the epoch)."""
    path = database_path(state_dir)
    token = new_join_token()
    digest = sha256_hex(token)
    expire_time_us = int((now_s + ttl_s) * 1_000_000)
    try:
        store = await SqliteStore.open(path)
    except StartupError as err:
        raise JoinTokenCliError(str(err)) from None
    try:
        await store.add_join_token(digest, expire_time_us)
    finally:
        await store.close()
    return CreatedJoinToken(token, token_id(digest), expire_time_us)


def list_join_tokens(state_dir: Path) -> list[JoinTokenInfo]:
    """Every stored token, oldest first."""
    path = database_path(state_dir)
    file_digest = _file_token_digest(state_dir)
    try:
        db = sqlite3.connect(path, timeout=_BUSY_TIMEOUT_S)
        try:
            rows = db.execute(
                "SELECT token_sha256, create_time_us, expire_time_us FROM join_tokens "
                "ORDER BY create_time_us, token_sha256"
            ).fetchall()
        finally:
            db.close()
    except sqlite3.Error as err:
        raise JoinTokenCliError(
            f"cannot read join tokens from {path}: {err}; start `gpufleet server` on this "
            "state dir once to bring its database up to date"
        ) from None
    return [
        JoinTokenInfo(
            token_id=token_id(str(digest)),
            create_time_us=int(created),
            expire_time_us=None if expires is None else int(expires),
            is_file_token=digest == file_digest,
        )
        for digest, created, expires in rows
    ]


def _file_token_digest(state_dir: Path) -> str | None:
    try:
        token = (state_dir / JOIN_TOKEN_FILE).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return sha256_hex(token) if token else None


def tokens_table(tokens: Sequence[JoinTokenInfo], now_us: int) -> str:
    """The `list` output: aligned columns, one token a row."""
    rows = [("ID", "CREATED", "EXPIRES", "STATE")]
    for info in tokens:
        expired = info.expire_time_us is not None and info.expire_time_us <= now_us
        state = "expired" if expired else "valid"
        if info.is_file_token:
            state += f" (<state-dir>/{JOIN_TOKEN_FILE})"
        rows.append(
            (
                info.token_id,
                iso_time(info.create_time_us),
                expiry_text(info.expire_time_us, now_us),
                state,
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return "".join(
        "   ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        + "\n"
        for row in rows
    )


def build_parser() -> OneLineErrorParser:
    """`gpufleet server join-token create|list`."""
    parser = OneLineErrorParser(
        prog=PROG,
        description="Create join tokens that expire, and list them. Agents present a join "
        "token once, to register their node.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="action", metavar="create|list", required=True)
    state_dir_help = f"the control plane's state dir (default: ${STATE_DIR_ENV}, else ~/.gpufleet)"
    create = commands.add_parser(
        "create",
        help="create a token and print it (only this once) with its expiry",
        description="Create a join token. stdout gets the token alone; stderr its id and "
        "expiry.",
        epilog="Examples:\n  gpufleet server join-token create --ttl 2h",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    create.add_argument(
        "--ttl",
        default=DEFAULT_TTL,
        help=f"how long it is accepted: 30m, 24h, 7d or seconds; at most 366d (default: {DEFAULT_TTL})",
    )
    create.add_argument("--state-dir", type=Path, default=None, help=state_dir_help)
    listing = commands.add_parser(
        "list",
        help="list token ids and expiries (never the tokens)",
        description="List stored join tokens: id, creation, expiry and whether it is still "
        "accepted. Tokens themselves are not stored, only their hashes.",
        epilog="Examples:\n  gpufleet server join-token list",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    listing.add_argument("--state-dir", type=Path, default=None, help=state_dir_help)
    return parser


def resolve_state_dir(flag: Path | None) -> Path:
    """--state-dir, else $GPUFLEET_STATE_DIR, else ~/.gpufleet (as `gpufleet server`)."""
    if flag is not None:
        return flag.expanduser().absolute()
    configured = os.environ.get(STATE_DIR_ENV, "")
    return (Path(configured) if configured else Path.home() / ".gpufleet").expanduser().absolute()


def main(argv: Sequence[str]) -> int:
    """Run `join-token create|list`: 0 done, 1 the database cannot be used, 2 bad usage."""
    args = build_parser().parse_or_exit_code(list(argv))
    if isinstance(args, int):
        return args
    state_dir = resolve_state_dir(args.state_dir)
    try:
        if args.action == "create":
            try:
                ttl_s = parse_ttl(args.ttl)
            except ValueError as err:
                print(f"{PROG}: error: {err}", file=sys.stderr)
                return EXIT_USAGE
            return _create(state_dir, ttl_s)
        return _list(state_dir)
    except JoinTokenCliError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return EXIT_FAILED


def _create(state_dir: Path, ttl_s: float) -> int:
    now = time.time()
    created = asyncio.run(create_join_token(state_dir, ttl_s, now))
    # The token alone on stdout keeps `TOKEN=$(gpufleet server join-token create)` usable.
    print(created.token, flush=True)
    print(
        f"join token {created.token_id} expires "
        f"{expiry_text(created.expire_time_us, int(now * 1_000_000))}; shown only this once.\n"
        f'Use it on a GPU node: gpufleet agent --server HOST:PORT --join-token "$TOKEN"',
        file=sys.stderr,
    )
    return EXIT_OK


def _list(state_dir: Path) -> int:
    tokens = list_join_tokens(state_dir)
    sys.stdout.write(tokens_table(tokens, int(time.time() * 1_000_000)))
    return EXIT_OK
