"""TLS credentials from PEM files named on the command line (control plane and gateway)."""

from __future__ import annotations

from pathlib import Path

import grpc

from gpufleet.server.config import ServerConfig
from gpufleet.server.errors import StartupError


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """The control plane's --tls-cert/--tls-key/--tls-client-ca credentials, or None."""
    return serving_credentials(config.tls_cert, config.tls_key, config.tls_client_ca)


def serving_credentials(
    tls_cert: Path | None, tls_key: Path | None, tls_client_ca: Path | None
) -> grpc.ServerCredentials | None:
    """TLS (or mTLS with a client CA) credentials for a listening port, or None for
    plaintext.

    Raises StartupError for a missing pair member or an unreadable / non-PEM file.
    """
    if tls_cert is None and tls_key is None:
        if tls_client_ca is not None:
            raise StartupError("--tls-client-ca needs --tls-cert and --tls-key as well")
        return None
    if tls_cert is None or tls_key is None:
        raise StartupError("--tls-cert and --tls-key go together; give both or neither")
    cert = read_pem(tls_cert, "--tls-cert")
    key = read_pem(tls_key, "--tls-key")
    client_ca = None
    if tls_client_ca is not None:
        client_ca = read_pem(tls_client_ca, "--tls-client-ca")
    return grpc.ssl_server_credentials(
        [(key, cert)],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
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
