from __future__ import annotations

import pytest

from gpufleet.gateway.route_rules import (
    DEFAULT_RULE,
    ROUTE_RULE_METADATA_KEY,
    RouteRule,
    RouteRuleError,
    RuleKind,
    parse_route_rule,
)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, DEFAULT_RULE),
        ("", DEFAULT_RULE),
        ("   ", DEFAULT_RULE),
        ("round-robin", RouteRule(RuleKind.ROUND_ROBIN)),
        ("random", RouteRule(RuleKind.RANDOM)),
        ("least-request", RouteRule(RuleKind.LEAST_REQUEST)),
        ("scale-out", RouteRule(RuleKind.SCALE_OUT)),
        (" Round-Robin ", RouteRule(RuleKind.ROUND_ROBIN)),
        ("SCALE-OUT", RouteRule(RuleKind.SCALE_OUT)),
        ("hash:session-id", RouteRule(RuleKind.HASH, hash_key="session-id")),
        ("hash:Session-ID", RouteRule(RuleKind.HASH, hash_key="session-id")),
        ("HASH: user.id_2 ", RouteRule(RuleKind.HASH, hash_key="user.id_2")),
        ("echo-7f3a9c", RouteRule(RuleKind.INSTANCE, instance_id="echo-7f3a9c")),
        ("Echo_1.a", RouteRule(RuleKind.INSTANCE, instance_id="Echo_1.a")),
        ("x" * 128, RouteRule(RuleKind.INSTANCE, instance_id="x" * 128)),
    ],
)
def test_parses_every_valid_form(value, expected):
    assert parse_route_rule(value) == expected


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("hash:", "needs a metadata key"),
        ("hash:  ", "needs a metadata key"),
        ("hash:bad key", "not a valid gRPC metadata key"),
        ("hash:k=v", "not a valid gRPC metadata key"),
        ("-leading-dash", "not a known rule"),
        ("two words", "not a known rule"),
        ("round_robin!", "not a known rule"),
        ("x" * 129, "not a known rule"),
        ("échо", "not a known rule"),
        ("weighted:3", "not a known rule"),
    ],
)
def test_rejects_bad_values_with_the_valid_forms(value, problem):
    with pytest.raises(RouteRuleError) as caught:
        parse_route_rule(value)
    message = str(caught.value)
    assert problem in message
    assert ROUTE_RULE_METADATA_KEY in message
    for form in ("round-robin", "random", "least-request", "scale-out", "hash:<metadata-key>"):
        assert form in message
    assert caught.value.value == value
    assert isinstance(caught.value, ValueError)
