"""TLS credentials of the gateway: serving the data plane, and reaching the control plane."""

from __future__ import annotations

import ssl

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


def data_plane_ssl_context(config: GatewayConfig) -> ssl.SSLContext | None:
    """The same TLS as data_plane_credentials, for the HTTP/2 front (ALPN h2)."""
    if data_plane_credentials(config) is None:  # validates the files and their pairing
        return None
    assert config.tls_cert is not None and config.tls_key is not None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(config.tls_cert, config.tls_key)
        if config.tls_client_ca is not None:
            context.load_verify_locations(cafile=str(config.tls_client_ca))
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as err:
        raise StartupError(
            f"cannot use --tls-cert {config.tls_cert} with --tls-key {config.tls_key}: {err}; "
            "give a PEM certificate chain and its private key"
        ) from err
    context.set_alpn_protocols(["h2"])
    return context
