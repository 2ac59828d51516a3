"""`gpufleet server join-token` against a running control plane (port 0, SQLite in
tmp_path): tokens it writes beside the control plane register nodes at once, expired ones
are refused by Register, and `list` never shows a token."""

from __future__ import annotations

import asyncio
import os
import re
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest

from gpufleet.server.join_token_cli import create_join_token
from tests.integration.test_node_service_helpers import ScriptedAgent, node_config, running_plane

pytestmark = pytest.mark.timeout(90)

_CLI_TIMEOUT_S = 60.0


async def run_cli(*args: str) -> tuple[int, str, str]:
    """The real `gpufleet` CLI in a subprocess, without blocking the control plane's loop."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUFLEET_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gpufleet.client.cli", *args,
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), _CLI_TIMEOUT_S)
    return process.returncode or 0, out.decode(), err.decode()


async def register(address: str, token: str, name: str) -> ScriptedAgent:
    agent = ScriptedAgent(address, token, name)
    await agent.register()
    return agent


async def test_created_token_registers_a_node_while_the_plane_runs(tmp_path: Path) -> None:
    state_dir = tmp_path / "s"
    async with running_plane(node_config(state_dir)) as cp:
        code, out, err = await run_cli(
            "server", "join-token", "create", "--ttl", "2h", "--state-dir", str(state_dir)
        )
        assert code == 0, err
        token = out.strip()
        assert out == token + "\n" and re.fullmatch(r"[A-Za-z0-9_-]{43}", token)
        match = re.search(r"join token ([0-9a-f]{12}) expires (\S+Z) \(in 2h\)", err)
        assert match is not None, err
        token_id, expires = match.groups()
        expire_s = datetime.strptime(expires, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()
        assert abs(expire_s - (time.time() + 7200)) < 120

        agent = await register(cp.plane.address, token, "gpu-new")
        try:
            assert agent.node_id.startswith("node-")
        finally:
            await agent.close()

        code, listing, err = await run_cli("server", "join-token", "list", "--state-dir", str(state_dir))
        assert code == 0, err
        assert token not in listing and cp.plane.join_token not in listing
        rows = {line.split()[0]: line for line in listing.splitlines()[1:]}
        assert token_id in rows and "(in 2h)" in rows[token_id] and "valid" in rows[token_id]
        # The control plane's own token, from <state-dir>/join-token, never expires.
        assert any("never" in row and "join-token" in row for row in rows.values())


async def test_an_expired_token_is_refused_by_register(tmp_path: Path) -> None:
    state_dir = tmp_path / "s"
    async with running_plane(node_config(state_dir)) as cp:
        # Created an hour ago with a one-minute TTL: expired 59 minutes ago.
        expired = await create_join_token(state_dir, ttl_s=60, now_s=time.time() - 3600)
        fresh = await create_join_token(state_dir, ttl_s=3600, now_s=time.time())

        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await register(cp.plane.address, expired.token, "gpu-late")
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "expired" in (refused.value.details() or "")

        agent = await register(cp.plane.address, fresh.token, "gpu-on-time")
        await agent.close()

        code, listing, err = await run_cli("server", "join-token", "list", "--state-dir", str(state_dir))
        assert code == 0, err
        rows = {line.split()[0]: line for line in listing.splitlines()[1:]}
        assert rows[expired.token_id].rstrip().endswith("expired")
        assert "ago)" in rows[expired.token_id]
        assert rows[fresh.token_id].rstrip().endswith("valid")


async def test_a_state_dir_without_a_database_is_refused(tmp_path: Path) -> None:
    code, out, err = await run_cli("server", "join-token", "create", "--state-dir", str(tmp_path))
    assert code == 1 and out == ""
    assert f"no control plane database at {tmp_path}/gpufleet.db" in err
    assert not (tmp_path / "gpufleet.db").exists()
    code, _, err = await run_cli(
        "server", "join-token", "create", "--ttl", "forever", "--state-dir", str(tmp_path)
    )
    assert code == 2 and "--ttl 'forever'" in err
