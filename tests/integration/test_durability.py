"""kill -9 the real server mid-load: no acknowledged write may be lost.

Each cycle starts `python -m gpufleet.server` on the same state dir, runs concurrent
Create/Update calls while recording every acknowledged one (with the revision it returned),
SIGKILLs the process at a random moment, and checks on the database and on the restarted
server that every acknowledged write is there, at a revision >= the acknowledged one, and
that revisions never go backwards.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sqlite3
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from gpufleet.v1 import deployment_pb2, deployment_service_pb2 as pb, deployment_service_pb2_grpc

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

CYCLES = 5
WORKERS = 6
DEPLOYMENTS_PER_WORKER = 3
START_TIMEOUT_S = 30.0
LISTENING_PREFIX = "gpufleet control plane listening on "


@dataclass
class Ack:
    """The latest acknowledged write of one deployment."""

    revision: int
    version: int


@dataclass
class Known:
    """What a worker believes is stored, to send the right revision next."""

    revision: int
    version: int


class Server:
    """One `python -m gpufleet.server` process."""

    def __init__(self, process: asyncio.subprocess.Process, address: str) -> None:
        self.process = process
        self.address = address

    @classmethod
    async def start(cls, state_dir: Path, log: Path) -> Server:
        with log.open("ab") as err:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "gpufleet.server",
                "--state-dir", str(state_dir), "--listen", "127.0.0.1:0",
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
            )  # fmt: skip
        address = await asyncio.wait_for(cls._read_address(process), START_TIMEOUT_S)
        return cls(process, address)

    @staticmethod
    async def _read_address(process: asyncio.subprocess.Process) -> str:
        assert process.stdout is not None
        while True:
            line = (await process.stdout.readline()).decode()
            if not line:
                raise AssertionError(f"server exited before listening (rc {await process.wait()})")
            if line.startswith(LISTENING_PREFIX):
                return line[len(LISTENING_PREFIX) :].strip()

    async def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        await asyncio.wait_for(self.process.wait(), 30)

    async def terminate(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.process.wait(), 30)


def spec(version: int) -> deployment_pb2.DeploymentSpec:
    return deployment_pb2.DeploymentSpec(
        command=f"python -m model --version {version}", port=8000, env={"VERSION": str(version)}
    )


def version_of(deployment: deployment_pb2.Deployment) -> int:
    return int(deployment.spec.env["VERSION"])


class Load:
    """Concurrent writers; every acknowledged write lands in `acked`."""

    def __init__(
        self, stub: deployment_service_pb2_grpc.DeploymentServiceAsyncStub, token: str
    ) -> None:
        self.stub = stub
        self.metadata = (("authorization", f"Bearer {token}"),)
        self.acked: dict[str, Ack] = {}
        self.known: dict[str, Known] = {}
        self.ack_count = 0

    async def worker(self, worker_id: int) -> None:
        i = 0
        while True:
            name = f"w{worker_id}-{i % DEPLOYMENTS_PER_WORKER}"
            i += 1
            try:
                await self._write_once(name)
            except grpc.aio.AioRpcError as err:
                if err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                    return  # the server is gone: this cycle's load is over
                if err.code() in (grpc.StatusCode.ABORTED, grpc.StatusCode.ALREADY_EXISTS):
                    # An unacknowledged write committed before the last kill: re-read.
                    self.known.pop(name, None)
                    continue
                raise

    async def _write_once(self, name: str) -> None:
        known = self.known.get(name)
        if known is None:
            try:
                got = await self.stub.GetDeployment(
                    pb.GetDeploymentRequest(name=name), metadata=self.metadata
                )
            except grpc.aio.AioRpcError as err:
                if err.code() != grpc.StatusCode.NOT_FOUND:
                    raise
            else:
                known = Known(got.deployment.revision, version_of(got.deployment))
                self.known[name] = known
        version = 1 if known is None else known.version + 1
        deployment = deployment_pb2.Deployment(name=name, spec=spec(version))
        if known is None:
            created = await self.stub.CreateDeployment(
                pb.CreateDeploymentRequest(deployment=deployment), metadata=self.metadata
            )
            stored = created.deployment
        else:
            updated = await self.stub.UpdateDeployment(
                pb.UpdateDeploymentRequest(deployment=deployment, revision=known.revision),
                metadata=self.metadata,
            )
            stored = updated.deployment
        self.acked[name] = Ack(stored.revision, version)
        self.known[name] = Known(stored.revision, version)
        self.ack_count += 1


def check_database(db_path: Path, acked: dict[str, Ack]) -> int:
    """Integrity and acknowledged writes, read straight from the file; returns the revision."""
    with sqlite3.connect(db_path) as db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        revision = db.execute("SELECT value FROM store_meta WHERE key = 'revision'").fetchone()[0]
        rows = {
            name: (rev, deployment_pb2.DeploymentSpec.FromString(blob))
            for name, rev, blob in db.execute("SELECT name, revision, spec FROM deployments")
        }
        event_revisions = [
            r for (r,) in db.execute("SELECT revision FROM events ORDER BY revision")
        ]
    db.close()
    for name, ack in acked.items():
        assert name in rows, f"acknowledged deployment {name} is missing"
        stored_revision, stored_spec = rows[name]
        assert stored_revision >= ack.revision, (name, stored_revision, ack)
        assert int(stored_spec.env["VERSION"]) >= ack.version, (name, stored_spec, ack)
    assert event_revisions == list(range(1, revision + 1))
    return int(revision)


async def test_kill_9_loses_no_acknowledged_write(tmp_path: Path) -> None:
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    state_dir = tmp_path / "state"
    log = tmp_path / "server.log"
    acked: dict[str, Ack] = {}
    known: dict[str, Known] = {}
    high_water = 0
    total_acks = 0

    for cycle in range(CYCLES):
        server = await Server.start(state_dir, log)
        token = (state_dir / "admin-token").read_text().strip()
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = deployment_service_pb2_grpc.DeploymentServiceStub(channel)
            load = Load(stub, token)
            load.acked = acked
            load.known = known
            workers = [asyncio.ensure_future(load.worker(w)) for w in range(WORKERS)]
            # Let some writes through, then kill at a random moment of the load.
            while load.ack_count < 10:
                done = [w for w in workers if w.done()]
                if done:
                    await done[0]  # surfaces a worker's unexpected error
                await asyncio.sleep(0.005)
            await asyncio.sleep(rng.uniform(0.0, 0.3))
            await server.kill()
            await asyncio.wait_for(asyncio.gather(*workers), 30)
            total_acks += load.ack_count
        revision = check_database(state_dir / "gpufleet.db", acked)
        max_acked = max(a.revision for a in acked.values())
        assert revision >= max_acked >= high_water, f"seed {seed}, cycle {cycle}"
        high_water = revision
        # Workers learn the stored state afresh after a crash.
        known.clear()

    # The restarted server serves every acknowledged write, and new writes go forward.
    server = await Server.start(state_dir, log)
    try:
        token = (state_dir / "admin-token").read_text().strip()
        metadata = (("authorization", f"Bearer {token}"),)
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = deployment_service_pb2_grpc.DeploymentServiceStub(channel)
            for name, ack in acked.items():
                resp = await stub.GetDeployment(
                    pb.GetDeploymentRequest(name=name), metadata=metadata
                )
                got = resp.deployment
                assert got.revision >= ack.revision and version_of(got) >= ack.version
            probe = await stub.CreateDeployment(
                pb.CreateDeploymentRequest(
                    deployment=deployment_pb2.Deployment(name="after-crashes", spec=spec(1))
                ),
                metadata=metadata,
            )
            # Not necessarily high_water + 1: the reconciler may first record the observed
            # generation of deployments updated just before the last kill.
            assert probe.deployment.revision > high_water
    finally:
        assert await server.terminate() == 0
    print(f"seed {seed}: {total_acks} acknowledged writes, final revision {high_water}")
    assert total_acks >= CYCLES * 10
    assert os.path.exists(state_dir / "gpufleet.db")
