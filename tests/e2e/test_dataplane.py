"""Issue 4 "Done when", with real processes: `gpufleet up` (control plane, embedded gateway,
agent with a simulated GPU), the example model server as the instance, tritonclient and the
CLI.

One deployment life, in order:

(a) at min_instances 0 nothing runs; the first tritonclient call waits while an instance
    starts and then succeeds;
(c) 3 concurrent streams against max_request_concurrency 2 on max_instances 1: two run at
    once, the third waits for one of them to end (read from the times the streams record);
(d) route rule scale-out beyond max_instances: RESOURCE_EXHAUSTED, REPLICA_QUOTA_EXCEEDED;
(e) an unknown instance id as route rule: NOT_FOUND, ROUTE_TARGET_NOT_FOUND;
(b) idle for idle_retention, the instance is drained and released;
(f) `gpufleet get` shows Standby -> Running (1/1) -> Standby over that life.

tritonclient's generated `inference.*` messages and gpufleet's cannot share one descriptor
pool, so tritonclient runs in a spawned child (the `_client_*` functions return plain
values) and this module loads gpufleet's inference stubs only inside the test.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.pool
import queue
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import (
    LISTENING,
    REPO,
    ControlPlaneProc,
    Processes,
    alive,
    ready,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

GATEWAY_LISTENING = re.compile(r"gpufleet gateway listening on (\S+)")
CALL_TIMEOUT_S = 60.0
IDLE_RETENTION_S = 3
STREAM_TOKENS = 25
"""Tokens per stream at 20 ms each: long enough that streams started together overlap."""

SPEC = f"""\
name: tokens
spec:
  command: python -m examples.model_server --port $PORT --token-delay-ms 20
  port: 0
  gpu: {{memory_mib: 4096, core_percent: 25}}
  scaling: {{min_instances: 0, max_instances: 1, idle_retention: {IDLE_RETENTION_S}s}}
  traffic: {{max_request_concurrency: 2}}
  readiness_probe: {{grpc: {{}}, period: 0.2s}}
