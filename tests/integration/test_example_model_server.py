"""The example model server as a real process, driven by tritonclient.

tritonclient's generated `inference.*` messages and gpufleet's cannot live in one protobuf
descriptor pool (duplicate symbols), and other tests load gpufleet's. So every tritonclient
call runs in one spawned child process: the `_client_*` functions below return plain values
and the assertions stay here. This module imports neither tritonclient nor gpufleet's
inference messages at the top, so that the child can import it.
"""

from __future__ import annotations

import json
import multiprocessing
import multiprocessing.pool
import os
import queue
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.process_output import read_stdout_line

REPO_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 20.0
CALL_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_T = TypeVar("_T")


# --- the server process -------------------------------------------------------------------


@dataclass
class ModelServer:
    """A running `python -m examples.model_server` and where to reach it."""

    process: subprocess.Popen[bytes]
    address: str
    stderr_path: Path

    def stderr(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    def stop(self, signal_first: bool = True) -> int:
        """SIGTERM to its process group, as the agent does; the exit status once all is gone.

        A shell that runs a spec's command may stay as the parent of the server (dash does),
        so the end of the group is seen as EOF on the stdout pipe that all of it shares.
        """
        if signal_first and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            _read_until_eof(self.process, STOP_TIMEOUT_S)
            return self.process.wait(timeout=STOP_TIMEOUT_S)
        except (TimeoutError, subprocess.TimeoutExpired):
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=STOP_TIMEOUT_S)
            pytest.fail(f"model server ignored SIGTERM for {STOP_TIMEOUT_S} s:\n{self.stderr()}")


def _read_until_eof(process: subprocess.Popen[bytes], timeout: float) -> None:
    """Drains stdout until every holder of the pipe has exited, at most `timeout` seconds."""
    if process.stdout is None:
        raise ValueError("the process was started without stdout=PIPE")
    if process.stdout.closed:
        return
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not selector.select(remaining):
                raise TimeoutError(f"stdout still open after {timeout} s")
            if not os.read(process.stdout.fileno(), 4096):
                process.stdout.close()
                return



def launch(
    tmp_path: Path,
    argv: list[str],
    env: dict[str, str] | None = None,
    shell: bool = False,
) -> ModelServer:
    """Starts `argv` (or a shell command) in the repository root and waits for its port."""
    stderr_path = tmp_path / f"model-server-{time.monotonic_ns()}.err"
    full_env = {**os.environ, **(env or {})}
    # A spec's `python` must be this interpreter, as the agent's PATH would make it.
    full_env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{full_env.get('PATH', '')}"
    with stderr_path.open("wb") as stderr_file:
        process = subprocess.Popen(
            argv[0] if shell else argv,
            shell=shell,
            cwd=REPO_ROOT,
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=stderr_file,
            start_new_session=True,
        )
    try:
        line = read_stdout_line(process, START_TIMEOUT_S)
    except (TimeoutError, EOFError) as error:
        process.kill()
        process.wait(timeout=STOP_TIMEOUT_S)
        stderr = stderr_path.read_text(errors="replace")
        pytest.fail(f"model server did not report its port: {error}\n{stderr}")
    prefix = "model server listening on "
    assert line.startswith(prefix), line
    return ModelServer(process=process, address=line[len(prefix) :], stderr_path=stderr_path)


def start_server(tmp_path: Path, *flags: str, env: dict[str, str] | None = None) -> ModelServer:
    """`python -m examples.model_server --port 0 FLAGS...`, listening."""
    argv = [sys.executable, "-m", "examples.model_server", "--port", "0", *flags]
    return launch(tmp_path, argv, env)


def health_statuses(address: str, until: int, timeout: float = START_TIMEOUT_S) -> list[int]:
    """Health statuses seen on a Watch of the whole server, up to the first `until`."""
    seen: list[int] = []
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for response in stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=timeout):
            seen.append(response.status)
            if response.status == until:
                return seen
    raise AssertionError(f"health stream ended before status {until}: {seen}")


def health_check(address: str, service: str) -> int:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        return int(response.status)


# --- the tritonclient child process -------------------------------------------------------


