"""N simulated agents in one process, as asyncio tasks: benchmark 6's load.

    python -m bench.agent_pool --server HOST:PORT --join-token-file FILE --agents N
        [--gpus 2] [--register-concurrency 16]

Each agent has its own channel (its own TCP connection, as separate machines would),
registers with the join token, opens Connect with its node credentials and sends a
heartbeat every interval the server gave at registration (1 s in the benchmark): a
couple of simulated GPUs, host capacity, no instances, as an idle `gpufleet agent
--simulate-gpus` sends. The agents' phases are spread over the interval.

Once every agent has the server's first ConnectResponse it prints
"agent pool connected N". On SIGUSR1 it prints one line "stats {json}" for the window
since the previous one (or since connected): heartbeats sent, the longest gap between two
heartbeats of one agent, heartbeats later than 1.5 intervals, and streams that failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import grpc

from gpufleet.v1 import node_pb2, node_service_pb2 as pb, node_service_pb2_grpc

if TYPE_CHECKING:
    # Declared only in the generated .pyi: the runtime class is NodeServiceStub.
    from gpufleet.v1.node_service_pb2_grpc import NodeServiceAsyncStub as NodeStub

CONNECTED = "agent pool connected "
STATS = "stats "
NODE_ID_METADATA = "gpufleet-node-id"
GPU_MEMORY_MIB = 81559
LATE_FACTOR = 1.5
REGISTER_TIMEOUT_SECONDS = 60.0
EOF: object = getattr(grpc.aio, "EOF")  # noqa: B009 - missing from the type stubs
# Each agent its own subchannel pool, hence its own TCP connection.
CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]


@dataclass
class Window:
    """What the pool saw since the last report."""

    agents: int = 0
    connected: int = 0
    """Agents whose Connect stream is open and answered."""
    seconds: float = 0.0
    sent: int = 0
    max_gap_s: float = 0.0
    """Longest time between two heartbeats of one agent in the window."""
    late: int = 0
    """Heartbeats sent more than LATE_FACTOR intervals after the agent's previous one."""
    failures: int = 0
    """Connect streams that ended or failed (an agent does not reconnect)."""
    first_failure: str = ""


class Pool:
    """The agents' shared bookkeeping."""

    def __init__(self, agents: int) -> None:
        self.window = Window(agents=agents)
        self.window_started = time.monotonic()
        self.all_connected = asyncio.Event()
        self._agents = agents

    def on_connected(self) -> None:
        self.window.connected += 1
        if self.window.connected >= self._agents:
            self.all_connected.set()

    def on_heartbeat(self, gap: float | None, interval: float) -> None:
        self.window.sent += 1
        if gap is not None:
            self.window.max_gap_s = max(self.window.max_gap_s, gap)
            if gap > LATE_FACTOR * interval:
                self.window.late += 1

    def on_failure(self, what: str, was_connected: bool) -> None:
        if was_connected:
            self.window.connected -= 1
        self.window.failures += 1
        if not self.window.first_failure:
            self.window.first_failure = what

    def report(self) -> None:
        """Print the window and start the next one."""
        self.window.seconds = round(time.monotonic() - self.window_started, 3)
        print(STATS + json.dumps(asdict(self.window)), flush=True)
        self.restart()

    def restart(self) -> None:
        """Start a new window (the connected count carries over)."""
        self.window = Window(agents=self._agents, connected=self.window.connected)
        self.window_started = time.monotonic()


def heartbeat(name: str, gpus: int) -> pb.ConnectRequest:
    """What an idle agent with `gpus` simulated 80 GB cards sends every interval."""
    return pb.ConnectRequest(
        heartbeat=pb.Heartbeat(
            gpus=[
                node_pb2.Gpu(
                    uuid=f"GPU-sim-{name}-{index}",
                    index=index,
                    name="Simulated GPU 80GB",
                    memory_total_mib=GPU_MEMORY_MIB,
                    health=node_pb2.GPU_HEALTH_SIMULATED,
                )
                for index in range(gpus)
            ],
            cpu_millis=16_000,
            memory_mib=128 * 1024,
            agent_version="bench-agent-pool",
            advertise_host="127.0.0.1",
        )
    )


