"""scripts/gpu_node_check.sh, the operator's end-to-end check of a GPU node, in its dry-run
mode (--simulate): the same `gpufleet up`, deployment, gateway call, reports and stop as on
a real GPU, with simulated cards instead of NVML. (On an H100 the real mode passed too; see
docs/agent.md.)"""

from __future__ import annotations

import subprocess

import pytest

from tests.e2e.conftest import REPO, base_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def test_gpu_node_check_dry_run_deploys_calls_reports_and_stops() -> None:
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_node_check.sh"), "--simulate", "1x81559"],
        cwd=REPO,
        env=base_env(GPUFLEET_CHECK_WAIT="90"),
        capture_output=True,
        text=True,
        timeout=150,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "deploy-route-target: gpu-check-" in output  # the call went through the gateway
    assert "OUTPUT0 INT64 [2,2]: [[1, 2], [3, 4]]" in output
    assert "gpu-check-" in output and "Ready" in output
    assert result.stdout.rstrip().endswith("gpu node check passed")
