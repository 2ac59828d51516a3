from __future__ import annotations

import random
from collections import Counter

import pytest

from gpufleet.gateway.traffic_split import (
    SmoothState,
    WeightedTarget,
    choose_weighted,
    smooth_weighted_choice,
)

CANARY = [WeightedTarget("stable", 900), WeightedTarget("canary", 100)]


def smooth_run(
    targets: list[WeightedTarget], calls: int, state: SmoothState | None = None
) -> tuple[list[str | None], SmoothState]:
    state = state or SmoothState()
    picks: list[str | None] = []
    for _ in range(calls):
        name, state = smooth_weighted_choice(targets, state)
        picks.append(name)
    return picks, state


def test_smooth_canary_split_is_exact_over_2000_calls() -> None:
    picks, _ = smooth_run(CANARY, 2000)
    share = Counter(picks)["canary"] / 2000
    assert abs(share - 0.10) <= 0.03
    assert Counter(picks) == {"stable": 1800, "canary": 200}


def test_smooth_split_interleaves_instead_of_runs() -> None:
    picks, _ = smooth_run(CANARY, 1000)
    # Every window of 10 consecutive calls has exactly one canary call.
    for start in range(0, 1000, 10):
        assert picks[start : start + 10].count("canary") == 1


def test_random_canary_split_within_3_percent_at_a_fixed_seed() -> None:
    rng = random.Random(20240611)
    counts = Counter(choose_weighted(CANARY, rng) for _ in range(2000))
    assert abs(counts["canary"] / 2000 - 0.10) <= 0.03
    assert counts["stable"] + counts["canary"] == 2000


def test_random_choice_is_deterministic_given_the_source() -> None:
    def draws(targets: list[WeightedTarget]) -> list[str | None]:
        rng = random.Random(5)
        return [choose_weighted(targets, rng) for _ in range(50)]

    assert draws(CANARY) == draws(CANARY)
    # Input order does not matter.
    assert draws(CANARY) == draws(list(reversed(CANARY)))
    assert set(draws(CANARY)) == {"stable", "canary"}


@pytest.mark.parametrize(
    "weights",
    [{"a": 1, "b": 1}, {"a": 3, "b": 1, "c": 0}, {"a": 1000, "b": 1}, {"a": 7, "b": 5, "c": 2}],
)
def test_smooth_gives_exact_shares_per_cycle(weights):
    targets = [WeightedTarget(n, w) for n, w in weights.items()]
    total = sum(weights.values())
    picks, state = smooth_run(targets, total * 3)
    assert Counter(picks) == {n: 3 * w for n, w in weights.items() if w}
    # After whole cycles the state returns to zero.
    assert all(v == 0 for _, v in state.current)


def test_zero_weights_and_empty_services_have_no_target() -> None:
    zero = [WeightedTarget("a", 0), WeightedTarget("b", 0)]
    assert choose_weighted(zero, random.Random(1)) is None
    assert choose_weighted([], random.Random(1)) is None
    assert smooth_weighted_choice(zero, SmoothState()) == (None, SmoothState())
    only = [WeightedTarget("a", 0), WeightedTarget("b", 5)]
    assert {choose_weighted(only, random.Random(s)) for s in range(50)} == {"b"}


def test_upper_edge_of_the_random_source_picks_the_last_weighted_target() -> None:
    class Edge:
        def random(self):
            return 1.0

    assert choose_weighted([WeightedTarget("a", 5), WeightedTarget("z", 0)], Edge()) == "a"


def test_smooth_state_forgets_removed_targets_and_starts_new_ones_at_zero() -> None:
    _, state = smooth_run(CANARY, 3)
    blue_green = [WeightedTarget("stable", 900), WeightedTarget("blue", 900)]
    name, state = smooth_weighted_choice(blue_green, state)
    assert dict(state.current).keys() == {"stable", "blue"}
    assert name in {"stable", "blue"}


@pytest.mark.parametrize(
    ("targets", "problem"),
    [
        ([WeightedTarget("a", 1001)], "must be 0-1000"),
        ([WeightedTarget("a", -1)], "must be 0-1000"),
        ([WeightedTarget("a", 1), WeightedTarget("a", 2)], "appears twice"),
    ],
)
def test_rejects_bad_weights(targets, problem):
    with pytest.raises(ValueError, match=problem):
        choose_weighted(targets, random.Random(0))
    with pytest.raises(ValueError, match=problem):
        smooth_weighted_choice(targets, SmoothState())