class Client:
    """Runs `_client_*` functions in the tritonclient child, bounded in time."""

    def __init__(self, pool: multiprocessing.pool.Pool) -> None:
        self._pool = pool

    def __call__(self, function: Callable[..., _T], *args: Any) -> _T:
        result: _T = self._pool.apply_async(function, args).get(timeout=CALL_TIMEOUT_S)
        return result


@pytest.fixture(scope="module")
def client() -> Iterator[Client]:
    pool = multiprocessing.get_context("spawn").Pool(processes=1)
    try:
        runner = Client(pool)
        runner(_client_import)  # pays the tritonclient import once, before any server starts
        yield runner
    finally:
        pool.terminate()
        pool.join()


def _client_import() -> None:
    import tritonclient.grpc  # noqa: F401


def _error(exception: Any) -> tuple[str, str]:
    """(gRPC status name, message) of a tritonclient InferenceServerException."""
    return str(exception.status()), str(exception.message())


def _client_metadata(url: str) -> dict[str, Any]:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    tokens = client.get_model_metadata("tokens")
    echo = client.get_model_metadata("my-deployment", model_version="1")
    try:
        client.get_model_metadata("echo", model_version="7")
        bad_version = ("", "")
    except grpcclient.InferenceServerException as exception:
        bad_version = _error(exception)
    return {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "models_ready": [client.is_model_ready(name) for name in ("echo", "tokens", "any-name")],
        "server_name": client.get_server_metadata().name,
        "tokens_inputs": [(t.name, t.datatype, list(t.shape)) for t in tokens.inputs],
        "tokens_outputs": [(t.name, t.datatype) for t in tokens.outputs],
        "echo": (echo.name, list(echo.versions), echo.platform, [t.name for t in echo.inputs]),
        "bad_version": bad_version,
    }


def _client_infer(url: str) -> dict[str, Any]:
    import numpy as np
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    floats = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    texts = np.array([b"hello", "w\u00f6rld".encode(), b"", b"\x00\xff"], dtype=np.object_)
    first = grpcclient.InferInput("INPUT0", list(floats.shape), "FP32")
    first.set_data_from_numpy(floats)
    second = grpcclient.InferInput("INPUT_TEXT", list(texts.shape), "BYTES")
    second.set_data_from_numpy(texts)
    result = client.infer("my-deployment", [first, second], request_id="req-1")
    only_text = client.infer(
        "echo", [first, second], outputs=[grpcclient.InferRequestedOutput("OUTPUT_TEXT")]
    )

    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.async_infer(
        "echo",
        [first],
        callback=lambda result, error: answers.put((result, error)),
        request_id="a-1",
    )
    async_result, async_error = answers.get(timeout=10)
    return {
        "sent": (floats, texts),
        "outputs": (result.as_numpy("OUTPUT0"), result.as_numpy("OUTPUT_TEXT")),
        "datatypes": [(o.name, o.datatype, list(o.shape)) for o in result.get_response().outputs],
        "id": result.get_response().id,
        "model_name": result.get_response().model_name,
        "only_text": [o.name for o in only_text.get_response().outputs],
        "async": (async_error, async_result.get_response().id, async_result.as_numpy("OUTPUT0")),
    }


def _client_infer_errors(url: str) -> dict[str, tuple[str, str]]:
    import numpy as np
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    wrong = grpcclient.InferInput("IMAGE", [1], "INT32")
    wrong.set_data_from_numpy(np.array([1], dtype=np.int32))
    prompt = grpcclient.InferInput("PROMPT", [1], "BYTES")
    prompt.set_data_from_numpy(np.array([b"hi"], dtype=np.object_))
    extra = grpcclient.InferInput("TEMPERATURE", [1], "INT32")
    extra.set_data_from_numpy(np.array([1], dtype=np.int32))
    errors: dict[str, tuple[str, str]] = {}
    calls: dict[str, Callable[[], Any]] = {
        "echo_unknown_input": lambda: client.infer("echo", [wrong]),
        "tokens_unknown_input": lambda: client.infer("tokens", [prompt, extra]),
        "tokens_unknown_output": lambda: client.infer(
            "tokens", [prompt], outputs=[grpcclient.InferRequestedOutput("LOGITS")]
        ),
    }
    for name, call in calls.items():
        try:
            call()
            errors[name] = ("", "")
        except grpcclient.InferenceServerException as exception:
            errors[name] = _error(exception)
    return errors


