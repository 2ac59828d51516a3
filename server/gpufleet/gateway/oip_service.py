"""`inference.GRPCInferenceService` (Open Inference Protocol) on the gateway port.

The model name is the deployment (or service) name. ServerLive, ServerReady and
ServerMetadata are the gateway's own answers and need no token; ModelReady is answered
from the route table (the deployment has a ready endpoint) and needs the invoke token;
ModelMetadata, ModelInfer and ModelStreamInfer go to an instance chosen by admission and
routing, as raw bytes: only the model name is read from the request (wire.py).

A ModelStreamInfer stream is admitted once, on its first request, and holds its slot on
one instance for its whole life. A later request on it that names another model is not
forwarded: it gets an error response in the stream (Triton's way) and the stream stays.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import AsyncIterator
from typing import Any

import grpc

from gpufleet.gateway.dispatch import Dispatcher
from gpufleet.gateway.forward import StreamWriter, forward_stream, forward_unary
from gpufleet.gateway.handlers import guarded
from gpufleet.gateway.invoke_auth import check_invoke_token
from gpufleet.gateway.metadata import request_metadata_to_forward
from gpufleet.gateway.route_table import RouteTable
from gpufleet.gateway.rpc_errors import INVALID_REQUEST, CallError
from gpufleet.gateway.wire import WireFormatError, read_string_field
from gpufleet.inference import grpc_service_pb2 as pb

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
SERVER_NAME = "gpufleet-gateway"
FINAL_RESPONSE_PARAMETER = "triton_final_response"

_MODEL_NAME_FIELD = 1  # ModelInferRequest.model_name, ModelMetadataRequest.name
_REQUEST_ID_FIELD = 3  # ModelInferRequest.id
# Full method paths on the instance, built once.
_MODEL_METADATA_METHOD = f"/{SERVICE_NAME}/ModelMetadata"
_MODEL_INFER_METHOD = f"/{SERVICE_NAME}/ModelInfer"
_STREAM_INFER_METHOD = f"/{SERVICE_NAME}/ModelStreamInfer"
_Context = grpc.aio.ServicerContext[Any, Any]


def _server_version() -> str:
    try:
        return importlib.metadata.version("gpufleet")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def model_name_of(request: bytes, field_name: str) -> str:
    """The model name in a serialized request; CallError INVALID_ARGUMENT if unusable."""
    try:
        name = read_string_field(request, _MODEL_NAME_FIELD)
    except WireFormatError as err:
        raise CallError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"the request is not a valid protobuf message ({err}); send a request of the "
            "Open Inference Protocol",
            reason=INVALID_REQUEST,
            bad_field=field_name,
        ) from None
    if not name:
        raise CallError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{field_name} is empty; set it to the deployment name",
            reason=INVALID_REQUEST,
            bad_field=field_name,
        )
    return name


def stream_error_response(message: str, request: bytes, model_name: str) -> bytes:
    """An in-stream error for one request, flagged final so the client stops waiting."""
    try:
        request_id = read_string_field(request, _REQUEST_ID_FIELD) or ""
    except WireFormatError:
        request_id = ""
    response = pb.ModelStreamInferResponse(
        error_message=message,
        infer_response=pb.ModelInferResponse(model_name=model_name, id=request_id),
    )
    response.infer_response.parameters[FINAL_RESPONSE_PARAMETER].bool_param = True
    return response.SerializeToString()


class InferenceService:
    """The gateway's GRPCInferenceService handlers."""

    def __init__(self, table: RouteTable, dispatcher: Dispatcher) -> None:
        self._table = table
        self._dispatcher = dispatcher
        self._metadata = pb.ServerMetadataResponse(name=SERVER_NAME, version=_server_version())

    def generic_handler(self) -> grpc.GenericRpcHandler[Any, Any]:
        """Handlers for every method of the service."""
        typed = grpc.unary_unary_rpc_method_handler
        handlers = {
            "ServerLive": typed(
                guarded(self.server_live),
                pb.ServerLiveRequest.FromString,
                pb.ServerLiveResponse.SerializeToString,
            ),
            "ServerReady": typed(
                guarded(self.server_ready),
                pb.ServerReadyRequest.FromString,
                pb.ServerReadyResponse.SerializeToString,
            ),
            "ServerMetadata": typed(
                guarded(self.server_metadata),
                pb.ServerMetadataRequest.FromString,
                pb.ServerMetadataResponse.SerializeToString,
            ),
            "ModelReady": typed(
                guarded(self.model_ready),
                pb.ModelReadyRequest.FromString,
                pb.ModelReadyResponse.SerializeToString,
            ),
            # Raw bytes both ways: no (de)serializer.
            "ModelMetadata": grpc.unary_unary_rpc_method_handler(guarded(self.model_metadata)),
            "ModelInfer": grpc.unary_unary_rpc_method_handler(guarded(self.model_infer)),
            "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(
                guarded(self.model_stream_infer)
            ),
        }
        return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)

    async def server_live(
        self, request: pb.ServerLiveRequest, context: _Context
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def server_ready(
        self, request: pb.ServerReadyRequest, context: _Context
    ) -> pb.ServerReadyResponse:
        # Ready once the gateway knows the routes; it stays ready while the control plane
        # is away, because it keeps serving from the last table.
        return pb.ServerReadyResponse(ready=self._table.synced)

    async def server_metadata(
        self, request: pb.ServerMetadataRequest, context: _Context
    ) -> pb.ServerMetadataResponse:
        return self._metadata

    async def model_ready(
        self, request: pb.ModelReadyRequest, context: _Context
    ) -> pb.ModelReadyResponse:
        if not request.name:
            raise CallError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "name is empty; set it to the deployment name",
                reason=INVALID_REQUEST,
                bad_field="name",
            )
        candidates = self._table.candidates(request.name)
        if not candidates:
            return pb.ModelReadyResponse(ready=False)
        # Behind a service name: the token of any of its deployments may ask.
        metadata = context.invocation_metadata()
        refusals: list[CallError] = []
        for state in candidates:
            try:
                check_invoke_token(metadata, state.name, state.invoke_token_sha256)
            except CallError as err:
                refusals.append(err)
                continue
            return pb.ModelReadyResponse(ready=any(c.has_ready_endpoint() for c in candidates))
        raise refusals[0]

    async def model_metadata(self, request: bytes, context: _Context) -> bytes:
        return await self._unary(request, context, _MODEL_METADATA_METHOD, "name")

    async def model_infer(self, request: bytes, context: _Context) -> bytes:
        return await self._unary(request, context, _MODEL_INFER_METHOD, "model_name")

    async def _unary(self, request: bytes, context: _Context, method: str, field: str) -> bytes:
        name = model_name_of(request, field)
        metadata = context.invocation_metadata()
        with await self._dispatcher.admit(name, context, metadata) as target:
            return await forward_unary(
                context,
                target.upstream.unary_unary(method),
                request,
                metadata=request_metadata_to_forward(metadata),
                timeout=context.time_remaining(),
                route_target=target.instance_id,
            )

    async def model_stream_infer(
        self, requests: AsyncIterator[bytes], context: _Context
    ) -> None:
        first = await anext(requests, None)
        if first is None:
            return  # the client closed the stream without a request
        name = model_name_of(first, "model_name")
        metadata = context.invocation_metadata()
        with await self._dispatcher.admit(name, context, metadata) as target:
            writer = StreamWriter(context)
            await forward_stream(
                context,
                target.upstream.stream_stream(_STREAM_INFER_METHOD),
                _same_model(first, requests, name, writer),
                writer,
                metadata=request_metadata_to_forward(metadata),
                timeout=context.time_remaining(),
                route_target=target.instance_id,
            )


async def _same_model(
    first: bytes, requests: AsyncIterator[bytes], name: str, writer: StreamWriter
) -> AsyncIterator[bytes]:
    """The stream's requests for the instance: those naming `name`; the others are
    answered with an in-stream error."""
    yield first
    async for request in requests:
        try:
            other = read_string_field(request, _MODEL_NAME_FIELD) or ""
        except WireFormatError as err:
            writer.write_after_headers(
                stream_error_response(f"the request is not a valid protobuf message ({err})",
                                      request, "")
            )
            continue
        if other != name:
            writer.write_after_headers(
                stream_error_response(
                    f"this stream serves model {name!r} (its first request named it); "
                    f"open another stream for model {other!r}",
                    request,
                    other,
                )
            )
            continue
        yield request
