"""The Open Inference Protocol servicer: maps model names to the example models."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc
from gpufleet.inference import grpc_service_pb2 as pb
from gpufleet.inference import grpc_service_pb2_grpc as pb_grpc

from examples.model_server import models
from examples.model_server.config import ModelKind, ServerConfig
from examples.model_server.errors import ModelError, invalid

SERVER_NAME = "gpufleet-example-model-server"
SERVER_VERSION = "0.1.0"

_Self = TypeVar("_Self")
_Request = TypeVar("_Request")
_Response = TypeVar("_Response")
_Context = grpc.aio.ServicerContext
_UnaryMethod = Callable[[_Self, _Request, _Context[_Request, _Response]], Awaitable[_Response]]


def _abort_on_model_error(
    method: _UnaryMethod[_Self, _Request, _Response],
) -> _UnaryMethod[_Self, _Request, _Response]:
    """Turns a ModelError raised by a unary method into its gRPC status."""

    @functools.wraps(method)
    async def wrapper(
        self: _Self, request: _Request, context: _Context[_Request, _Response]
    ) -> _Response:
        try:
            return await method(self, request, context)
        except ModelError as error:
            await context.abort(error.code, error.message)

    return wrapper


@dataclass
class ServingState:
    """Mutable serving state shared by the servicer and the server lifecycle."""

    loaded: bool = False
    """The models finished loading; inference is refused before."""


_Emit = Callable[[pb.ModelStreamInferResponse], Awaitable[None]]


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """`inference.GRPCInferenceService` over the echo and tokens models."""

    def __init__(self, config: ServerConfig, state: ServingState) -> None:
        self._config = config
        self._state = state

    async def ServerLive(
        self,
        request: pb.ServerLiveRequest,
        context: _Context[pb.ServerLiveRequest, pb.ServerLiveResponse],
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self,
        request: pb.ServerReadyRequest,
        context: _Context[pb.ServerReadyRequest, pb.ServerReadyResponse],
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._state.loaded)

    async def ModelReady(
        self,
        request: pb.ModelReadyRequest,
        context: _Context[pb.ModelReadyRequest, pb.ModelReadyResponse],
    ) -> pb.ModelReadyResponse:
        served = bool(request.name) and self._config.resolve(request.name) is not None
        version_ok = request.version in ("", models.MODEL_VERSION)
        return pb.ModelReadyResponse(ready=served and version_ok and self._state.loaded)

    async def ServerMetadata(
        self,
        request: pb.ServerMetadataRequest,
        context: _Context[pb.ServerMetadataRequest, pb.ServerMetadataResponse],
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION)

    @_abort_on_model_error
    async def ModelMetadata(
        self,
        request: pb.ModelMetadataRequest,
        context: _Context[pb.ModelMetadataRequest, pb.ModelMetadataResponse],
    ) -> pb.ModelMetadataResponse:
        kind = self._kind(request.name)
        models.check_version(request.name, request.version)
        return models.model_metadata(request.name, kind)

    @_abort_on_model_error
    async def ModelInfer(
        self,
        request: pb.ModelInferRequest,
        context: _Context[pb.ModelInferRequest, pb.ModelInferResponse],
    ) -> pb.ModelInferResponse:
        if self._serving_kind(request) is ModelKind.ECHO:
            return models.echo(request)
        plan = models.plan_tokens(request)
        # Generation takes as long as on the stream; only the delivery differs.
        await asyncio.sleep(self._config.token_delay_seconds * (len(plan.tokens) - 1))
        return models.tokens_response(request, plan, plan.tokens)

    async def ModelStreamInfer(
        self,
        request_iterator: AsyncIterator[pb.ModelInferRequest],
        context: _Context[pb.ModelInferRequest, pb.ModelStreamInferResponse],
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        # Requests on one stream run concurrently, as on Triton: a long generation does not
        # hold back the responses to later requests. None marks the end of all of them.
        responses: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        running: set[asyncio.Task[None]] = set()

        async def read_requests() -> None:
            try:
                async for request in request_iterator:
                    task = asyncio.create_task(self._stream_one(request, responses.put))
                    running.add(task)
                    task.add_done_callback(running.discard)
                if running:
                    await asyncio.gather(*running)
            finally:
                responses.put_nowait(None)

        reader = asyncio.create_task(read_requests())
        try:
            while (response := await responses.get()) is not None:
                yield response
            await reader
        finally:
            reader.cancel()
            for task in list(running):
                task.cancel()

    async def _stream_one(self, request: pb.ModelInferRequest, emit: _Emit) -> None:
        """Answers one stream request; its errors go in error_message and the stream stays."""
        try:
            if self._serving_kind(request) is ModelKind.ECHO:
                await emit(_stream_response(models.mark_final(models.echo(request), final=True)))
                return
            plan = models.plan_tokens(request)
            last = len(plan.tokens) - 1
            for index, token in enumerate(plan.tokens):
                if index:
                    await asyncio.sleep(self._config.token_delay_seconds)
                response = models.tokens_response(request, plan, [token])
                final = index == last and not plan.empty_final
                await emit(_stream_response(models.mark_final(response, final)))
            if plan.empty_final:
                await emit(_stream_response(models.empty_final_response(request)))
        except ModelError as error:
            failed = pb.ModelInferResponse(
                model_name=request.model_name, model_version=request.model_version, id=request.id
            )
            await emit(
                pb.ModelStreamInferResponse(
                    error_message=error.message,
                    infer_response=models.mark_final(failed, final=True),
                )
            )

    def _kind(self, model_name: str) -> ModelKind:
        if not model_name:
            raise invalid("model name is empty; name the model (in gpufleet: the deployment)")
        kind = self._config.resolve(model_name)
        if kind is None:
            served = ", ".join(sorted(self._config.models))
            raise ModelError(
                grpc.StatusCode.NOT_FOUND,
                f"model {model_name!r} is not served here; this server serves: {served}",
            )
        return kind

    def _serving_kind(self, request: pb.ModelInferRequest) -> ModelKind:
        """The kind that serves `request`, once the request names a servable, loaded model."""
        kind = self._kind(request.model_name)
        models.check_version(request.model_name, request.model_version)
        if not self._state.loaded:
            raise ModelError(
                grpc.StatusCode.UNAVAILABLE,
                f"model {request.model_name!r} is still loading; "
                "retry once gRPC health reports SERVING",
            )
        return kind


def _stream_response(response: pb.ModelInferResponse) -> pb.ModelStreamInferResponse:
    return pb.ModelStreamInferResponse(infer_response=response)
