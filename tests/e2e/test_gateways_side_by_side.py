"""Several gateways side by side (issue 4 item 1), with real processes: `gpufleet up` with
its embedded gateway, plus a standalone `gpufleet gateway` against the same control plane.
Both serve the same deployment from their own watched route table, both learn of a new
instance, and one stopping leaves the other serving with no instance restarted.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.e2e.conftest import LISTENING, REPO, ControlPlaneProc, Processes, ready, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

GATEWAY_LISTENING = re.compile(r"gpufleet gateway listening on (\S+)")
CALL_TIMEOUT_S = 30.0

SPEC = """\
name: echo
spec:
  command: python -m examples.model_server --port $PORT
  port: 0
  gpu: {memory_mib: 1024, core_percent: 10}
  scaling: {min_instances: 1, max_instances: 2}
  traffic: {max_request_concurrency: 4}
  readiness_probe: {grpc: {}, period: 0.2s}
"""


def _infer(gateway: str, token: str, rule: str = "") -> str:
    """One echo ModelInfer through `gateway`; the instance that served it."""
    import grpc

    from gpufleet.inference import grpc_service_pb2 as pb
    from gpufleet.inference import grpc_service_pb2_grpc

    request = pb.ModelInferRequest(model_name="echo")
    request.inputs.add(
        name="INPUT0", datatype="INT32", shape=[1], contents=pb.InferTensorContents(int_contents=[7])
    )
    metadata: tuple[tuple[str, str | bytes], ...] = (("authorization", f"Bearer {token}"),)
    if rule:
        metadata += (("deploy-route-rule", rule),)
    with grpc.insecure_channel(gateway) as channel:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        response, call = stub.ModelInfer.with_call(request, metadata=metadata, timeout=CALL_TIMEOUT_S)
    assert list(response.outputs[0].contents.int_contents) == [7]
    return str(dict(call.initial_metadata() or ()).get("deploy-route-target", ""))


def test_two_gateways_serve_the_same_deployment_and_follow_its_instances(
    processes: Processes, tmp_path: Path
) -> None:
    state_dir = tmp_path / "up"
    up = processes.start(
        "up", "up", "--state-dir", str(state_dir), "--listen", "127.0.0.1:0",
        "--simulate-gpus", "1x81559", "--name", "box", "--workdir", str(REPO),
    )  # fmt: skip
    processes.agent_state_dirs.append(state_dir / "agent")
    plane = ControlPlaneProc(up, up.wait_for_output(LISTENING).group(1), state_dir)
    embedded = up.wait_for_output(GATEWAY_LISTENING).group(1)
    standalone_proc = processes.start(
        "gateway", "gateway", "--server", plane.address,
        "--token-file", str(state_dir / "admin-token"), "--listen", "127.0.0.1:0",
    )  # fmt: skip
    standalone = standalone_proc.wait_for_output(GATEWAY_LISTENING).group(1)
    assert len({plane.address, embedded, standalone}) == 3

    spec_path = tmp_path / "echo.yaml"
    spec_path.write_text(SPEC)
    [applied] = plane.cli_json("apply", "-f", str(spec_path))
    token = applied["invoke_token"]
    [first] = plane.wait_instances("one ready instance", lambda found: ready(found, 1), "echo")

    # Both gateways route to the one instance (each waits for its own table to have it).
    for gateway in (embedded, standalone):

        def served(through: str = gateway) -> str | None:
            return _infer(through, token) or None

        assert wait_for(f"a call through {gateway}", served) == first.id

    # A second instance reaches both tables: each gateway can be pinned to it.
    plane.cli("scale", "echo", "--min", "2")
    instances = plane.wait_instances("two ready instances", lambda found: ready(found, 2), "echo")
    [second] = [i for i in instances if i.id != first.id]
    for gateway in (embedded, standalone):
        assert _infer(gateway, token, rule=second.id) == second.id
        assert _infer(gateway, token, rule=first.id) == first.id

    # The standalone gateway stops; the embedded one keeps serving, and nothing restarts.
    assert standalone_proc.stop() == 0
    assert _infer(embedded, token) in {first.id, second.id}
    assert {(i.id, i.pid) for i in plane.instances("echo")} == {(i.id, i.pid) for i in instances}
