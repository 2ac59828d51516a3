"""Parsing of the `deploy-route-rule` request metadata value.

Forms (keywords are case-insensitive, surrounding blanks are ignored):

- absent or empty: the default rule (least in flight, ties taken in turn);
- `round-robin`, `random`, `least-request`, `scale-out`;
- `hash:<metadata-key>`: sticky sessions keyed by the value of that request metadata key;
- anything else that is a valid instance id: send the call to that instance.

See `routing.py` for what each rule does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

ROUTE_RULE_METADATA_KEY = "deploy-route-rule"
"""Request metadata key that carries the route rule."""

ROUTE_TARGET_METADATA_KEY = "deploy-route-target"
"""Response header metadata key naming the instance that served the call."""

_HASH_PREFIX = "hash:"
# gRPC metadata keys are lowercase ASCII from this set (HTTP/2 header names).
_METADATA_KEY = re.compile(r"[0-9a-z_.-]{1,255}")
# Instance ids look like "echo-7f3a9c": a deployment name plus a suffix.
_INSTANCE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")

VALID_FORMS = (
    "round-robin, random, least-request, scale-out, hash:<metadata-key> "
    "(key of [0-9a-z_.-]), or an instance id such as 'echo-7f3a9c' "
    "(1-128 characters of [A-Za-z0-9._-], starting with a letter or digit)"
)
"""Human readable list of the accepted forms, used in parse error messages."""


class RuleKind(Enum):
    """Which routing strategy a call asked for."""

    DEFAULT = "default"
    ROUND_ROBIN = "round-robin"
    RANDOM = "random"
    LEAST_REQUEST = "least-request"
    SCALE_OUT = "scale-out"
    HASH = "hash"
    INSTANCE = "instance"


@dataclass(frozen=True, slots=True)
class RouteRule:
    """A parsed route rule."""

    kind: RuleKind
    """The strategy."""
    hash_key: str = ""
    """For HASH: the request metadata key whose value picks the instance (lowercase)."""
    instance_id: str = ""
    """For INSTANCE: the instance the call must run on."""


DEFAULT_RULE = RouteRule(RuleKind.DEFAULT)

_KEYWORDS = {
    RuleKind.ROUND_ROBIN.value: RouteRule(RuleKind.ROUND_ROBIN),
    RuleKind.RANDOM.value: RouteRule(RuleKind.RANDOM),
    RuleKind.LEAST_REQUEST.value: RouteRule(RuleKind.LEAST_REQUEST),
    RuleKind.SCALE_OUT.value: RouteRule(RuleKind.SCALE_OUT),
}


class RouteRuleError(ValueError):
    """The route rule value is not one of the accepted forms (maps to INVALID_ARGUMENT)."""

    def __init__(self, value: str, problem: str) -> None:
        super().__init__(
            f"invalid {ROUTE_RULE_METADATA_KEY} value {value!r}: {problem}; "
            f"use one of: {VALID_FORMS}"
        )
        self.value = value
        """The rejected metadata value."""


def parse_route_rule(value: str | None) -> RouteRule:
    """Parse a `deploy-route-rule` value; None or blank means the default rule.

    Raises RouteRuleError for a value that matches no accepted form.
    """
    if value is None:
        return DEFAULT_RULE
    text = value.strip()
    if not text:
        return DEFAULT_RULE
    keyword = _KEYWORDS.get(text.lower())
    if keyword is not None:
        return keyword
    if text.lower().startswith(_HASH_PREFIX):
        # Metadata keys arrive lowercased from gRPC, so the key is compared lowercased too.
        key = text[len(_HASH_PREFIX) :].strip().lower()
        if not key:
            raise RouteRuleError(value, "hash: needs a metadata key, e.g. hash:session-id")
        if not _METADATA_KEY.fullmatch(key):
            raise RouteRuleError(value, f"{key!r} is not a valid gRPC metadata key")
        return RouteRule(RuleKind.HASH, hash_key=key)
    if _INSTANCE_ID.fullmatch(text):
        return RouteRule(RuleKind.INSTANCE, instance_id=text)
    raise RouteRuleError(value, "not a known rule and not a valid instance id")