def _prompt_inputs(words: bytes, max_tokens: int | None) -> list[Any]:
    import numpy as np
    import tritonclient.grpc as grpcclient

    prompt = grpcclient.InferInput("PROMPT", [1], "BYTES")
    prompt.set_data_from_numpy(np.array([words], dtype=np.object_))
    if max_tokens is None:
        return [prompt]
    limit = grpcclient.InferInput("MAX_TOKENS", [1], "INT32")
    limit.set_data_from_numpy(np.array([max_tokens], dtype=np.int32))
    return [prompt, limit]


def _client_tokens_unary(url: str) -> list[bytes]:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    result = client.infer("tokens", _prompt_inputs(b"one two three", 5))
    return [bytes(token) for token in result.as_numpy("TOKEN")]


def _stream_event(result: Any, error: Any) -> tuple[str, list[bytes] | None, bool, str]:
    """(request id, tokens or None, triton_final_response, error message) of one response."""
    if error is not None:
        return ("", None, True, str(error.message()))
    response = result.get_response()
    tokens = result.as_numpy("TOKEN")
    final = response.parameters["triton_final_response"].bool_param
    return (response.id, None if tokens is None else [bytes(t) for t in tokens], final, "")


def _client_stream(url: str) -> list[tuple[str, list[bytes] | None, bool, str]]:
    """Three requests on one stream: tokens, a bad one, tokens with an empty final response."""
    import numpy as np
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    events: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: events.put((result, error)))
    try:
        long_inputs = _prompt_inputs(b"the quick brown fox", 6)
        client.async_stream_infer("tokens", long_inputs, request_id="long")
        bad = grpcclient.InferInput("WRONG", [1], "INT32")
        bad.set_data_from_numpy(np.array([1], dtype=np.int32))
        client.async_stream_infer("echo", [bad], request_id="bad")
        client.async_stream_infer(
            "tokens",
            _prompt_inputs(b"a b", None),
            request_id="short",
            enable_empty_final_response=True,
        )
        collected: list[tuple[str, list[bytes] | None, bool, str]] = []
        finals: set[str] = set()
        # Every request ends with one final response; the bad one's error counts as its end.
        while len(finals) < 3:
            event = _stream_event(*events.get(timeout=10))
            collected.append(event)
            if event[2]:
                finals.add(event[0] or "bad")
        return collected
    finally:
        client.stop_stream()


def _client_while_loading(url: str) -> dict[str, Any]:
    import numpy as np
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    data = grpcclient.InferInput("INPUT0", [1], "FP32")
    data.set_data_from_numpy(np.array([1.5], dtype=np.float32))
    try:
        client.infer("echo", [data])
        infer_error = ("", "")
    except grpcclient.InferenceServerException as exception:
        infer_error = _error(exception)
    return {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready("echo"),
        "infer_error": infer_error,
    }


def _client_ready(url: str) -> tuple[bool, bool]:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    return client.is_server_ready(), client.is_model_ready("echo")


def _client_mapping(url: str) -> dict[str, Any]:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    chat = client.infer("chat", _prompt_inputs(b"hi there", 3))
    try:
        client.get_model_metadata("unknown")
        unknown = ("", "")
    except grpcclient.InferenceServerException as exception:
        unknown = _error(exception)
    return {
        "chat": [bytes(token) for token in chat.as_numpy("TOKEN")],
        "chat_platform": client.get_model_metadata("chat").platform,
        "ready": [client.is_model_ready(name) for name in ("chat", "echo", "unknown")],
        "unknown": unknown,
    }


