"""node.json: atomic 0600 writes, round trip, damaged files; the agent state-dir lock."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from gpufleet.agent.identity import (
    AgentLock,
    IdentityError,
    NodeIdentity,
    StateDirInUseError,
    identity_path,
    load_identity,
    save_identity,
)

IDENTITY = NodeIdentity(node_id="node-1a2b3c4d", node_secret="s3cret", node_name="gpu-1", server="127.0.0.1:1")


def test_missing_identity_is_none(tmp_path: Path) -> None:
    assert load_identity(tmp_path) is None


def test_round_trip_with_mode_0600(tmp_path: Path) -> None:
    save_identity(tmp_path, IDENTITY)
    assert load_identity(tmp_path) == IDENTITY
    assert stat.S_IMODE(identity_path(tmp_path).stat().st_mode) == 0o600
    replaced = NodeIdentity("node-1a2b3c4d", "new-secret", "gpu-1", "127.0.0.1:1")
    save_identity(tmp_path, replaced)
    assert load_identity(tmp_path) == replaced
    # No temporary file is left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["node.json"]


def test_stale_temporary_file_does_not_block_a_save(tmp_path: Path) -> None:
    (tmp_path / ".node.json.tmp").write_text("half written")
    save_identity(tmp_path, IDENTITY)
    assert load_identity(tmp_path) == IDENTITY


@pytest.mark.parametrize(
    "content",
    ["{not json", "[]", '{"version": 99}', '{"version": 1, "node_id": "n"}', '{"version": 1, "node_id": "", '
     '"node_secret": "", "node_name": "x"}'],
)
def test_damaged_identity_says_how_to_recover(tmp_path: Path, content: str) -> None:
    identity_path(tmp_path).write_text(content)
    with pytest.raises(IdentityError, match="delete it and start the agent with --join-token"):
        load_identity(tmp_path)


def test_lock_is_exclusive_and_released(tmp_path: Path) -> None:
    state_dir = tmp_path / "new" / "agent"
    lock = AgentLock.acquire(state_dir)
    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
    with pytest.raises(StateDirInUseError, match="another gpufleet agent is using the state dir"):
        AgentLock.acquire(state_dir)
    lock.release()
    lock.release()
    AgentLock.acquire(state_dir).release()
