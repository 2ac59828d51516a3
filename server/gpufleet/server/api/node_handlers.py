"""NodeService.Register as a plain function: (store, credentials, request) -> response.

A new node needs a valid join token and gets a fresh id ("node-<8 hex>") and secret (only
its SHA-256 is stored). A node that registers again with its id and secret keeps both: the
secret is not rotated, so an agent that crashed before it saved the answer still holds
valid credentials. Name and labels are replaced by the new request. An unknown node id
(e.g. a control plane whose database was replaced) registers as a new node, which needs
the join token again.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping

from gpufleet.server.auth import NodeCredentials
from gpufleet.server.errors import (
    InvalidArgument,
    PermissionDenied,
    Unauthenticated,
    Violation,
)
from gpufleet.server.join_tokens import JoinTokenCheck, check_join_token
from gpufleet.server.store import Store
from gpufleet.server.tokens import sha256_hex
from gpufleet.server.validation import LABEL_VALUE_MAX_LENGTH, MAX_LABELS
from gpufleet.v1 import node_pb2, node_service_pb2 as pb

NODE_NAME_MAX_LENGTH = 253
# Same rule as deployment labels (validation.py): node selectors match these keys.
_LABEL_KEY = re.compile(r"[A-Za-z0-9._/-]{1,63}")


def validate_register(request: pb.RegisterRequest) -> list[Violation]:
    """Node name 1-253 printable characters; labels as deployment labels."""
    out: list[Violation] = []
    name = request.node_name
    if not name or len(name) > NODE_NAME_MAX_LENGTH or not name.isprintable():
        out.append(
            Violation(
                "node_name",
                f"must be 1-{NODE_NAME_MAX_LENGTH} printable characters (the agent sends its "
                f"hostname by default); got {len(name)} character(s)",
            )
        )
    out.extend(_label_violations(request.labels))
    return out


def _label_violations(labels: Mapping[str, str]) -> list[Violation]:
    out: list[Violation] = []
    if len(labels) > MAX_LABELS:
        out.append(Violation("labels", f"must have at most {MAX_LABELS} labels; got {len(labels)}"))
    for key in sorted(labels):
        field = f"labels[{key!r}]"
        if _LABEL_KEY.fullmatch(key) is None:
            out.append(
                Violation(
                    field,
                    "key must be 1-63 characters of letters, digits, '.', '_', '/' and '-'",
                )
            )
        if len(labels[key]) > LABEL_VALUE_MAX_LENGTH:
            out.append(
                Violation(
                    field,
                    f"value must be at most {LABEL_VALUE_MAX_LENGTH} characters; got "
                    f"{len(labels[key])}",
                )
            )
    return out


async def register(
    store: Store,
    credentials: NodeCredentials,
    request: pb.RegisterRequest,
    *,
    heartbeat_interval_seconds: int,
    now_us: int,
) -> pb.RegisterResponse:
    """Register a new node, or re-register a known one (see the module docstring)."""
    if request.node_id and credentials.known(request.node_id):
        if not request.node_secret:
            raise Unauthenticated(
                f"node {request.node_id} is registered: send its node_secret with the node_id "
                "to register again"
            )
        if not credentials.verify(request.node_id, request.node_secret):
            raise PermissionDenied(
                f"node {request.node_id} is registered with another secret; use the secret "
                "the agent stored, or delete the agent's state dir to join as a new node"
            )
        _raise_if(validate_register(request))
        return await _reregister(store, request, heartbeat_interval_seconds)
    if not request.join_token:
        raise Unauthenticated(
            "Register needs a join_token: pass the agent --join-token <token>; the control "
            "plane keeps it in <state-dir>/join-token"
        )
    verdict = await check_join_token(store, request.join_token, now_us)
    if verdict is not JoinTokenCheck.VALID:
        raise PermissionDenied(
            f"the join token is {verdict.value}; use the one in <state-dir>/join-token on the "
            "control plane host"
        )
    _raise_if(validate_register(request))
    node_id = _new_node_id(credentials)
    secret = secrets.token_urlsafe(32)
    secret_hash = sha256_hex(secret)
    await store.put_node(
        node_pb2.Node(id=node_id, name=request.node_name, labels=dict(request.labels)),
        secret_hash,
    )
    credentials.set(node_id, secret_hash)
    return pb.RegisterResponse(
        node_id=node_id,
        node_secret=secret,
        heartbeat_interval_seconds=heartbeat_interval_seconds,
    )


async def _reregister(
    store: Store, request: pb.RegisterRequest, heartbeat_interval_seconds: int
) -> pb.RegisterResponse:
    records = {r.node.id: r for r in await store.list_node_records()}
    record = records[request.node_id]
    node = node_pb2.Node()
    node.CopyFrom(record.node)
    node.name = request.node_name
    node.labels.clear()
    node.labels.update(request.labels)
    await store.put_node(node, record.secret_sha256)
    return pb.RegisterResponse(
        node_id=request.node_id,
        node_secret=request.node_secret,
        heartbeat_interval_seconds=heartbeat_interval_seconds,
    )


def _new_node_id(credentials: NodeCredentials) -> str:
    while True:
        candidate = f"node-{secrets.token_hex(4)}"
        if not credentials.known(candidate):
            return candidate


def _raise_if(violations: list[Violation]) -> None:
    if violations:
        raise InvalidArgument(violations)
