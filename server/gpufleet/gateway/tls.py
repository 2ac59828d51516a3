"""TLS credentials of the gateway: serving the data plane, and reaching the control plane."""

from __future__ import annotations

from pathlib import Path

import grpc

from gpufleet.gateway.settings import GatewayConfig
from gpufleet.server.errors import StartupError


def data_plane_credentials(config: GatewayConfig) -> grpc.ServerCredentials | None:
    """TLS (or mTLS with a client CA) for the gateway port, or None for plaintext.

    Raises StartupError for a missing pair member or an unreadable / non-PEM file.
    """
    if config.tls_cert is None and config.tls_key is None:
        if config.tls_client_ca is not None:
            raise StartupError("--tls-client-ca needs --tls-cert and --tls-key as well")
        return None
    if config.tls_cert is None or config.tls_key is None:
        raise StartupError("--tls-cert and --tls-key go together; give both or neither")
    cert = read_pem(config.tls_cert, "--tls-cert")
    key = read_pem(config.tls_key, "--tls-key")
    client_ca = None
    if config.tls_client_ca is not None:
        client_ca = read_pem(config.tls_client_ca, "--tls-client-ca")
    return grpc.ssl_server_credentials(
        [(key, cert)],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def control_plane_credentials(config: GatewayConfig) -> grpc.ChannelCredentials | None:
    """Channel credentials for the control plane, or None for plaintext."""
    if (config.server_tls_cert is None) != (config.server_tls_key is None):
        raise StartupError(
            "--server-tls-cert and --server-tls-key go together; give both or neither"
        )
    wants_tls = (
        config.server_tls
        or config.server_tls_ca is not None
        or config.server_tls_cert is not None
    )
    if not wants_tls:
        return None
    root = None
    if config.server_tls_ca is not None:
        root = read_pem(config.server_tls_ca, "--server-tls-ca")
    cert = None
    key = None
    if config.server_tls_cert is not None and config.server_tls_key is not None:
        cert = read_pem(config.server_tls_cert, "--server-tls-cert")
        key = read_pem(config.server_tls_key, "--server-tls-key")
    return grpc.ssl_channel_credentials(
        root_certificates=root, private_key=key, certificate_chain=cert
    )


def read_pem(path: Path, flag: str) -> bytes:
    """The bytes of a PEM file; StartupError naming `flag` if unreadable or not PEM."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise StartupError(f"cannot read {flag} file {path}: {err.strerror or err}") from err
    if b"-----BEGIN " not in data:
        raise StartupError(f"{flag} file {path} is not PEM (no '-----BEGIN' line)")
    return data
