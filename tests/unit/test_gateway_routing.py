from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpufleet.gateway.route_rules import DEFAULT_RULE, RouteRule, RuleKind, parse_route_rule
from gpufleet.gateway.routing import (
    Chosen,
    EndpointView,
    NoFreeInstance,
    RouteDecision,
    TargetNotFound,
    choose_endpoint,
    rendezvous_owner,
    rendezvous_score,
)

RR = RouteRule(RuleKind.ROUND_ROBIN)
RANDOM = RouteRule(RuleKind.RANDOM)
LEAST = RouteRule(RuleKind.LEAST_REQUEST)
SCALE_OUT = RouteRule(RuleKind.SCALE_OUT)
HASH = RouteRule(RuleKind.HASH, hash_key="session")


def ep(instance_id: str, in_flight: int = 0, free: int = 1, draining: bool = False) -> EndpointView:
    return EndpointView(instance_id, in_flight=in_flight, free_slots=free, draining=draining)


def choose(
    endpoints: Sequence[EndpointView],
    rule: RouteRule = DEFAULT_RULE,
    cursor: str = "",
    seed: int = 0,
    hash_value: str | bytes | None = None,
) -> RouteDecision:
    return choose_endpoint(
        endpoints, rule, cursor=cursor, rng=random.Random(seed), hash_value=hash_value
    )


def owner_of(key: str, ids: Sequence[str]) -> str:
    owner = rendezvous_owner(key, ids)
    assert owner is not None
    return owner


def run_sequence(endpoints: Sequence[EndpointView], rule: RouteRule, calls: int) -> list[str]:
    cursor = ""
    picks: list[str] = []
    for _ in range(calls):
        decision = choose(endpoints, rule, cursor=cursor)
        assert isinstance(decision, Chosen)
        cursor = decision.cursor
        picks.append(decision.instance_id)
    return picks


def test_default_prefers_least_in_flight() -> None:
    endpoints = [
        ep("a", in_flight=3, free=1), ep("b", in_flight=1, free=3), ep("c", in_flight=2, free=2)
    ]
    assert choose(endpoints) == Chosen("b", cursor="b")


def test_default_rotates_among_ties_in_id_order_whatever_the_input_order() -> None:
    endpoints = [ep("c"), ep("a"), ep("b")]
    assert run_sequence(endpoints, DEFAULT_RULE, 7) == ["a", "b", "c", "a", "b", "c", "a"]


def test_default_tie_rotation_skips_busier_instances() -> None:
    endpoints = [
        ep("a", in_flight=0, free=2), ep("b", in_flight=1, free=1), ep("c", in_flight=0, free=2)
    ]
    assert choose(endpoints, cursor="a") == Chosen("c", cursor="c")
    assert choose(endpoints, cursor="c") == Chosen("a", cursor="a")


def test_cursor_survives_removal_of_the_last_chosen_instance() -> None:
    endpoints = [ep("a"), ep("c"), ep("d")]
    assert choose(endpoints, cursor="b") == Chosen("c", cursor="c")


def test_least_request_takes_first_tie_without_rotation() -> None:
    endpoints = [ep("b"), ep("a"), ep("c", in_flight=1, free=1)]
    assert choose(endpoints, LEAST, cursor="a") == Chosen("a", cursor="a")
    assert choose(endpoints, LEAST, cursor="zzz") == Chosen("a", cursor="zzz")


def test_round_robin_ignores_load_but_skips_full_instances() -> None:
    endpoints = [
        ep("a", in_flight=5, free=1), ep("b", in_flight=0, free=0), ep("c", in_flight=0, free=6)
    ]
    assert run_sequence(endpoints, RR, 4) == ["a", "c", "a", "c"]


def test_random_is_uniform_and_deterministic_per_seed() -> None:
    endpoints = [ep("a"), ep("b"), ep("c"), ep("full", free=0)]
    rng = random.Random(7)
    counts: Counter[str] = Counter()
    for _ in range(3000):
        decision = choose_endpoint(endpoints, RANDOM, cursor="", rng=rng)
        assert isinstance(decision, Chosen)
        counts[decision.instance_id] += 1
    assert set(counts) == {"a", "b", "c"}
    assert all(900 <= n <= 1100 for n in counts.values())
    assert choose(endpoints, RANDOM, seed=1) == choose(endpoints, RANDOM, seed=1)


def test_random_source_returning_its_upper_edge_stays_in_range() -> None:
    class Edge:
        def random(self) -> float:
            return 0.9999999999999999

    decision = choose_endpoint([ep("a"), ep("b")], RANDOM, cursor="", rng=Edge())
    assert decision == Chosen("b", cursor="")


@pytest.mark.parametrize("rule", [DEFAULT_RULE, RR, RANDOM, LEAST, SCALE_OUT, HASH])
def test_draining_instances_never_get_new_calls(rule):
    endpoints = [ep("a", draining=True, free=5), ep("b", draining=True, free=5)]
    assert choose(endpoints, rule, hash_value="k") == NoFreeInstance(wait_for=None)
    mixed = endpoints + [ep("c")]
    for seed in range(20):
        decision = choose(mixed, rule, seed=seed, hash_value=f"k{seed}")
        assert isinstance(decision, Chosen) and decision.instance_id == "c"


