"""Issue 5, fault 1: kill -9 the control plane 20 times during a stream of Create/Update
calls. Every acknowledged write survives, revisions never go backwards, and the database
passes PRAGMA integrity_check after every kill.

The writers, the server process and the database check are the ones of
tests/integration/test_durability.py (5 cycles there); this test runs the issue's 20 cycles
and checks more after each one: the restarted server answers every acknowledged write at a
revision at least as high, and every write acknowledged after a restart got a revision
above everything stored before that restart.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import grpc
import pytest

from gpufleet.v1 import deployment_service_pb2 as pb, deployment_service_pb2_grpc
from tests.integration.test_durability import (
    WORKERS,
    Ack,
    Known,
    Load,
    Server,
    check_database,
    version_of,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]

CYCLES = 20
ACKS_BEFORE_KILL = 10
KILL_WINDOW_S = 0.3
LOAD_END_TIMEOUT_S = 30.0


async def _served(
    stub: deployment_service_pb2_grpc.DeploymentServiceAsyncStub, token: str
) -> dict[str, tuple[int, int]]:
    """Name -> (revision, version) of every deployment the server lists."""
    metadata = (("authorization", f"Bearer {token}"),)
    served: dict[str, tuple[int, int]] = {}
    page_token = ""
    while True:
        page = await stub.ListDeployments(
            pb.ListDeploymentsRequest(page_size=1000, page_token=page_token),
            metadata=metadata,
            timeout=10,
        )
        for deployment in page.deployments:
            served[deployment.name] = (deployment.revision, version_of(deployment))
        if not page.next_page_token:
            return served
        page_token = page.next_page_token


async def _run_until_killed(load: Load, server: Server, rng: random.Random) -> None:
    """Writers run until the server is SIGKILLed at a random moment of the load."""
    workers = [asyncio.ensure_future(load.worker(w)) for w in range(WORKERS)]
    try:
        while load.ack_count < ACKS_BEFORE_KILL:
            finished = [w for w in workers if w.done()]
            if finished:
                await finished[0]  # surfaces a writer's unexpected error
                raise AssertionError("a writer stopped before the kill")
            await asyncio.sleep(0.005)
        await asyncio.sleep(rng.uniform(0.0, KILL_WINDOW_S))
        await server.kill()
        await asyncio.wait_for(asyncio.gather(*workers), LOAD_END_TIMEOUT_S)
    finally:
        for worker in workers:
            worker.cancel()


async def test_twenty_kill_9_cycles_lose_nothing_and_never_go_backwards(tmp_path: Path) -> None:
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    state_dir = tmp_path / "state"
    log = tmp_path / "server.log"
    acked: dict[str, Ack] = {}
    known: dict[str, Known] = {}
    high_water = 0
    total_acks = 0

    for cycle in range(CYCLES):
        where = f"seed {seed}, cycle {cycle}"
        before = dict(acked)
        server = await Server.start(state_dir, log)
        token = (state_dir / "admin-token").read_text().strip()
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = deployment_service_pb2_grpc.DeploymentServiceStub(channel)
            # The restarted server serves every write acknowledged before the kill.
            served = await _served(stub, token)
            for name, ack in before.items():
                assert name in served, f"{where}: acknowledged deployment {name} is gone"
                revision, version = served[name]
                assert revision >= ack.revision and version >= ack.version, (where, name, ack)
            load = Load(stub, token)
            load.acked = acked
            load.known = known
            await _run_until_killed(load, server, rng)
            total_acks += load.ack_count

        revision = check_database(state_dir / "gpufleet.db", acked)
        new_acks = {name: ack for name, ack in acked.items() if before.get(name) is not ack}
        assert new_acks, f"{where}: no write was acknowledged"
        # Writes after a restart are numbered above everything stored before it...
        assert min(a.revision for a in new_acks.values()) > high_water, where
        # ...and no deployment's acknowledged revision ever went backwards.
        for name, ack in new_acks.items():
            previous = before.get(name)
            assert previous is None or ack.revision > previous.revision, (where, name, ack)
        assert revision >= max(a.revision for a in acked.values()) >= high_water, where
        high_water = revision
        known.clear()  # writers learn the stored state afresh after a crash

    print(
        f"seed {seed}: {CYCLES} kill -9 cycles, {total_acks} acknowledged writes over "
        f"{len(acked)} deployments, final revision {high_water}, 0 lost"
    )
    assert total_acks >= CYCLES * ACKS_BEFORE_KILL
