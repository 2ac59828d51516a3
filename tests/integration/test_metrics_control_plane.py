"""The control plane's /metrics endpoint over HTTP on 127.0.0.1: a real control plane (port 0,
SQLite in tmp_path) with a scripted agent on a real Connect stream; deployment, instance,
node and per-GPU gauges, and one endpoint that also serves an embedded gateway's metrics.
Then a real agent with simulated GPUs, whose own endpoint is started by its entry point."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from gpufleet.agent.agent import Agent
from gpufleet.agent.config import AgentConfig
from gpufleet.agent.gpu.simulated import SimulatedGpus
from gpufleet.agent.main import run_until_signal
from gpufleet.gateway.app import start_gateway
from gpufleet.gateway.settings import GatewayConfig
from gpufleet.server.metrics import ReconcileMetrics, start_control_plane_metrics
from tests.integration.test_gateway_support import wait_until
from tests.integration.test_metrics_support import Scrape, scrape, scrape_until
from tests.integration.test_node_service_helpers import (
    GPU_MIB,
    ScriptedAgent,
    node_config,
    running_plane,
    share_spec,
)

pytestmark = pytest.mark.timeout(60)


def _running(got: Scrape) -> bool:
    # Instances turn ready first; the reconciler's next pass writes the phase.
    return (
        got.value("gpufleet_server_instances", deployment="echo", state="ready") == 2
        and got.value("gpufleet_server_deployments", phase="running") == 1
    )


async def test_control_plane_metrics_show_instances_and_gpu_reservations(tmp_path: Path) -> None:
    async with running_plane(node_config(tmp_path / "state")) as cp:
        agent = ScriptedAgent(cp.plane.address, cp.plane.join_token, "gpu-a")
        await agent.register()
        gateway = await start_gateway(
            GatewayConfig(
                server_address=cp.plane.address,
                admin_token=cp.plane.admin_token,
                listen="127.0.0.1:0",
                gateway_id="gw-metrics",
            )
        )
        reconcile = ReconcileMetrics()
        metrics = start_control_plane_metrics(
            cp.plane, "127.0.0.1:0", gateway=gateway, reconcile=reconcile
        )
        try:
            await agent.connect()
            await cp.create("echo", share_spec(min_instances=2, memory_mib=2048))
            await scrape_until(metrics.url, _running, timeout=20)
            # The agent's next heartbeat carries the memory its instances use.
            gpu = {"node": agent.node_id, "gpu_uuid": "GPU-0"}
            got = await scrape_until(
                metrics.url,
                lambda s: _running(s)
                and s.value("gpufleet_server_gpu_memory_used_mib", **gpu) == 512 + 2 * 2048,
            )
            reconcile.observe_pass(0.01, failed=False)
            with_pass = await scrape(metrics.url)
        finally:
            await metrics.stop()
            await agent.close()
            await gateway.stop(grace=1.0)
    assert got.value("gpufleet_server_deployments", phase="running") == 1
    assert got.value("gpufleet_server_deployment_desired_instances", deployment="echo") == 2
    assert got.value("gpufleet_server_instances", deployment="echo", state="failed") == 0
    assert got.value("gpufleet_server_nodes", state="ready") == 1
    assert got.value("gpufleet_server_nodes", state="lost") == 0
    assert got.value(
        "gpufleet_server_node_info", node=agent.node_id, name="gpu-a", agent_version="scripted"
    ) == 1
    assert got.value("gpufleet_server_gpu_memory_total_mib", **gpu) == GPU_MIB
    assert got.value("gpufleet_server_gpu_memory_reserved_mib", **gpu) == 2 * 2048
    assert got.value("gpufleet_server_gpu_core_reserved_percent", **gpu) == 2 * 25
    assert got.value("gpufleet_server_gpu_sm_utilization_percent", **gpu) == 7
    # One endpoint, three sources: the plane, its embedded gateway, reconcile passes.
    assert with_pass.value("gpufleet_gateway_route_table_synced") == 1
    assert with_pass.value("gpufleet_server_reconcile_passes_total", result="ok") == 1
    assert "process_cpu_seconds_total" in with_pass.names()


async def test_agent_entry_point_serves_simulated_gpu_readings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with running_plane(node_config(tmp_path / "state")) as cp:
        probe = SimulatedGpus((81559, 24576), node_name="sim")
        # An instance the agent did not start: counted in the card's use, as on real GPUs.
        probe.set_declared_usage(probe.uuids[1], "outsider", 1000, 30)
        agent = Agent(
            AgentConfig(
                server=cp.plane.address,
                state_dir=tmp_path / "agent",
                node_name="sim",
                join_token=cp.plane.join_token,
                workdir=str(tmp_path),
                heartbeat_interval=0.2,
            ),
            probe=probe,
        )
        task = asyncio.create_task(run_until_signal(agent, metrics_listen="127.0.0.1:0"))
        try:
            await wait_until(lambda: agent.heartbeats_sent >= 1 or task.done(), timeout=20)
            assert not task.done(), task
            line = next(
                line for line in capsys.readouterr().out.splitlines() if "metrics on" in line
            )
            url = line.rsplit(" ", 1)[1]
            assert url.startswith("http://127.0.0.1:") and url.endswith("/metrics")
            got = await scrape_until(
                url, lambda s: s.value("gpufleet_agent_connected") == 1, timeout=20
            )
        finally:
            # What stops `gpufleet agent`. run_until_signal's handler catches it while the
            # agent runs; once it has ended, there is no handler and nothing to stop.
            if not task.done():
                os.kill(os.getpid(), signal.SIGTERM)
            await asyncio.wait_for(task, 20)
    first, second = probe.uuids
    assert got.value("gpufleet_agent_gpu_memory_total_mib", gpu_uuid=first) == 81559
    assert got.value("gpufleet_agent_gpu_memory_total_mib", gpu_uuid=second) == 24576
    assert got.value("gpufleet_agent_gpu_memory_used_mib", gpu_uuid=second) == 1000
    assert got.value("gpufleet_agent_gpu_sm_utilization_percent", gpu_uuid=second) == 30
    assert got.value("gpufleet_agent_gpu_health", gpu_uuid=first, health="simulated") == 1
    assert got.value("gpufleet_agent_gpu_probe_up") == 1
    sent = got.value("gpufleet_agent_heartbeats_sent_total")
    assert sent is not None and sent >= 1
    assert got.value("gpufleet_agent_heartbeat_send_failures_total") == 0
    assert got.value("gpufleet_agent_instances", state="ready") == 0
    with pytest.raises(OSError):
        await scrape(url)  # the endpoint stopped with the agent
