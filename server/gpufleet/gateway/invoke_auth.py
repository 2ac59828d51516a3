"""Per-deployment invoke tokens: a call must carry `authorization: Bearer <token>` whose
SHA-256 is the deployment's `invoke_token_sha256` from the route table.

The gateway never sees the token itself, only its hash, so a leaked routing table does not
leak tokens. The hex digests are compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

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
    token = bearer_token(metadata)
    if token is None:
        raise CallError(
            grpc.StatusCode.UNAUTHENTICATED,
            f"calls to deployment {deployment!r} need metadata 'authorization: Bearer "
            "<invoke token>'; the token was shown when the deployment was created (get a "
            f"new one with `gpufleet rotate-token {deployment}`)",
            reason=MISSING_TOKEN,
            metadata={"deployment": deployment},
        )
    if not expected_sha256:
        raise CallError(
            grpc.StatusCode.PERMISSION_DENIED,
            f"deployment {deployment!r} has no invoke token on this gateway, so no call is "
            f"accepted; create one with `gpufleet rotate-token {deployment}`",
            reason=INVALID_TOKEN,
            metadata={"deployment": deployment},
        )
    if not hmac.compare_digest(token_sha256(token).encode(), expected_sha256.encode()):
        raise CallError(
            grpc.StatusCode.PERMISSION_DENIED,
            f"the bearer token is not the invoke token of deployment {deployment!r}; use "
            f"the token shown at create time or by `gpufleet rotate-token {deployment}`",
            reason=INVALID_TOKEN,
            metadata={"deployment": deployment},
        )
