"""The gateway embedded in `gpufleet server`: on by default on its own port, connected to the
control plane, stopped with it; `--no-gateway` leaves it out; a busy gateway port is a
startup error that leaves nothing behind.
"""

from __future__ import annotations

import re
import signal
import socket
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gpufleet.server.config import DEFAULT_GATEWAY_LISTEN
from gpufleet.server.errors import StartupError
from gpufleet.server.main import gateway_listen
from tests.e2e.conftest import LISTENING, Processes, start_server, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

GATEWAY_LISTENING = re.compile(r"gpufleet gateway listening on (\S+)")


def test_gateway_listen_resolution() -> None:
    assert gateway_listen(None, False, "127.0.0.1:50051") == DEFAULT_GATEWAY_LISTEN
    # A control plane on a picked port gets a gateway on a picked port.
    assert gateway_listen(None, False, "127.0.0.1:0") == "127.0.0.1:0"
    assert gateway_listen("0.0.0.0:9001", False, "127.0.0.1:0") == "0.0.0.0:9001"
    assert gateway_listen(None, True, "127.0.0.1:50051") is None
    with pytest.raises(StartupError, match="not HOST:PORT"):
        gateway_listen("9001", False, "127.0.0.1:50051")


def _serving(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return bool(response.status == health_pb2.HealthCheckResponse.SERVING)


def test_server_embeds_a_gateway_that_syncs_and_stops_with_it(processes: Processes, tmp_path: Path) -> None:
    plane = start_server(processes, tmp_path / "state")
    gateway = plane.proc.wait_for_output(GATEWAY_LISTENING).group(1)
    assert gateway != plane.address
    # Health turns SERVING only once the first route snapshot came from the control plane.
    wait_for("the embedded gateway SERVING", lambda: _serving(gateway))
    assert plane.proc.stop(signal.SIGTERM) == 0
    with pytest.raises(grpc.RpcError):
        _serving(gateway)


def test_no_gateway(processes: Processes, tmp_path: Path) -> None:
    plane = start_server(processes, tmp_path / "state", "--no-gateway")
    with plane.client() as client:
        assert client.list_deployments() == []
    assert GATEWAY_LISTENING.search(plane.proc.output()) is None
    assert plane.proc.stop(signal.SIGTERM) == 0


def test_busy_gateway_port_is_a_startup_error(processes: Processes, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = processes.start(
            "server", "server", "--state-dir", str(tmp_path / "state"), "--listen", "127.0.0.1:0",
            "--gateway-listen", f"127.0.0.1:{port}",
        )  # fmt: skip
        assert proc.popen.wait(30) == 2
    output = proc.output()
    assert f"cannot listen on 127.0.0.1:{port}" in output and "Traceback" not in output, output
    assert LISTENING.search(output) is None
    # The control plane it had started let go of the state dir: a new one starts there.
    again = start_server(processes, tmp_path / "state", "--no-gateway", name="again")
    assert again.proc.stop(signal.SIGTERM) == 0