@pytest.mark.parametrize("rule", [DEFAULT_RULE, RR, RANDOM, LEAST, SCALE_OUT])
def test_no_free_slot_means_wait_for_any(rule):
    assert choose([ep("a", in_flight=2, free=0), ep("b", free=0)], rule) == NoFreeInstance(None)
    assert choose([], rule) == NoFreeInstance(None)


def test_scale_out_routes_like_default_over_the_given_endpoints() -> None:
    endpoints = [ep("a", in_flight=1), ep("b"), ep("c")]
    assert choose(endpoints, SCALE_OUT, cursor="b") == Chosen("c", cursor="c")


def test_instance_target() -> None:
    endpoints = [ep("a"), ep("b", in_flight=1, free=0), ep("c", draining=True)]
    target = parse_route_rule
    assert choose(endpoints, target("a"), cursor="x") == Chosen("a", cursor="x")
    assert choose(endpoints, target("b")) == NoFreeInstance(wait_for="b")
    assert choose(endpoints, target("c")) == TargetNotFound("c")
    assert choose(endpoints, target("zz-404")) == TargetNotFound("zz-404")
    assert choose([], target("a")) == TargetNotFound("a")


def test_hash_is_sticky_and_waits_for_its_owner() -> None:
    endpoints = [ep(f"i{n}") for n in range(5)]
    owner = owner_of("user-42", [e.instance_id for e in endpoints])
    for cursor in ("", "i2", "zz"):
        decision = choose(endpoints, HASH, cursor=cursor, hash_value="user-42")
        assert decision == Chosen(owner, cursor=cursor)
    busy = [ep(owner, in_flight=1, free=0) if e.instance_id == owner else e for e in endpoints]
    assert choose(busy, HASH, hash_value="user-42") == NoFreeInstance(wait_for=owner)
    # bytes and str keys of the same text agree.
    assert choose(endpoints, HASH, hash_value=b"user-42") == Chosen(owner, cursor="")


def test_hash_without_the_key_routes_like_default() -> None:
    endpoints = [ep("a", in_flight=1), ep("b")]
    assert choose(endpoints, HASH, hash_value=None) == Chosen("b", cursor="b")


def test_hash_ignores_draining_owner() -> None:
    ids = [f"i{n}" for n in range(4)]
    owner = owner_of("k", ids)
    endpoints = [ep(i, draining=(i == owner)) for i in ids]
    decision = choose(endpoints, HASH, hash_value="k")
    assert decision == Chosen(owner_of("k", [i for i in ids if i != owner]), cursor="")


def test_rendezvous_score_is_stable_across_processes() -> None:
    # A fixed value: gateways in different processes must agree, so no salted hash().
    assert rendezvous_score("user-42", "echo-1") == rendezvous_score(b"user-42", "echo-1")
    # Pinned: changing the hash would move every sticky session during an upgrade.
    assert rendezvous_score("user-42", "echo-1") == 0x5655001760E64342
    assert rendezvous_owner("k", []) is None


def test_rendezvous_moves_about_one_nth_of_keys_and_only_to_or_from_the_change() -> None:
    ids = [f"inst-{n}" for n in range(10)]
    keys = [f"session-{k}" for k in range(8_000)]
    before = {k: rendezvous_owner(k, ids) for k in keys}

    grown = ids + ["inst-new"]
    after_add = {k: rendezvous_owner(k, grown) for k in keys}
    moved = [k for k in keys if after_add[k] != before[k]]
    assert all(after_add[k] == "inst-new" for k in moved)
    assert abs(len(moved) / len(keys) - 1 / 11) < 0.01

    shrunk = [i for i in ids if i != "inst-3"]
    after_remove = {k: rendezvous_owner(k, shrunk) for k in keys}
    moved = [k for k in keys if after_remove[k] != before[k]]
    assert all(before[k] == "inst-3" for k in moved)
    assert abs(len(moved) / len(keys) - 1 / 10) < 0.01

    load = Counter(before.values())
    assert all(abs(n - 800) < 100 for n in load.values())


@given(
    ids=st.lists(
        st.from_regex(r"[a-z][a-z0-9-]{0,8}", fullmatch=True), min_size=2, max_size=8, unique=True
    ),
    key=st.text(max_size=20),
)
def test_rendezvous_owner_ignores_order_and_unrelated_removals(ids, key):
    owner = rendezvous_owner(key, ids)
    assert rendezvous_owner(key, list(reversed(ids))) == owner
    for other in ids:
        if other != owner:
            assert rendezvous_owner(key, [i for i in ids if i != other]) == owner


@given(
    loads=st.lists(
        st.tuples(st.integers(0, 4), st.integers(0, 4), st.booleans()), min_size=0, max_size=6
    ),
    rule=st.sampled_from([DEFAULT_RULE, RR, RANDOM, LEAST, SCALE_OUT, HASH]),
    seed=st.integers(0, 1000),
)
def test_chosen_instance_always_has_a_free_slot_and_is_not_draining(loads, rule, seed):
    endpoints = [ep(f"i{n}", in_flight=f, free=s, draining=d) for n, (f, s, d) in enumerate(loads)]
    decision = choose(endpoints, rule, seed=seed, hash_value="key")
    usable = [e for e in endpoints if e.free_slots > 0 and not e.draining]
    if isinstance(decision, Chosen):
        chosen = next(e for e in endpoints if e.instance_id == decision.instance_id)
        assert chosen.free_slots > 0 and not chosen.draining
    elif rule is not HASH:
        assert decision == NoFreeInstance(None) and not usable
