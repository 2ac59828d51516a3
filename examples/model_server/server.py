"""Server lifecycle: bind, load (health NOT_SERVING), serve (SERVING), drain on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
import time

import grpc
from gpufleet.inference import grpc_service_pb2 as pb
from gpufleet.inference import grpc_service_pb2_grpc as pb_grpc
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from examples.model_server.config import ServerConfig
from examples.model_server.errors import StartupError
from examples.model_server.gpu_memory import hold_gpu_memory
from examples.model_server.reporting import report_listening, report_ready
from examples.model_server.servicer import InferenceServicer, ServingState

_log = logging.getLogger(__name__)

INFERENCE_SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
# Health is reported for the whole server ("") and for the inference service by name.
HEALTH_SERVICES = ("", INFERENCE_SERVICE)


def listen_address(host: str, port: int) -> str:
    """host:port as gRPC expects it, with IPv6 literals in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def _load_models(config: ServerConfig) -> object | None:
    """Simulated model load; returns the GPU buffer to keep alive, if any."""
    if config.load_seconds:
        await asyncio.sleep(config.load_seconds)
    if config.gpu_memory_mib:
        return await asyncio.to_thread(hold_gpu_memory, config.gpu_memory_mib)
    return None


async def serve(config: ServerConfig, started_at: float) -> None:
    """Runs the server until SIGTERM or SIGINT; `started_at` is the process start (monotonic)."""
    state = ServingState()
    # gRPC's default SO_REUSEPORT would let a second server share a port already in use.
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(config, state), server)
    health = health_aio.HealthServicer()
    for service in HEALTH_SERVICES:
        await health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        [INFERENCE_SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME], server
    )
    address = listen_address(config.host, config.port)
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as error:
        raise StartupError(
            f"cannot listen on {address} ({error}); is the port in use? pick another --port, "
            "or a --host address of this machine"
        ) from error
    if port == 0:
        raise StartupError(
            f"cannot listen on {address}; pick another --port, or a --host address of this machine"
        )
    await server.start()
    report_listening(config.host, port, config.port_file)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    load = asyncio.create_task(_load_models(config))
    stopped = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({load, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if load.done():
            # Referenced until serve() returns, so the GPU memory stays allocated while serving.
            gpu_buffer = load.result()
            report_ready(time.monotonic() - started_at, config.ready_file)
            state.loaded = True
            for service in HEALTH_SERVICES:
                await health.set(service, health_pb2.HealthCheckResponse.SERVING)
            await stopped
        _log.info("stopping; in-flight calls get %.1f s", config.shutdown_grace_seconds)
    finally:
        load.cancel()
        stopped.cancel()
        await health.enter_graceful_shutdown()
        await server.stop(config.shutdown_grace_seconds)
