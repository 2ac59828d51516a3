"""Admin token, open health/reflection, the state-dir lock, TLS and mutual TLS, CLI errors."""

from __future__ import annotations

import dataclasses
import stat
import subprocess
import sys
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from gpufleet.server.app import start_control_plane
from gpufleet.server.config import ServerConfig
from gpufleet.server.errors import StartupError
from gpufleet.v1 import deployment_service_pb2 as pb, deployment_service_pb2_grpc
from tests.integration.conftest import RunningControlPlane, rich_status

Code = grpc.StatusCode

pytestmark = pytest.mark.timeout(60)


async def expect_code(call: Awaitable[object], code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value.details()
    return caught.value


async def test_missing_token_is_unauthenticated(control_plane: RunningControlPlane) -> None:
    stub = control_plane.stub
    err = await expect_code(stub.ListDeployments(pb.ListDeploymentsRequest()), Code.UNAUTHENTICATED)
    assert "authorization: Bearer" in (err.details() or "")
    info = rich_status(err).error_info
    assert info is not None and info.reason == "MISSING_TOKEN"
    await expect_code(
        stub.ListDeployments(
            pb.ListDeploymentsRequest(), metadata=(("authorization", "Basic dXNlcjpwdw=="),)
        ),
        Code.UNAUTHENTICATED,
    )
    watch = stub.WatchEvents(pb.WatchEventsRequest())
    await expect_code(watch.read(), Code.UNAUTHENTICATED)


async def test_wrong_token_is_permission_denied(control_plane: RunningControlPlane) -> None:
    stub = control_plane.stub
    wrong = (("authorization", "Bearer " + control_plane.admin_token[:-1] + "x"),)
    err = await expect_code(
        stub.GetDeployment(pb.GetDeploymentRequest(name="echo"), metadata=wrong),
        Code.PERMISSION_DENIED,
    )
    info = rich_status(err).error_info
    assert info is not None and info.reason == "INVALID_TOKEN"
    watch = stub.WatchEvents(pb.WatchEventsRequest(), metadata=wrong)
    await expect_code(watch.read(), Code.PERMISSION_DENIED)
    # The scheme is case-insensitive, the token is not.
    ok = await stub.ListDeployments(
        pb.ListDeploymentsRequest(),
        metadata=(("authorization", "bearer " + control_plane.admin_token),),
    )
    assert list(ok.deployments) == []


async def test_health_and_reflection_need_no_token(control_plane: RunningControlPlane) -> None:
    health = health_pb2_grpc.HealthStub(control_plane.channel)
    resp = await health.Check(health_pb2.HealthCheckRequest())
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(control_plane.channel)
    call = reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    responses = [r async for r in call]
    assert responses[0].list_services_response.service


async def test_admin_token_file_is_private_and_reused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state_dir = tmp_path / "state"
    config = ServerConfig(state_dir=state_dir, listen="127.0.0.1:0")
    first = await start_control_plane(config)
    await first.stop(grace=0)
    printed = capsys.readouterr().out
    assert first.admin_token in printed
    assert "authorization: Bearer" in printed

    token_file = state_dir / "admin-token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
    assert token_file.read_text().strip() == first.admin_token
    assert len(first.admin_token) >= 43  # 32 random bytes, URL-safe base64

    second = await start_control_plane(config)
    try:
        assert second.admin_token == first.admin_token
        assert second.admin_token not in capsys.readouterr().out
        channel = grpc.aio.insecure_channel(second.address)
        stub = deployment_service_pb2_grpc.DeploymentServiceStub(channel)
        resp = await stub.ListDeployments(
            pb.ListDeploymentsRequest(),
            metadata=(("authorization", f"Bearer {first.admin_token}"),),
        )
        assert list(resp.deployments) == []
        await channel.close(None)
    finally:
        await second.stop(grace=0)


async def test_one_server_per_state_dir(control_plane: RunningControlPlane) -> None:
    with pytest.raises(StartupError, match="another gpufleet server is using the state dir"):
        await start_control_plane(
            ServerConfig(state_dir=control_plane.state_dir, listen="127.0.0.1:0")
        )
    # The running one is unaffected.
    await control_plane.stub.ListDeployments(
        pb.ListDeploymentsRequest(), metadata=control_plane.metadata
    )


async def test_busy_port_is_a_startup_error(
    control_plane: RunningControlPlane, tmp_path: Path
) -> None:
    with pytest.raises(StartupError, match="cannot listen on"):
        await start_control_plane(
            ServerConfig(state_dir=tmp_path / "other", listen=control_plane.address)
        )
    # The lock of the failed start was released: the state dir is usable again.
    plane = await start_control_plane(
        ServerConfig(state_dir=tmp_path / "other", listen="127.0.0.1:0")
    )
    await plane.stop(grace=0)


@dataclass(frozen=True)
class Pki:
    """A throwaway CA with one server and one client certificate."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _issue(directory: Path, name: str, extensions: str) -> None:
    (directory / f"{name}.ext").write_text(extensions)
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}",
        cwd=directory,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "1", "-out", f"{name}.pem", "-extfile", f"{name}.ext",
        cwd=directory,
    )  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=gpufleet-test-ca",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )  # fmt: skip
    _issue(
        directory,
        "server",
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
    )
    _issue(directory, "client", "extendedKeyUsage=clientAuth\n")
    return Pki(
        ca=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
        client_cert=directory / "client.pem",
        client_key=directory / "client.key",
    )


async def _list(channel: grpc.aio.Channel, token: str) -> pb.ListDeploymentsResponse:
    stub = deployment_service_pb2_grpc.DeploymentServiceStub(channel)
    return await stub.ListDeployments(
        pb.ListDeploymentsRequest(), metadata=(("authorization", f"Bearer {token}"),), timeout=10
    )


async def test_tls(tmp_path: Path, pki: Pki) -> None:
    plane = await start_control_plane(
        ServerConfig(
            state_dir=tmp_path / "state",
            listen="127.0.0.1:0",
            tls_cert=pki.server_cert,
            tls_key=pki.server_key,
        )
    )
    try:
        credentials = grpc.ssl_channel_credentials(root_certificates=pki.ca.read_bytes())
        async with grpc.aio.secure_channel(plane.address, credentials) as secure:
            assert list((await _list(secure, plane.admin_token)).deployments) == []
        async with grpc.aio.insecure_channel(plane.address) as plain:
            await expect_code(_list(plain, plane.admin_token), Code.UNAVAILABLE)
    finally:
        await plane.stop(grace=0)


async def test_mutual_tls(tmp_path: Path, pki: Pki) -> None:
    plane = await start_control_plane(
        ServerConfig(
            state_dir=tmp_path / "state",
            listen="127.0.0.1:0",
            tls_cert=pki.server_cert,
            tls_key=pki.server_key,
            tls_client_ca=pki.ca,
        )
    )
    try:
        with_cert = grpc.ssl_channel_credentials(
            root_certificates=pki.ca.read_bytes(),
            private_key=pki.client_key.read_bytes(),
            certificate_chain=pki.client_cert.read_bytes(),
        )
        async with grpc.aio.secure_channel(plane.address, with_cert) as channel:
            assert list((await _list(channel, plane.admin_token)).deployments) == []
        without_cert = grpc.ssl_channel_credentials(root_certificates=pki.ca.read_bytes())
        async with grpc.aio.secure_channel(plane.address, without_cert) as channel:
            await expect_code(_list(channel, plane.admin_token), Code.UNAVAILABLE)
    finally:
        await plane.stop(grace=0)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"tls_cert": Path("/nonexistent/cert.pem"), "tls_key": Path("/nonexistent/k")},
         "cannot read --tls-cert"),
        ({"tls_cert": Path("/nonexistent/cert.pem")}, "--tls-cert and --tls-key go together"),
        ({"tls_client_ca": Path("/nonexistent/ca.pem")}, "--tls-client-ca needs --tls-cert"),
        ({"listen": "localhost"}, "is not HOST:PORT"),
    ],
)  # fmt: skip
async def test_bad_config_is_a_startup_error(
    tmp_path: Path, overrides: dict[str, Any], message: str
) -> None:
    config = ServerConfig(state_dir=tmp_path / "state", listen="127.0.0.1:0")
    with pytest.raises(StartupError, match=message):
        await start_control_plane(dataclasses.replace(config, **overrides))


async def test_non_pem_file_is_rejected(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(StartupError, match="is not PEM"):
        await start_control_plane(
            ServerConfig(state_dir=tmp_path / "state", tls_cert=junk, tls_key=junk)
        )


def _run_server(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gpufleet.server", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_errors_are_one_line_exit_2(tmp_path: Path) -> None:
    bad_flag = _run_server("--no-such-flag")
    assert bad_flag.returncode == 2
    assert bad_flag.stderr.strip().count("\n") == 0
    assert "unrecognized arguments: --no-such-flag" in bad_flag.stderr

    unreadable = _run_server(
        "--state-dir", str(tmp_path / "state"), "--listen", "127.0.0.1:0",
        "--tls-cert", str(tmp_path / "missing.pem"), "--tls-key", str(tmp_path / "missing.key"),
    )  # fmt: skip
    assert unreadable.returncode == 2
    assert unreadable.stderr.strip().count("\n") == 0
    assert "cannot read --tls-cert file" in unreadable.stderr
    assert "Traceback" not in unreadable.stderr
    assert unreadable.stdout == ""
