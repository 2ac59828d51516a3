"""Which call metadata crosses the gateway, and reading the keys the gateway acts on.

Request metadata goes to the instance minus the keys that belong to this hop: HTTP/2
pseudo-headers and connection headers, gRPC's reserved `grpc-*` keys (the gateway sets its
own deadline), the user agent (the gateway's channel sends its own) and the gateway's own
keys, among them `authorization`: the invoke token is for the gateway, never for instances.
Response metadata comes back the same way, except that the rich error details and a retry
pushback from the instance are kept.
"""

from __future__ import annotations

from collections.abc import Iterable

from gpufleet.gateway.errors import RETRY_PUSHBACK_METADATA_KEY
from gpufleet.gateway.route_rules import ROUTE_RULE_METADATA_KEY, ROUTE_TARGET_METADATA_KEY

Metadatum = tuple[str, str | bytes]

DEPLOYMENT_METADATA_KEY = "gpufleet-deployment"
"""Request metadata naming the deployment (or service) of a proxied call."""

AUTHORIZATION_METADATA_KEY = "authorization"
STATUS_DETAILS_METADATA_KEY = "grpc-status-details-bin"

HOP_KEYS = frozenset(
    {
        "connection",
        "content-type",
        "host",
        "keep-alive",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "transfer-encoding",
        "upgrade",
        "user-agent",
    }
)
GATEWAY_REQUEST_KEYS = frozenset(
    {AUTHORIZATION_METADATA_KEY, DEPLOYMENT_METADATA_KEY, ROUTE_RULE_METADATA_KEY}
)
KEPT_RESERVED_TRAILERS = frozenset({STATUS_DETAILS_METADATA_KEY, RETRY_PUSHBACK_METADATA_KEY})


def _hop_specific(key: str) -> bool:
    return key.startswith((":", "grpc-")) or key in HOP_KEYS


def request_metadata_to_forward(metadata: Iterable[Metadatum] | None) -> tuple[Metadatum, ...]:
    """The client's metadata as the instance should see it."""
    return tuple(
        (key, value)
        for key, value in metadata or ()
        if not _hop_specific(key) and key not in GATEWAY_REQUEST_KEYS
    )


def headers_to_return(
    metadata: Iterable[Metadatum] | None, route_target: str
) -> tuple[Metadatum, ...]:
    """The instance's initial metadata as the client should see it, plus
    `deploy-route-target` naming the instance (replacing any the instance set)."""
    kept = tuple(
        (key, value)
        for key, value in metadata or ()
        if not _hop_specific(key) and key != ROUTE_TARGET_METADATA_KEY
    )
    return (*kept, (ROUTE_TARGET_METADATA_KEY, route_target))


def trailers_to_return(metadata: Iterable[Metadatum] | None) -> tuple[Metadatum, ...]:
    """The instance's trailing metadata as the client should see it."""
    return tuple(
        (key, value)
        for key, value in metadata or ()
        if key in KEPT_RESERVED_TRAILERS or not _hop_specific(key)
    )


def first_value(metadata: Iterable[Metadatum] | None, key: str) -> str | bytes | None:
    """The first value of `key` (keys are lowercase on the wire), or None."""
    for found, value in metadata or ():
        if found == key:
            return value
    return None


def first_text(metadata: Iterable[Metadatum] | None, key: str) -> str | None:
    """Like first_value, for a text key; a binary value counts as absent."""
    value = first_value(metadata, key)
    return value if isinstance(value, str) else None


def bearer_token(metadata: Iterable[Metadatum] | None) -> str | None:
    """The token of the first `authorization: Bearer <token>` entry, or None."""
    for key, value in metadata or ():
        if key != AUTHORIZATION_METADATA_KEY or not isinstance(value, str):
            continue
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return None