async def run_agent(
    name: str,
    stub: NodeStub,
    join_token: str,
    gpus: int,
    phase: float,
    pool: Pool,
    registering: asyncio.Semaphore,
) -> None:
    """Register, connect, heartbeat until cancelled; a failed stream is recorded, not retried."""
    async with registering:
        registered = await stub.Register(
            pb.RegisterRequest(join_token=join_token, node_name=name),
            timeout=REGISTER_TIMEOUT_SECONDS,
        )
    interval = float(registered.heartbeat_interval_seconds or 1)
    metadata = (
        ("authorization", f"Bearer {registered.node_secret}"),
        (NODE_ID_METADATA, registered.node_id),
    )
    # The stubs type the request iterator as required; None is how grpc.aio asks for a
    # call driven with write() and read().
    call = cast(
        "grpc.aio.StreamStreamCall[pb.ConnectRequest, pb.ConnectResponse]",
        cast(Any, stub.Connect)(None, metadata=metadata),
    )
    message = heartbeat(name, gpus)
    connected = False

    async def read() -> None:
        nonlocal connected
        while True:
            response = await call.read()
            if response is EOF:
                raise ConnectionError("the server ended the Connect stream")
            if not connected:
                connected = True
                pool.on_connected()

    reader = asyncio.create_task(read())
    loop = asyncio.get_running_loop()
    next_at = loop.time() + phase * interval
    last: float | None = None
    try:
        while not reader.done():
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            now = loop.time()
            await call.write(message)
            pool.on_heartbeat(None if last is None else now - last, interval)
            last = now
            next_at += interval
            if next_at < now:
                next_at = now + interval  # fell behind: keep the period, skip the backlog
        await reader
    except (grpc.aio.AioRpcError, grpc.aio.UsageError, ConnectionError) as err:
        pool.on_failure(f"{name}: {err}", connected)
    finally:
        reader.cancel()
        call.cancel()


async def run_pool(
    server: str, join_token: str, agents: int, gpus: int, register_concurrency: int
) -> None:
    """Start the agents, announce when all are connected, report on SIGUSR1, stop on
    SIGTERM/SIGINT."""
    pool = Pool(agents)
    registering = asyncio.Semaphore(register_concurrency)
    channels = [
        grpc.aio.insecure_channel(server, options=CHANNEL_OPTIONS) for _ in range(agents)
    ]
    phases = random.Random(agents)
    tasks = [
        asyncio.create_task(
            run_agent(
                f"bench-agent-{number:05d}",
                node_service_pb2_grpc.NodeServiceStub(channel),
                join_token,
                gpus,
                phases.random(),
                pool,
                registering,
            )
        )
        for number, channel in enumerate(channels)
    ]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    connected = asyncio.create_task(pool.all_connected.wait())
    stopped = asyncio.create_task(stop.wait())
    failed = asyncio.create_task(_first_failure(tasks))
    try:
        await asyncio.wait({connected, stopped, failed}, return_when=asyncio.FIRST_COMPLETED)
        if failed.done():
            raise SystemExit(f"agent pool: an agent failed to start: {failed.result()}")
        if connected.done():
            pool.restart()
            print(f"{CONNECTED}{agents}", flush=True)
            loop.add_signal_handler(signal.SIGUSR1, pool.report)
            await stopped
    finally:
        for task in (connected, stopped, failed, *tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for channel in channels:
            await channel.close(None)


async def _first_failure(tasks: Sequence[asyncio.Task[None]]) -> str:
    """The first agent task that ended with an exception (before all connected)."""
    for done in asyncio.as_completed(tasks):
        try:
            await done
        except asyncio.CancelledError:
            raise
        except Exception as err:  # noqa: BLE001 - reported as the pool's start failure
            return f"{type(err).__name__}: {err}"
    return "every agent task ended"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.agent_pool",
        description="N simulated gpufleet agents heartbeating from one process.",
    )
    parser.add_argument("--server", required=True, metavar="HOST:PORT")
    parser.add_argument("--join-token-file", type=Path, required=True)
    parser.add_argument("--agents", type=int, required=True)
    parser.add_argument("--gpus", type=int, default=2, help="simulated GPUs per agent")
    parser.add_argument("--register-concurrency", type=int, default=16)
    args = parser.parse_args(argv)
    if args.agents < 1 or args.gpus < 0 or args.register_concurrency < 1:
        parser.error("--agents and --register-concurrency must be >= 1, --gpus >= 0")
    token = args.join_token_file.read_text(encoding="utf-8").strip()
    try:
        asyncio.run(
            run_pool(args.server, token, args.agents, args.gpus, args.register_concurrency)
        )
    except SystemExit as exit_:
        print(exit_.code, file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
