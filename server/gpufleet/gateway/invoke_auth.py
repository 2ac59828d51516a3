"""Per-deployment invoke tokens: a call must carry `authorization: Bearer <token>` whose
SHA-256 is the deployment's `invoke_token_sha256` from the route table.

The gateway never sees the token itself, only its hash, so a leaked routing table does not
leak tokens. The hex digests are compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Sequence

import grpc

from gpufleet.gateway.metadata import Metadatum, bearer_token
from gpufleet.gateway.rpc_errors import INVALID_TOKEN, MISSING_TOKEN, CallError


def token_sha256(token: str) -> str:
    """Lowercase hex SHA-256 of a token (what the control plane stores and sends)."""
    return hashlib.sha256(token.encode()).hexdigest()


def check_invoke_token(
    metadata: Iterable[Metadatum] | None, deployment: str, expected_sha256: str
) -> None:
    """Accept the call or raise CallError: UNAUTHENTICATED without a bearer token,
    PERMISSION_DENIED with a token whose hash is not `expected_sha256`."""
    check_invoke_token_for(metadata, deployment, (expected_sha256,))


def check_invoke_token_for(
    metadata: Iterable[Metadatum] | None, name: str, accepted_sha256: Sequence[str]
) -> None:
    """Like check_invoke_token for a call to `name`, which may be a service: the token of
    any of its deployments is accepted (`accepted_sha256`), because a client of a canary
    split holds one token and cannot know which deployment the split will pick."""
    token = bearer_token(metadata)
    if token is None:
        raise CallError(
            grpc.StatusCode.UNAUTHENTICATED,
            f"calls to {name!r} need metadata 'authorization: Bearer <invoke token>'; the "
            "token was shown when the deployment was created (get a new one with "
            f"`gpufleet rotate-token {name}`)",
            reason=MISSING_TOKEN,
            metadata={"deployment": name},
        )
    usable = [digest for digest in accepted_sha256 if digest]
    if not usable:
        raise CallError(
            grpc.StatusCode.PERMISSION_DENIED,
            f"{name!r} has no invoke token on this gateway, so no call is accepted; create "
            f"one with `gpufleet rotate-token {name}`",
            reason=INVALID_TOKEN,
            metadata={"deployment": name},
        )
    presented = token_sha256(token).encode()
    # Compare against every digest (no early exit) so the time taken does not tell which
    # deployment of a service a guessed token is closest to.
    matches = [hmac.compare_digest(presented, digest.lower().encode()) for digest in usable]
    if not any(matches):
        raise CallError(
            grpc.StatusCode.PERMISSION_DENIED,
            f"the bearer token is not an invoke token of {name!r}; use the token shown at "
            f"create time or by `gpufleet rotate-token {name}`",
            reason=INVALID_TOKEN,
            metadata={"deployment": name},
        )
