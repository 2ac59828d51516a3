"""Issue 5, faults 2, 3 and 5, on one stack of real processes: `gpufleet server`, one
`gpufleet agent` (simulated GPU), a standalone `gpufleet gateway`, and example model
servers as instances.

- The agent is killed (-9) and started again while calls flow through the gateway: the
  instances keep their pids and not one call fails.
- The control plane is down for 10 s while calls flow: the gateway serves every call from
  its last routing table, the agent keeps the instances running, and the restarted control
  plane neither restarts nor reschedules any of them.
- An instance is killed in the middle of a stream: the stream ends with UNAVAILABLE within
  its deadline (no hang), the agent restarts the instance, and new calls succeed.

The tests share the stack (setting it up is most of the cost) and run in this order; each
starts by waiting for the steady state it needs.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest

from gpufleet.inference import grpc_service_pb2 as oip
from gpufleet.inference import grpc_service_pb2_grpc as oip_grpc
from gpufleet.v1 import node_pb2
from tests.e2e.conftest import ControlPlaneProc, Proc, Processes, alive, node_id_of, start_agent, wait_for
from tests.reliability.conftest import (
    MODEL_SERVER,
    READY,
    ROUTE_TARGET_KEY,
    SERVING,
    CallLoop,
    GatewayProc,
    bearer,
    create,
    deployment,
    health_status,
    metadata_value,
    model_ready,
    pids_by_id,
    ready_instances,
    start_gateway,
    start_plane,
    tokens_request,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

OUTAGE_S = 10.0
CALLS_AROUND_FAULT = 20
TOKEN_DELAY_MS = 20
STREAM_TOKENS = 2000  # 40 s of generation: the stream cannot end on its own in the test
STREAM_DEADLINE_S = 30.0
CALLS_AFTER_RESTART = 10
ADOPTED = re.compile(r"adopted 3 instance\(s\) recorded by a previous agent")


@dataclass
class Stack:
    processes: Processes
    plane: ControlPlaneProc
    agent: Proc
    node_id: str
    gateway: GatewayProc
    echo_token: str
    tokens_token: str

    def steady(self) -> dict[str, int]:
        """Wait for 2 echo + 1 tokens instances READY on the node and routed by the
        gateway; returns their pids by instance id."""
        echo = ready_instances(self.plane, "echo", 2)
        tokens = ready_instances(self.plane, "tokens", 1)
        wait_for("echo routed by the gateway", lambda: model_ready(self.gateway.address, "echo", self.echo_token))
        wait_for(
            "tokens routed by the gateway",
            lambda: model_ready(self.gateway.address, "tokens", self.tokens_token),
        )
        return pids_by_id([*echo, *tokens])


@pytest.fixture(scope="module")
def stack(module_processes: Processes) -> Stack:
    processes = module_processes
    plane = start_plane(processes, processes.tmp_path / "server", "--heartbeat-interval", "1")
    agent, _ = start_agent(processes, plane, "a")
    node_id = node_id_of(plane, "a")
    gateway = start_gateway(processes, plane)
    echo_token = create(plane, deployment("echo", min_instances=2, max_instances=2))
    tokens_token = create(
        plane,
        deployment(
            "tokens",
            command=f"{MODEL_SERVER} --token-delay-ms {TOKEN_DELAY_MS}",
            max_request_concurrency=2,
        ),
    )
    return Stack(processes, plane, agent, node_id, gateway, echo_token, tokens_token)


def test_agent_kill_9_and_restart_keeps_pids_and_fails_no_call(stack: Stack) -> None:
    before = stack.steady()
    with CallLoop(stack.gateway.address, "echo", stack.echo_token) as loop:
        loop.wait_ok(CALLS_AROUND_FAULT)
        stack.agent.kill_group()  # the agent alone: instances live in sessions of their own
        assert all(alive(pid) for pid in before.values())
        loop.wait_ok(CALLS_AROUND_FAULT)  # served while no agent runs

        stack.agent, _ = start_agent(stack.processes, stack.plane, "a", join=False)
        stack.agent.wait_for_output(ADOPTED)
        after = stack.plane.wait_instances(
            "the same instances READY again",
            lambda found: pids_by_id(found) == before
            and all(i.state == READY and i.restart_count == 0 for i in found),
            deployment="",
        )
        loop.wait_ok(CALLS_AROUND_FAULT)
    tally = loop.stop()

    assert tally.failures == [], f"{len(tally.failures)} of {tally.sent} calls failed: {tally.failures[:5]}"
    assert set(tally.targets) == {i.id for i in after if i.deployment == "echo"}
    assert [n.id for n in stack.plane.nodes()] == [stack.node_id]
    print(f"agent kill -9 + restart: {tally.sent} calls, 0 failed, pids kept: {sorted(before.values())}")


def test_control_plane_down_10s_gateway_serves_and_nothing_moves(stack: Stack) -> None:
    before = stack.steady()
    with CallLoop(stack.gateway.address, "echo", stack.echo_token) as loop:
        loop.wait_ok(CALLS_AROUND_FAULT)
        stack.plane.proc.stop(signal.SIGKILL)
        down_since = time.monotonic()
        ok_at_kill = loop.tally().ok
        # Each second of the outage: instances run, the gateway is healthy and serving.
        while time.monotonic() - down_since < OUTAGE_S:
            assert all(alive(pid) for pid in before.values()), "an instance died with the control plane"
            assert stack.gateway.alive() and health_status(stack.gateway.address) == SERVING
            time.sleep(1.0)  # the outage is the point: nothing to wait for
        served_during_outage = loop.tally().ok - ok_at_kill

        # Same port, so the agent and the gateway find it again; same state dir.
        stack.plane = start_plane(
            stack.processes,
            stack.plane.state_dir,
            "--heartbeat-interval",
            "1",
            listen=stack.plane.address,
            name="server-again",
        )

        def node_back() -> bool:
            nodes = stack.plane.nodes()
            return len(nodes) == 1 and nodes[0].state == node_pb2.NODE_STATE_READY

        wait_for("the agent back on the restarted control plane", node_back)
        after = stack.plane.wait_instances(
            "the same instances READY",
            lambda found: pids_by_id(found) == before and all(i.state == READY for i in found),
            deployment="",
        )
        loop.wait_ok(CALLS_AROUND_FAULT)  # served after the gateway's watch resumed
    tally = loop.stop()

    assert tally.failures == [], f"{len(tally.failures)} of {tally.sent} calls failed: {tally.failures[:5]}"
    assert served_during_outage >= CALLS_AROUND_FAULT, served_during_outage
    assert all(i.restart_count == 0 and i.node_id == stack.node_id for i in after)
    assert all(alive(pid) for pid in before.values())
    print(
        f"control plane down {OUTAGE_S:g} s: {tally.sent} calls, {served_during_outage} during "
        "the outage, 0 failed; same instance ids and pids after the restart"
    )


def _one_request_then_hold(first: oip.ModelInferRequest, release: queue.Queue[None]) -> Iterator[oip.ModelInferRequest]:
    """A request stream that sends one request and stays open until released."""
    yield first
    release.get()


def test_instance_killed_mid_stream_ends_it_unavailable_and_restarts(stack: Stack) -> None:
    pids = stack.steady()
    [victim] = ready_instances(stack.plane, "tokens", 1)
    assert pids[victim.id] == victim.pid
    release: queue.Queue[None] = queue.Queue()
    with grpc.insecure_channel(stack.gateway.address) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        stream = stub.ModelStreamInfer(
            _one_request_then_hold(tokens_request("tokens", STREAM_TOKENS, "long"), release),
            metadata=bearer(stack.tokens_token),
            timeout=STREAM_DEADLINE_S,
        )
        try:
            received = []
            for response in stream:
                received.append(response)
                if len(received) == 3:
                    break
            assert all(r.infer_response.id == "long" and not r.error_message for r in received)
            assert metadata_value(stream.initial_metadata(), ROUTE_TARGET_KEY) == victim.id

            os.killpg(victim.pid, signal.SIGKILL)
            killed_at = time.monotonic()
            with pytest.raises(grpc.RpcError) as ended:
                for _ in stream:
                    pass
            ended_after_s = time.monotonic() - killed_at
        finally:
            release.put(None)
    # UNAVAILABLE, not the deadline: the end of the instance reached the client.
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE, ended.value

    restarted = stack.plane.wait_instances(
        "the killed instance READY again",
        lambda found: len(found) == 1
        and found[0].id == victim.id
        and found[0].pid not in (0, victim.pid)
        and found[0].restart_count >= 1
        and found[0].state == READY,
        deployment="tokens",
    )
    wait_for("tokens routed again", lambda: model_ready(stack.gateway.address, "tokens", stack.tokens_token))
    with grpc.insecure_channel(stack.gateway.address) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        for n in range(CALLS_AFTER_RESTART):
            answer = stub.ModelInfer(
                tokens_request("tokens", 2, f"after-{n}"), metadata=bearer(stack.tokens_token), timeout=10
            )
            assert answer.id == f"after-{n}"
    print(
        f"instance killed mid-stream: UNAVAILABLE after {ended_after_s:.2f} s, restarted as pid "
        f"{restarted[0].pid}, {CALLS_AFTER_RESTART}/{CALLS_AFTER_RESTART} calls after it ok"
    )

