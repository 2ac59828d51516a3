"""ClientConfig: where the control plane is and how to authenticate to it."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

DEFAULT_TIMEOUT_S = 30.0

# Deployments with large specs and long watch streams must not hit grpc's 4 MiB default.
_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class ClientConfig:
    """Connection settings shared by Client and AsyncClient."""

    target: str
    """Control plane address as ``host:port``, e.g. ``127.0.0.1:50051``."""

    token: str | None = None
    """Admin token, sent as metadata ``authorization: Bearer <token>``. None sends no token
    (the admin API then answers UNAUTHENTICATED)."""

    tls: bool = False
    """Connect with TLS, verifying the server against the system's root certificates unless
    ``tls_root_cert`` is set. Implied by any ``tls_*`` field."""

    tls_root_cert: bytes | None = None
    """PEM root certificate(s) that signed the server certificate (a private CA)."""

    tls_client_cert: bytes | None = None
    """PEM client certificate for mutual TLS; needs ``tls_client_key``."""

    tls_client_key: bytes | None = None
    """PEM private key of ``tls_client_cert``."""

    tls_server_name: str | None = None
    """Name to verify the server certificate against when it differs from the target host,
    e.g. ``localhost`` while dialing ``127.0.0.1``."""

    timeout: float | None = DEFAULT_TIMEOUT_S
    """Deadline in seconds of each unary call; None waits forever. Streams (watch_events)
    have no deadline unless their own ``timeout`` is given."""

    def __post_init__(self) -> None:
        if not self.target:
            raise ValueError("target is empty: pass the control plane address as host:port")
        if (self.tls_client_cert is None) != (self.tls_client_key is None):
            raise ValueError(
                "mutual TLS needs both tls_client_cert and tls_client_key; only one was given"
            )
        if self.timeout is not None and self.timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds or None, got {self.timeout}")

    @property
    def uses_tls(self) -> bool:
        """True when the channel must be a TLS channel."""
        return (
            self.tls
            or self.tls_root_cert is not None
            or self.tls_client_cert is not None
            or self.tls_server_name is not None
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """TLS credentials for a secure channel."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.tls_root_cert,
            private_key=self.tls_client_key,
            certificate_chain=self.tls_client_cert,
        )

    def channel_options(self) -> list[tuple[str, str | int]]:
        """gRPC channel arguments."""
        options: list[tuple[str, str | int]] = [
            ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
        ]
        if self.tls_server_name:
            options.append(("grpc.ssl_target_name_override", self.tls_server_name))
        return options

    def call_metadata(self) -> tuple[tuple[str, str], ...]:
        """Metadata sent with every call."""
        if self.token is None:
            return ()
        return (("authorization", f"Bearer {self.token}"),)
