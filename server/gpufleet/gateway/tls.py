"""TLS credentials of the gateway: serving the data plane, and reaching the control plane."""

from __future__ import annotations

import grpc

from gpufleet.gateway.settings import GatewayConfig
from gpufleet.server.errors import StartupError
from gpufleet.server.tls import read_pem, serving_credentials


def data_plane_credentials(config: GatewayConfig) -> grpc.ServerCredentials | None:
    """TLS (or mTLS with a client CA) for the gateway port, or None for plaintext."""
    return serving_credentials(config.tls_cert, config.tls_key, config.tls_client_ca)


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
