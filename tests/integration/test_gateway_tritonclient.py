"""tritonclient (from PyPI, unchanged) through the gateway: server calls, infer, async
infer and a stream, against a real model server process.

tritonclient's generated `inference.*` messages and gpufleet's cannot share one descriptor
pool, so every tritonclient call runs in a spawned child process (the `_client_*` functions
return plain values) and this module imports nothing that loads gpufleet's inference
messages at import time: the child imports it to find those functions. The gateway runs in
this process's event loop.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import multiprocessing.pool
import queue
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import pytest

if TYPE_CHECKING:
    from gpufleet.gateway.app import Gateway
    from tests.integration.test_gateway_support import ModelServer

pytestmark = pytest.mark.timeout(90)

CALL_TIMEOUT_S = 30.0
INVOKE_TOKEN = "invoke-secret"  # test_gateway_support.INVOKE_TOKEN, not importable here
HEADERS = {"authorization": f"Bearer {INVOKE_TOKEN}"}
_T = TypeVar("_T")


# --- the tritonclient child process ---------------------------------------------------------


class Client:
    """Runs `_client_*` functions in the tritonclient child without blocking the loop."""

    def __init__(self, pool: multiprocessing.pool.Pool) -> None:
        self._pool = pool

    async def __call__(self, function: Callable[..., _T], *args: Any) -> _T:
        pending = self._pool.apply_async(function, args)
        result: _T = await asyncio.to_thread(pending.get, CALL_TIMEOUT_S)
        return result


@pytest.fixture(scope="module")
def pool() -> Iterator[multiprocessing.pool.Pool]:
    workers = multiprocessing.get_context("spawn").Pool(processes=1)
    try:
        workers.apply_async(_client_import).get(timeout=CALL_TIMEOUT_S)
        yield workers
    finally:
        workers.terminate()
        workers.join()


@pytest.fixture
def client(pool: multiprocessing.pool.Pool) -> Client:
    return Client(pool)


def _client_import() -> None:
    import tritonclient.grpc  # noqa: F401


def _status(exception: Any) -> str:
    return str(exception.status())


def _client_server(url: str) -> dict[str, Any]:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:
        client.is_model_ready("echo")
        no_token = ""
    except grpcclient.InferenceServerException as exception:
        no_token = _status(exception)
    return {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "name": client.get_server_metadata().name,
        "model_ready": client.is_model_ready("echo", headers=HEADERS),
        "cold_ready": client.is_model_ready("cold", headers=HEADERS),
        "unknown_ready": client.is_model_ready("nope", headers=HEADERS),
        "no_token": no_token,
    }


def _client_infer(url: str) -> dict[str, Any]:
    import numpy as np
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    floats = np.arange(6, dtype=np.float32).reshape(2, 3) / 3
    texts = np.array([b"hello", b"\x00\xff"], dtype=np.object_)
    first = grpcclient.InferInput("INPUT0", list(floats.shape), "FP32")
    first.set_data_from_numpy(floats)
    second = grpcclient.InferInput("INPUT_TEXT", list(texts.shape), "BYTES")
    second.set_data_from_numpy(texts)
    result = client.infer("echo", [first, second], request_id="r-1", headers=HEADERS)

    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.async_infer(
        "echo",
        [first],
        callback=lambda result, error: answers.put((result, error)),
        request_id="a-1",
        headers=HEADERS,
    )
    async_result, async_error = answers.get(timeout=10)
    metadata = client.get_model_metadata("tokens", headers=HEADERS)
    return {
        "sent": (floats, texts),
        "outputs": (result.as_numpy("OUTPUT0"), result.as_numpy("OUTPUT_TEXT")),
        "id": result.get_response().id,
        "async": (async_error, async_result.get_response().id, async_result.as_numpy("OUTPUT0")),
        "tokens_inputs": [t.name for t in metadata.inputs],
    }


def _client_stream(url: str) -> list[tuple[str, list[bytes], bool]]:
    import numpy as np
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    events: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: events.put((result, error)), headers=HEADERS)
    try:
        prompt = grpcclient.InferInput("PROMPT", [1], "BYTES")
        prompt.set_data_from_numpy(np.array([b"red green blue"], dtype=np.object_))
        limit = grpcclient.InferInput("MAX_TOKENS", [1], "INT32")
        limit.set_data_from_numpy(np.array([5], dtype=np.int32))
        client.async_stream_infer("tokens", [prompt, limit], request_id="gen-1")
        collected: list[tuple[str, list[bytes], bool]] = []
        while True:
            result, error = events.get(timeout=10)
            if error is not None:
                raise RuntimeError(f"stream error: {error}")
            response = result.get_response()
            final = response.parameters["triton_final_response"].bool_param
            tokens = [bytes(t) for t in result.as_numpy("TOKEN")]
            collected.append((response.id, tokens, final))
            if final:
                return collected
    finally:
        client.stop_stream()


def _client_errors(url: str) -> dict[str, str]:
    import numpy as np
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    data = grpcclient.InferInput("INPUT0", [1], "FP32")
    data.set_data_from_numpy(np.array([1.0], dtype=np.float32))
    found: dict[str, str] = {}
    calls: dict[str, Callable[[], Any]] = {
        "no_token": lambda: client.infer("echo", [data]),
        "wrong_token": lambda: client.infer(
            "echo", [data], headers={"authorization": "Bearer wrong"}
        ),
        "unknown_model": lambda: client.infer("nope", [data], headers=HEADERS),
    }
    for name, call in calls.items():
        try:
            call()
            found[name] = ""
        except grpcclient.InferenceServerException as exception:
            found[name] = _status(exception)
    return found


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelServer]:
    from tests.integration.test_gateway_support import start_model_server

    server = start_model_server(tmp_path_factory.mktemp("triton"), "--token-delay-ms", "5")
    yield server
    server.stop()


@pytest.fixture
async def gateway(model_server: ModelServer) -> AsyncIterator[Gateway]:
    from tests.integration.test_gateway_support import (
        INVOKE_TOKEN as SUPPORT_TOKEN,
        control_plane,
        route,
        running_gateway,
    )

    assert SUPPORT_TOKEN == INVOKE_TOKEN
    routes = (
        route("echo", [("echo-1", model_server.address)], max_request_concurrency=4),
        route("tokens", [("tokens-1", model_server.address)], max_request_concurrency=2),
        route("cold"),  # scaled to zero: no endpoint
    )
    async with control_plane(*routes) as plane:
        async with running_gateway(plane) as running:
            yield running


# --- tests ----------------------------------------------------------------------------------


async def test_tritonclient_server_calls_are_open_and_model_ready_needs_a_token(
    gateway: Gateway, client: Client
) -> None:
    found = await client(_client_server, gateway.address)
    assert found["live"] and found["ready"]
    assert found["name"] == "gpufleet-gateway"
    assert found["model_ready"] is True
    assert found["cold_ready"] is False  # no ready endpoint
    assert found["unknown_ready"] is False
    assert found["no_token"] == "StatusCode.UNAUTHENTICATED"


async def test_tritonclient_infer_and_async_infer(gateway: Gateway, client: Client) -> None:
    import numpy as np

    found = await client(_client_infer, gateway.address)
    floats, texts = found["sent"]
    out_floats, out_texts = found["outputs"]
    np.testing.assert_array_equal(out_floats, floats)
    assert list(out_texts) == list(texts)
    assert found["id"] == "r-1"
    async_error, async_id, async_floats = found["async"]
    assert async_error is None and async_id == "a-1"
    np.testing.assert_array_equal(async_floats, floats)
    assert found["tokens_inputs"] == ["PROMPT", "MAX_TOKENS"]


async def test_tritonclient_stream(gateway: Gateway, client: Client) -> None:
    events = await client(_client_stream, gateway.address)
    assert [tokens for _, tokens, _ in events] == [
        [b"red"], [b"green"], [b"blue"], [b"red"], [b"green"]
    ]
    assert [final for _, _, final in events] == [False, False, False, False, True]
    assert {request_id for request_id, _, _ in events} == {"gen-1"}


async def test_tritonclient_sees_gateway_errors(gateway: Gateway, client: Client) -> None:
    found = await client(_client_errors, gateway.address)
    assert found == {
        "no_token": "StatusCode.UNAUTHENTICATED",
        "wrong_token": "StatusCode.PERMISSION_DENIED",
        "unknown_model": "StatusCode.NOT_FOUND",
    }
