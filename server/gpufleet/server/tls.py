"""Server TLS credentials from the --tls-cert/--tls-key/--tls-client-ca files."""

from __future__ import annotations

from pathlib import Path

import grpc

from gpufleet.server.config import ServerConfig
from gpufleet.server.errors import StartupError


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS (or mTLS with a client CA) credentials, or None for plaintext.

    Raises StartupError for a missing pair member or an unreadable / non-PEM file.
    """
    if config.tls_cert is None and config.tls_key is None:
        if config.tls_client_ca is not None:
            raise StartupError("--tls-client-ca needs --tls-cert and --tls-key as well")
        return None
    if config.tls_cert is None or config.tls_key is None:
        raise StartupError("--tls-cert and --tls-key go together; give both or neither")
    cert = _read_pem(config.tls_cert, "--tls-cert")
    key = _read_pem(config.tls_key, "--tls-key")
    client_ca = None
    if config.tls_client_ca is not None:
        client_ca = _read_pem(config.tls_client_ca, "--tls-client-ca")
    return grpc.ssl_server_credentials(
        [(key, cert)],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def _read_pem(path: Path, flag: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise StartupError(f"cannot read {flag} file {path}: {err.strerror or err}") from err
    if b"-----BEGIN " not in data:
        raise StartupError(f"{flag} file {path} is not PEM (no '-----BEGIN' line)")
    return data
