"""TLS on both sides of the gateway: mutual TLS on the data plane port, and TLS to the
control plane checked against a CA, with certificates from a throwaway openssl CA."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from gpufleet.gateway.app import start_gateway
from gpufleet.gateway.settings import GatewayConfig
from gpufleet.inference import grpc_service_pb2 as pb
from gpufleet.inference import grpc_service_pb2_grpc as pb_grpc
from gpufleet.server.errors import StartupError
from tests.integration.test_gateway_support import ADMIN_TOKEN, control_plane, route

pytestmark = pytest.mark.timeout(60)


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _openssl(directory: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True, timeout=30)


def _issue(directory: Path, name: str, extensions: str) -> None:
    (directory / f"{name}.ext").write_text(extensions)
    _openssl(
        directory, "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}",
    )  # fmt: skip
    _openssl(
        directory, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "1", "-out", f"{name}.pem", "-extfile", f"{name}.ext",
    )  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("gateway-pki")
    _openssl(
        directory, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
        "-subj", "/CN=gpufleet-gateway-test-ca",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    _issue(directory, "server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    _issue(directory, "client", "extendedKeyUsage=clientAuth\n")
    return Pki(
        ca=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
        client_cert=directory / "client.pem",
        client_key=directory / "client.key",
    )


async def test_mutual_tls_data_plane_and_tls_control_plane(pki: Pki) -> None:
    plane_credentials = grpc.ssl_server_credentials(
        [(pki.server_key.read_bytes(), pki.server_cert.read_bytes())]
    )
    async with control_plane(route("echo"), credentials=plane_credentials) as plane:
        gateway = await start_gateway(
            GatewayConfig(
                server_address=plane.address,
                admin_token=ADMIN_TOKEN,
                listen="127.0.0.1:0",
                tls_cert=pki.server_cert,
                tls_key=pki.server_key,
                tls_client_ca=pki.ca,
                server_tls_ca=pki.ca,
            )
        )
        try:
            await gateway.wait_synced(timeout=10)  # the watch came through TLS
            with_cert = grpc.ssl_channel_credentials(
                root_certificates=pki.ca.read_bytes(),
                private_key=pki.client_key.read_bytes(),
                certificate_chain=pki.client_cert.read_bytes(),
            )
            async with grpc.aio.secure_channel(gateway.address, with_cert) as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                ready = await stub.ServerReady(pb.ServerReadyRequest(), timeout=10)
                assert ready.ready
            without_cert = grpc.ssl_channel_credentials(root_certificates=pki.ca.read_bytes())
            async with grpc.aio.secure_channel(gateway.address, without_cert) as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.ServerLive(pb.ServerLiveRequest(), timeout=10)
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            await gateway.stop(grace=0)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"tls_cert": Path("/nonexistent/cert.pem"), "tls_key": Path("/nonexistent/k")},
         "cannot read --tls-cert"),
        ({"tls_client_ca": Path("/nonexistent/ca.pem")}, "--tls-client-ca needs --tls-cert"),
        ({"server_tls_cert": Path("/nonexistent/c.pem")}, "go together"),
        ({"server_tls_ca": Path("/nonexistent/ca.pem")}, "cannot read --server-tls-ca"),
        ({"listen": "localhost"}, "is not HOST:PORT"),
    ],
)  # fmt: skip
async def test_bad_tls_config_is_a_startup_error(
    overrides: dict[str, object], message: str
) -> None:
    fields: dict[str, object] = {
        "server_address": "127.0.0.1:1",
        "admin_token": "t",
        "listen": "127.0.0.1:0",
        **overrides,
    }
    with pytest.raises(StartupError, match=message):
        await start_gateway(GatewayConfig(**fields))  # type: ignore[arg-type]


async def test_non_pem_file_is_rejected(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    config = GatewayConfig(
        server_address="127.0.0.1:1",
        admin_token="t",
        listen="127.0.0.1:0",
        tls_cert=junk,
        tls_key=junk,
    )
    with pytest.raises(StartupError, match="is not PEM"):
        await start_gateway(config)
