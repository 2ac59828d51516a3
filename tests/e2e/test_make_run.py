"""`make run` / `make stop` (issue 6 item 5): scripts/run_demo.sh starts `gpufleet up` in the
background, deploys echo and tokens onto one simulated GPU, calls both through the gateway
and leaves the stack running; scripts/stop_demo.sh stops it, instances included.

The scripts run for real on a temporary state dir with port 0 for both addresses (the
script reads the real ports from the log).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpufleet.client.sdk import Client
from tests.e2e.conftest import READY, REPO, alive, base_env, kill_instances, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

SCRIPT_TIMEOUT_S = 150


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    """The demo's state dir; whatever the scripts leave running is killed afterwards."""
    state = tmp_path / "demo"
    try:
        yield state
    finally:
        pid_file = state / "up.pid"
        if pid_file.exists():
            with contextlib.suppress(ValueError, ProcessLookupError, PermissionError):
                os.killpg(int(pid_file.read_text()), signal.SIGKILL)
        kill_instances(state / "agent")


def _run(script: str, state: Path) -> subprocess.CompletedProcess[str]:
    env = base_env(
        GPUFLEET_STATE_DIR=str(state),
        GPUFLEET_SERVER="127.0.0.1:0",
        GPUFLEET_GATEWAY="127.0.0.1:0",
    )
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / script)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=SCRIPT_TIMEOUT_S,
    )
    assert result.returncode == 0, f"{script} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result


def test_make_run_deploys_two_models_on_one_gpu_calls_them_and_make_stop_ends_it(state_dir: Path) -> None:
    demo = _run("run_demo.sh", state_dir)
    out = demo.stdout + demo.stderr

    # Both deployments READY, then a unary and a streaming call through the gateway.
    assert "ready: echo 2/2, tokens 1/1" in out, out
    assert re.search(r"OUTPUT0.*\[\[1, 2\], \[3, 4\]\]", out), out
    assert "hello from gpufleet hello from gpufleet" in out, out
    assert re.search(r"deploy-route-target: echo-\S+", out) and re.search(r"deploy-route-target: tokens-\S+", out), out
    assert "make stop" in out

    # The stack is left running: the printed addresses answer, and the three instances of
    # the two deployments share one GPU.
    server = re.search(r"control plane (\S+), gateway (\S+)", out)
    assert server is not None, out
    up_pid = int((state_dir / "up.pid").read_text())
    assert alive(up_pid)
    token = (state_dir / "admin-token").read_text().strip()
    with Client(server.group(1), token) as client:
        instances = client.list_instances("")
    assert sorted(i.deployment for i in instances) == ["echo", "echo", "tokens"]
    assert all(i.state == READY and i.pid > 0 for i in instances), instances
    assert len({tuple(i.gpu_uuids) for i in instances}) == 1, [list(i.gpu_uuids) for i in instances]
    for instance in instances:
        assert re.search(rf"{instance.id}\s+{instance.deployment}\s+\S+\s+0\s+Ready", out), out
    assert (state_dir / "tokens" / "echo").read_text().strip()
    assert (state_dir / "tokens" / "tokens").stat().st_mode & 0o077 == 0

    # make stop: `up`, and with it every instance, is gone.
    stopped = _run("stop_demo.sh", state_dir)
    assert f"stopped up (pid {up_pid})" in stopped.stdout
    assert not (state_dir / "up.pid").exists()
    wait_for(f"gpufleet up (pid {up_pid}) gone", lambda: not alive(up_pid), timeout=10)
    for instance in instances:
        wait_for(f"instance pid {instance.pid} gone", lambda: not alive(instance.pid), timeout=10)  # noqa: B023