"""


# --- the tritonclient child process ---------------------------------------------------------


def _client_import() -> None:
    import tritonclient.grpc  # noqa: F401


def _token_inputs(words: bytes, count: int) -> list[Any]:
    import numpy as np
    import tritonclient.grpc as grpcclient

    prompt = grpcclient.InferInput("PROMPT", [1], "BYTES")
    prompt.set_data_from_numpy(np.array([words], dtype=np.object_))
    limit = grpcclient.InferInput("MAX_TOKENS", [1], "INT32")
    limit.set_data_from_numpy(np.array([count], dtype=np.int32))
    return [prompt, limit]


def _client_infer(url: str, token: str) -> list[bytes] | str:
    """The tokens, or the error as text (tritonclient's exceptions do not unpickle)."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:
        result = client.infer(
            "tokens",
            _token_inputs(b"cold start works", 3),
            headers={"authorization": f"Bearer {token}"},
            client_timeout=CALL_TIMEOUT_S,
        )
        return [bytes(t) for t in result.as_numpy("TOKEN")]
    except grpcclient.InferenceServerException as err:
        return f"{err.status()}: {err.message()}"
    finally:
        client.close()


def _client_streams(url: str, token: str, count: int) -> list[dict[str, Any]]:
    """`count` streams started together; per stream the monotonic times at which its request
    was sent, its first token arrived and its final response arrived (or its error)."""
    import threading

    import tritonclient.grpc as grpcclient

    barrier = threading.Barrier(count)
    found: list[dict[str, Any]] = [{} for _ in range(count)]

    def run(index: int) -> None:
        client = grpcclient.InferenceServerClient(url)
        events: queue.Queue[tuple[Any, Any, float]] = queue.Queue()
        try:
            client.start_stream(
                callback=lambda result, error: events.put((result, error, time.monotonic())),
                headers={"authorization": f"Bearer {token}"},
            )
            inputs = _token_inputs(b"one two three", STREAM_TOKENS)
            barrier.wait(timeout=CALL_TIMEOUT_S)
            found[index]["sent"] = time.monotonic()
            client.async_stream_infer("tokens", inputs, request_id=f"stream-{index}")
            tokens = 0
            while True:
                result, error, at = events.get(timeout=CALL_TIMEOUT_S)
                if error is not None:
                    found[index]["error"] = str(error)
                    return
                tokens += len(result.as_numpy("TOKEN"))
                found[index].setdefault("first", at)
                if result.get_response().parameters["triton_final_response"].bool_param:
                    found[index].update(final=at, tokens=tokens)
                    return
        except Exception as err:  # noqa: BLE001 - reported to the test as data
            found[index]["error"] = repr(err)
        finally:
            client.stop_stream()
            client.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(CALL_TIMEOUT_S * 2)
    return found


@pytest.fixture(scope="module")
def triton() -> Iterator[multiprocessing.pool.Pool]:
    workers = multiprocessing.get_context("spawn").Pool(processes=1)
    try:
        # Imported now so that the first call measures the gateway, not the import.
        workers.apply_async(_client_import)
        yield workers
    finally:
        workers.terminate()
        workers.join()


# --- helpers --------------------------------------------------------------------------------


def _get_row(plane: ControlPlaneProc) -> tuple[str, str]:
    """(PHASE, READY) of `gpufleet get tokens`."""
    lines = plane.cli("get", "tokens").stdout.splitlines()
    header, row = lines[0].split(), lines[1].split()
    return row[header.index("PHASE")], row[header.index("READY")]


def _error_reason(err: Any) -> str:
    from google.rpc import error_details_pb2, status_pb2

    for key, value in err.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            for detail in status_pb2.Status.FromString(value).details:
                if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    detail.Unpack(info)
                    return str(info.reason)
    raise AssertionError(f"no ErrorInfo in the status details of {err!r}")


def _infer_with_rule(gateway: str, token: str, rule: str) -> tuple[Any, str]:
    """A ModelInfer with `deploy-route-rule: rule` through our own stubs (they expose the
    status details that tritonclient drops): (the RpcError or None, deploy-route-target)."""
    import grpc

    from gpufleet.inference import grpc_service_pb2 as pb, grpc_service_pb2_grpc

    request = pb.ModelInferRequest(model_name="tokens")
    request.inputs.add(
        name="PROMPT", datatype="BYTES", shape=[1], contents=pb.InferTensorContents(bytes_contents=[b"hi"])
    )
    metadata = (("authorization", f"Bearer {token}"), ("deploy-route-rule", rule))
    with grpc.insecure_channel(gateway) as channel:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        try:
            _, call = stub.ModelInfer.with_call(request, metadata=metadata, timeout=CALL_TIMEOUT_S)
        except grpc.RpcError as err:
            return err, ""
    target = dict(call.initial_metadata() or ()).get("deploy-route-target", "")
    return None, str(target)


# --- the test -------------------------------------------------------------------------------


def test_scale_from_zero_concurrency_route_errors_and_idle_release(
    processes: Processes, tmp_path: Path, triton: multiprocessing.pool.Pool
) -> None:
    import grpc

    state_dir = tmp_path / "up"
    up = processes.start(
        "up", "up", "--state-dir", str(state_dir), "--listen", "127.0.0.1:0",
        "--simulate-gpus", "1x81559", "--name", "box", "--workdir", str(REPO),
    )  # fmt: skip
    processes.agent_state_dirs.append(state_dir / "agent")
    plane = ControlPlaneProc(up, up.wait_for_output(LISTENING).group(1), state_dir)
    gateway = up.wait_for_output(GATEWAY_LISTENING).group(1)
    assert gateway != plane.address

    spec_path = tmp_path / "tokens.yaml"
    spec_path.write_text(SPEC)
    [applied] = plane.cli_json("apply", "-f", str(spec_path))
    token = applied["invoke_token"]

    # (a) + (f) Standby: nothing runs before the first call.
    wait_for("gpufleet get: Standby 0/0", lambda: _get_row(plane) == ("Standby", "0/0"))
    assert plane.instances("tokens") == []

    tokens = triton.apply_async(_client_infer, (gateway, token)).get(CALL_TIMEOUT_S * 2)
    assert tokens == [b"cold", b"start", b"works"], f"{tokens}\n--- gpufleet up ---\n{up.output()}"
    plane.wait_instances("the started instance", lambda found: ready(found, 1), "tokens")

    # (f) Running (1/1) while it serves.
    wait_for("gpufleet get: Running 1/1", lambda: _get_row(plane) == ("Running", "1/1"))

    # (c) Three streams at once on two slots of the only instance.
    streams = triton.apply_async(_client_streams, (gateway, token, 3)).get(CALL_TIMEOUT_S * 3)
    assert all("error" not in s for s in streams), streams
    assert [s["tokens"] for s in streams] == [STREAM_TOKENS] * 3
    first, second, third = sorted(streams, key=lambda s: s["first"])
    assert max(s["sent"] for s in streams) < min(first["final"], second["final"]), (
        f"the three streams were not started together: {streams}"
    )
    assert max(first["first"], second["first"]) < min(first["final"], second["final"]), (
        f"the first two streams did not run at once: {streams}"
    )
    assert third["first"] > min(first["final"], second["final"]), (
        f"the third stream got a token before either of the first two ended: {streams}"
    )

    # (d) scale-out beyond max_instances 1 while the instance is still there (the streams
    # just ended, far less than idle_retention ago).
    [instance] = plane.instances("tokens")
    refused, _ = _infer_with_rule(gateway, token, "scale-out")
    assert refused is not None, "scale-out beyond max_instances succeeded"
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert _error_reason(refused) == "REPLICA_QUOTA_EXCEEDED"

    # (e) An unknown instance id; the real one is served, and named in the response.
    unknown, _ = _infer_with_rule(gateway, token, "tokens-00000000")
    assert unknown is not None and unknown.code() == grpc.StatusCode.NOT_FOUND
    assert _error_reason(unknown) == "ROUTE_TARGET_NOT_FOUND"
    served, target = _infer_with_rule(gateway, token, instance.id)
    assert served is None and target == instance.id
    assert [i.id for i in plane.instances("tokens")] == [instance.id], "a second instance started"

    # (b) Idle for idle_retention: drained, released, its process gone.
    plane.wait_instances("the idle instance released", lambda found: found == [], "tokens", timeout=30)
    wait_for(f"instance pid {instance.pid} gone", lambda: not alive(instance.pid), timeout=15)

    # (f) ... and back to Standby.
    wait_for("gpufleet get: Standby 0/0 again", lambda: _get_row(plane) == ("Standby", "0/0"))