def _client_typed_contents(url: str) -> dict[str, Any]:
    """Typed `contents` (not raw) through the bare generated stub, as non-Triton clients send."""
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    with grpc.insecure_channel(url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        request = service_pb2.ModelInferRequest(model_name="echo", id="typed")
        ints = request.inputs.add(name="INPUT0", datatype="INT32", shape=[2, 2])
        ints.contents.int_contents.extend([1, -2, 3, 2147483647])
        texts = request.inputs.add(name="INPUT1", datatype="BYTES", shape=[2])
        texts.contents.bytes_contents.extend([b"x", b"yz"])
        echoed = stub.ModelInfer(request, timeout=10)

        tokens = service_pb2.ModelInferRequest(model_name="tokens", id="typed-tokens")
        prompt = tokens.inputs.add(name="PROMPT", datatype="BYTES", shape=[1])
        prompt.contents.bytes_contents.append(b"red green")
        generated = stub.ModelInfer(tokens, timeout=10)
    ints_out = echoed.outputs[0]
    return {
        "raw_counts": (len(echoed.raw_output_contents), len(generated.raw_output_contents)),
        "ints": (ints_out.name, list(ints_out.shape), list(ints_out.contents.int_contents)),
        "texts": (echoed.outputs[1].name, list(echoed.outputs[1].contents.bytes_contents)),
        "tokens": list(generated.outputs[0].contents.bytes_contents),
        "ids": (echoed.id, generated.id),
    }


def _client_stream_through_sigterm(url: str, pid: int) -> list[bytes]:
    """Starts a generation, SIGTERMs the server after the first token, collects the rest."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    events: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: events.put((result, error)))
    tokens: list[bytes] = []
    try:
        client.async_stream_infer("tokens", _prompt_inputs(b"w", 20), request_id="drain")
        while True:
            _, got, final, error = _stream_event(*events.get(timeout=10))
            if error:
                raise RuntimeError(f"stream failed after {len(tokens)} tokens: {error}")
            tokens.extend(got or [])
            if len(tokens) == 1:
                os.kill(pid, signal.SIGTERM)
            if final:
                return tokens
    finally:
        client.stop_stream()


# --- tests --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelServer]:
    running = start_server(tmp_path_factory.mktemp("model-server"), "--token-delay-ms", "5")
    health_statuses(running.address, until=SERVING)
    yield running
    running.stop()


def test_health_reflection_and_metadata(server: ModelServer, client: Client) -> None:
    assert health_check(server.address, "") == SERVING
    assert health_check(server.address, "inference.GRPCInferenceService") == SERVING
    found = client(_client_metadata, server.address)
    assert found["live"] and found["ready"]
    assert found["models_ready"] == [True, True, True]
    assert found["server_name"] == "gpufleet-example-model-server"
    assert found["tokens_inputs"] == [("PROMPT", "BYTES", [1]), ("MAX_TOKENS", "INT32", [1])]
    assert found["tokens_outputs"] == [("TOKEN", "BYTES")]
    assert found["echo"] == ("my-deployment", ["1"], "gpufleet-example-echo", ["INPUT0"])
    assert found["bad_version"][0] == "StatusCode.NOT_FOUND"
    assert "'7'" in found["bad_version"][1]


def test_reflection_lists_the_services(server: ModelServer) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (response,) = list(stub.ServerReflectionInfo(iter([request]), timeout=10))
    names = {service.name for service in response.list_services_response.service}
    assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names


def test_infer_round_trips_fp32_and_bytes(server: ModelServer, client: Client) -> None:
    import numpy as np

    found = client(_client_infer, server.address)
    floats, texts = found["sent"]
    out_floats, out_texts = found["outputs"]
    assert out_floats.dtype == np.float32
    np.testing.assert_array_equal(out_floats, floats)
    assert list(out_texts) == list(texts)
    assert found["datatypes"] == [("OUTPUT0", "FP32", [3, 4]), ("OUTPUT_TEXT", "BYTES", [4])]
    assert (found["id"], found["model_name"]) == ("req-1", "my-deployment")
    assert found["only_text"] == ["OUTPUT_TEXT"]
    async_error, async_id, async_floats = found["async"]
    assert async_error is None and async_id == "a-1"
    np.testing.assert_array_equal(async_floats, floats)


def test_typed_contents_stay_typed(server: ModelServer, client: Client) -> None:
    found = client(_client_typed_contents, server.address)
    assert found["raw_counts"] == (0, 0)
    assert found["ints"] == ("OUTPUT0", [2, 2], [1, -2, 3, 2147483647])
    assert found["texts"] == ("OUTPUT1", [b"x", b"yz"])
    assert found["tokens"] == [b"red", b"green"]
    assert found["ids"] == ("typed", "typed-tokens")


def test_bad_requests_are_invalid_argument(server: ModelServer, client: Client) -> None:
    errors = client(_client_infer_errors, server.address)
    assert {code for code, _ in errors.values()} == {"StatusCode.INVALID_ARGUMENT"}
    assert "'IMAGE'" in errors["echo_unknown_input"][1]
    assert "INPUT<suffix>" in errors["echo_unknown_input"][1]
    assert "'TEMPERATURE'" in errors["tokens_unknown_input"][1]
    assert "'LOGITS'" in errors["tokens_unknown_output"][1]


def test_tokens_unary_returns_all_tokens_at_once(server: ModelServer, client: Client) -> None:
    tokens = client(_client_tokens_unary, server.address)
    assert tokens == [b"one", b"two", b"three", b"one", b"two"]


def test_stream_sends_one_response_per_token_and_survives_errors(
    server: ModelServer, client: Client
) -> None:
    events = client(_client_stream, server.address)
    by_id: dict[str, list[tuple[list[bytes] | None, bool]]] = {}
    for request_id, tokens, final, error in events:
        if error:
            assert "'WRONG'" in error
            continue
        by_id.setdefault(request_id, []).append((tokens, final))
    expected = [b"the", b"quick", b"brown", b"fox", b"the", b"quick"]
    # Decoupled convention: one TOKEN per response, only the last one flagged final.
    assert by_id["long"] == [([token], index == 5) for index, token in enumerate(expected)]
    # With enable_empty_final_response the end comes as its own output-less response.
    assert by_id["short"] == [([b"a"], False), ([b"b"], False), (None, True)]
    assert sum(1 for event in events if event[3]) == 1


def test_loading_server_is_not_serving_until_loaded(tmp_path: Path, client: Client) -> None:
    ready_file = tmp_path / "ready.json"
    loading = start_server(
        tmp_path, "--load-seconds", "2", env={"GPUFLEET_READY_FILE": str(ready_file)}
    )
    try:
        assert health_check(loading.address, "") == NOT_SERVING
        during = client(_client_while_loading, loading.address)
        assert during["live"] is True
        assert (during["ready"], during["model_ready"]) == (False, False)
        assert during["infer_error"][0] == "StatusCode.UNAVAILABLE"
        assert "loading" in during["infer_error"][1]
        assert not ready_file.exists()

        statuses = health_statuses(loading.address, until=SERVING)
        assert statuses[-1] == SERVING and set(statuses) <= {NOT_SERVING, SERVING}
        assert client(_client_ready, loading.address) == (True, True)
        ready_seconds = json.loads(ready_file.read_text())["ready_seconds"]
        assert ready_seconds >= 2.0
        assert f"model server ready after {ready_seconds:.3f} s" in loading.stderr()
    finally:
        assert loading.stop() == 0


def test_model_flag_maps_names_and_none_rejects_others(tmp_path: Path, client: Client) -> None:
    mapped = start_server(tmp_path, "--model", "chat=tokens", "--default-model-kind", "none")
    try:
        health_statuses(mapped.address, until=SERVING)
        found = client(_client_mapping, mapped.address)
        assert found["chat"] == [b"hi", b"there", b"hi"]
        assert found["chat_platform"] == "gpufleet-example-tokens"
        assert found["ready"] == [True, True, False]
        assert found["unknown"][0] == "StatusCode.NOT_FOUND"
        assert "'unknown'" in found["unknown"][1]
    finally:
        assert mapped.stop() == 0


def test_sigterm_lets_the_open_stream_finish_then_exits(tmp_path: Path, client: Client) -> None:
    draining = start_server(tmp_path, "--token-delay-ms", "20")
    try:
        health_statuses(draining.address, until=SERVING)
        tokens = client(_client_stream_through_sigterm, draining.address, draining.process.pid)
    except BaseException:
        draining.stop()
        raise
    assert tokens == [b"w"] * 20
    # The client sent the SIGTERM; a second one would cut the shutdown short.
    assert draining.stop(signal_first=False) == 0
    assert "stopping" in draining.stderr()


def test_bad_flags_fail_with_a_clear_message() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "examples.model_server", "--model", "chat=llama"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT_S,
    )
    assert result.returncode == 2
    assert "unknown model kind 'llama'" in result.stderr


def test_port_in_use_fails_with_a_clear_message(server: ModelServer) -> None:
    port = server.address.rsplit(":", 1)[1]
    result = subprocess.run(
        [sys.executable, "-m", "examples.model_server", "--port", port],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT_S,
    )
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "pick another --port" in result.stderr
