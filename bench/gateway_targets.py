"""The two targets of the gateway benchmarks: one example model server (a real process)
and a gateway (`python -m gpufleet.gateway`, a real process) that routes to it.

The gateway watches a static RoutingService (static_routes.py) on the benchmark's own
event loop, so no control plane runs: what is measured is the data plane alone. The
route gives the instance room for every call of the benchmark at once, so nothing waits
in the gateway's queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.bare_proxy import LISTENING as BARE_PROXY_LISTENING
from bench.h2_proxy import LISTENING as H2_PROXY_LISTENING
from bench.processes import ServerProcess
from bench.static_routes import serve_static_routes, single_instance_route
from bench.tcp_splice import LISTENING as TCP_SPLICE_LISTENING

MODEL = "echo"
"""Deployment name, and the model name the example server answers as echo."""
INVOKE_TOKEN = "bench-invoke-token"
ADMIN_TOKEN = "bench-admin-token"
INSTANCE_ID = "bench-instance-0"
SERVING_TIMEOUT_SECONDS = 30.0
GATEWAY_LISTENING = "gpufleet gateway listening on "
MODEL_SERVER_LISTENING = "model server listening on "
H2_PROXY = "h2-proxy"
TCP_SPLICE = "tcp-splice"
_WIRE_FLOORS = {
    H2_PROXY: ("bench.h2_proxy", H2_PROXY_LISTENING),
    TCP_SPLICE: ("bench.tcp_splice", TCP_SPLICE_LISTENING),
}


@dataclass
class Targets:
    """The running instance and gateway (and bare proxy), and how to start another gateway."""

    instance: ServerProcess
    gateway: ServerProcess
    floor: ServerProcess | None
    """bench.bare_proxy in front of the same instance, when asked for."""
    reference: ServerProcess | None
    """A second gateway running another version of the code, when asked for."""
    routes_address: str
    log_dir: Path
    wire_floors: dict[str, ServerProcess]
    """bench.h2_proxy and bench.tcp_splice in front of the same instance, when asked for."""


async def wait_serving(address: str, timeout: float = SERVING_TIMEOUT_SECONDS) -> None:
    """Wait until the server at `address` reports SERVING on grpc.health.v1 Watch."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        async with asyncio.timeout(timeout):
            async for reply in stub.Watch(health_pb2.HealthCheckRequest(service="")):
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
    raise RuntimeError(f"the health watch of {address} ended before it reported SERVING")


def source_tree_env(tree: Path) -> dict[str, str]:
    """The environment that runs gpufleet from `tree`, a copy of the repository's source
    roots (e.g. `git archive HEAD server protos | tar -x -C TREE`): its folders come first
    on the path, before the installed checkout."""
    roots = [tree / "server", tree / "protos"]
    missing = [str(root) for root in roots if not root.is_dir()]
    if missing:
        raise RuntimeError(
            f"{tree} is not a gpufleet source tree: {', '.join(missing)} missing; make one with "
            f"`git archive REF server protos | tar -x -C {tree}`"
        )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [*(str(root.resolve()) for root in roots), env.get("PYTHONPATH", "")]
    ).rstrip(os.pathsep)
    return env


async def start_gateway(
    routes_address: str,
    log_dir: Path,
    name: str = "gateway",
    profile: Path | None = None,
    source_tree: Path | None = None,
) -> ServerProcess:
    """`python -m gpufleet.gateway` against the static routes, synced and SERVING; under
    cProfile (writing pstats to `profile` when it exits) if `profile` is given; with the
    code of `source_tree` (see source_tree_env) if given."""
    profiled = ["cProfile", "-o", str(profile), "-m"] if profile is not None else []
    gateway = ServerProcess(
        name,
        [
            *profiled,
            "gpufleet.gateway",
            "--server",
            routes_address,
            "--token",
            ADMIN_TOKEN,
            "--listen",
            "127.0.0.1:0",
            "--gateway-id",
            name,
        ],
        GATEWAY_LISTENING,
        log_dir,
        env=None if source_tree is None else source_tree_env(source_tree),
    )
    # Blocking reads of its stdout: off the event loop, which serves the routes meanwhile.
    await asyncio.to_thread(gateway.start)
    try:
        # The gateway reports SERVING once it holds the route snapshot.
        await wait_serving(gateway.address)
    except BaseException:
        await asyncio.to_thread(gateway.stop)
        raise
    return gateway


@contextlib.asynccontextmanager
async def running_targets(
    log_dir: Path,
    concurrency: int,
    floor: bool = False,
    reference: Path | None = None,
    wire_floors: bool = False,
) -> AsyncIterator[Targets]:
    """An example model server, a gateway routing deployment MODEL to it and, with
    `floor`, a bare proxy to it; with `reference`, a second gateway running the code of
    that source tree; with `wire_floors`, the HTTP/2 frame proxy and the TCP splice."""
    instance = ServerProcess(
        "model-server", ["examples.model_server", "--port", "0"], MODEL_SERVER_LISTENING, log_dir
    )
    await asyncio.to_thread(instance.start)
    try:
        await wait_serving(instance.address)
        route = single_instance_route(
            MODEL, INSTANCE_ID, instance.address, INVOKE_TOKEN, concurrency
        )
        routes_server, routes_address = await serve_static_routes([route])
        try:
            gateway = await start_gateway(routes_address, log_dir)
            bare: ServerProcess | None = None
            other: ServerProcess | None = None
            wires: dict[str, ServerProcess] = {}
            try:
                if reference is not None:
                    other = await start_gateway(
                        routes_address, log_dir, name="gateway-ref", source_tree=reference
                    )
                if floor:
                    bare = ServerProcess(
                        "bare-proxy",
                        ["bench.bare_proxy", "--upstream", instance.address],
                        BARE_PROXY_LISTENING,
                        log_dir,
                    )
                    await asyncio.to_thread(bare.start)
                if wire_floors:
                    for name, (module, listening) in _WIRE_FLOORS.items():
                        wires[name] = ServerProcess(
                            name, [module, "--upstream", instance.address], listening, log_dir
                        )
                        await asyncio.to_thread(wires[name].start)
                yield Targets(instance, gateway, bare, other, routes_address, log_dir, wires)
            finally:
                for extra in (bare, other, *wires.values()):
                    if extra is not None:
                        await asyncio.to_thread(extra.stop)
                await asyncio.to_thread(gateway.stop)
        finally:
            await routes_server.stop(None)
    finally:
        await asyncio.to_thread(instance.stop)
