"""The node's identity on disk (`<state_dir>/node.json`) and the agent's state-dir lock.

node.json holds the node id and secret the control plane issued at registration, so that a
restarted agent comes back as the same node (and its instances stay its instances). It is
written atomically with mode 0600: a crash leaves the old or the new file whole, and only the
agent's user can read the secret.
"""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import dataclass
from pathlib import Path

IDENTITY_FILE = "node.json"
LOCK_FILE = "agent.lock"
_FORMAT_VERSION = 1


class IdentityError(Exception):
    """node.json exists but cannot be used; the message says how to recover."""


class StateDirInUseError(Exception):
    """Another agent holds the state dir."""


@dataclass(frozen=True)
class NodeIdentity:
    """Credentials of this node, as issued by NodeService.Register."""

    node_id: str
    """Node id, e.g. "node-1a2b3c4d"."""
    node_secret: str
    """Secret sent as `authorization: Bearer <secret>` on Connect."""
    node_name: str
    """Name the node registered with."""
    server: str
    """Control plane address it registered at, for messages."""


def identity_path(state_dir: Path) -> Path:
    """Where the identity of the agent using `state_dir` is kept."""
    return state_dir / IDENTITY_FILE


def load_identity(state_dir: Path) -> NodeIdentity | None:
    """The stored identity; None if the node never registered. Raises IdentityError."""
    path = identity_path(state_dir)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as err:
        raise IdentityError(
            f"cannot read the node identity {path}: {err.strerror or err}; fix its permissions"
        ) from err
    try:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("version") != _FORMAT_VERSION:
            raise ValueError(f"not a version {_FORMAT_VERSION} node identity")
        identity = NodeIdentity(
            node_id=str(data["node_id"]),
            node_secret=str(data["node_secret"]),
            node_name=str(data["node_name"]),
            server=str(data.get("server", "")),
        )
    except (ValueError, KeyError, TypeError) as err:
        raise IdentityError(
            f"the node identity {path} is damaged ({err}); delete it and start the agent with "
            "--join-token to register as a new node"
        ) from err
    if not identity.node_id or not identity.node_secret:
        raise IdentityError(
            f"the node identity {path} has no node id or secret; delete it and start the agent "
            "with --join-token to register as a new node"
        )
    return identity


def save_identity(state_dir: Path, identity: NodeIdentity) -> None:
    """Write node.json atomically with mode 0600. Raises OSError."""
    path = identity_path(state_dir)
    tmp = path.with_name(f".{IDENTITY_FILE}.tmp")
    payload = json.dumps(
        {
            "version": _FORMAT_VERSION,
            "node_id": identity.node_id,
            "node_secret": identity.node_secret,
            "node_name": identity.node_name,
            "server": identity.server,
        },
        indent=1,
        sort_keys=True,
    ).encode("utf-8")
    try:
        tmp.unlink()
    except FileNotFoundError:
        pass
    # O_EXCL with mode 0600: the secret is never readable by others, not even briefly.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(payload)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(state_dir, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class AgentLock:
    """An exclusive flock on `<state_dir>/agent.lock` while the agent runs.

    Two agents on one state dir would both adopt, restart and stop the same instances. The
    kernel drops the lock when the process dies (kill -9 included), so none goes stale.
    """

    def __init__(self, fd: int, path: Path) -> None:
        self._fd: int | None = fd
        self.path = path

    @classmethod
    def acquire(cls, state_dir: Path) -> AgentLock:
        """Create the state dir (0700) if needed and lock it. Raises StateDirInUseError, OSError."""
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = state_dir / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StateDirInUseError(
                f"another gpufleet agent is using the state dir {state_dir}; stop it or pick "
                "another --state-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return cls(fd, path)

    def release(self) -> None:
        """Unlock (idempotent)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
