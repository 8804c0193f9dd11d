"""The estimators on games whose Shapley values are known by hand."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from consortium.contribution.shapley import (
    MAX_EXACT_PLAYERS,
    CountingGame,
    exact_shapley,
    gtg_shapley,
    leave_one_out,
    tmc_shapley,
)
from consortium.errors import ConfigError


def glove(s: frozenset) -> float:
    """The glove game: a, b hold left gloves, c the right one; a pair is worth 1.
    Shapley: c = 2/3, a = b = 1/6 (each ordering: c is pivotal unless it comes first)."""
    return 1.0 if "c" in s and ("a" in s or "b" in s) else 0.0


def weighted(s: frozenset) -> float:
    """Additive game plus a pair synergy: v = Σ wᵢ + 3·[x, y both in S]; d is a dummy."""
    w = {"x": 1.0, "y": 2.0, "z": 0.5, "d": 0.0}
    return sum(w[p] for p in s) + (3.0 if {"x", "y"} <= s else 0.0)


def test_glove_game_by_hand() -> None:
    est = exact_shapley(["a", "b", "c"], glove)
    assert est.values["c"] == pytest.approx(2 / 3)
    assert est.values["a"] == pytest.approx(1 / 6)
    assert est.values["b"] == pytest.approx(1 / 6)
    assert est.evaluations == 8


def test_efficiency_symmetry_and_dummy() -> None:
    players = ["x", "y", "z", "d"]
    est = exact_shapley(players, weighted)
    # efficiency: Σ φ = v(N) − v(∅)
    assert sum(est.values.values()) == pytest.approx(weighted(frozenset(players)) - 0.0)
    # the synergy is split equally between x and y; z gets its weight; the dummy 0
    assert est.values["x"] == pytest.approx(1.0 + 1.5)
    assert est.values["y"] == pytest.approx(2.0 + 1.5)
    assert est.values["z"] == pytest.approx(0.5)
    assert est.values["d"] == pytest.approx(0.0, abs=1e-12)
    sym = exact_shapley(["a", "b", "c"], glove)
    assert sym.values["a"] == sym.values["b"]


def test_exact_matches_permutation_definition() -> None:
    """Against the average marginal over all n! orders (the definition), on a random game."""
    rng = np.random.default_rng(3)
    players = list("pqrst")
    table = {frozenset(s): float(rng.normal()) for k in range(6)
             for s in itertools.combinations(players, k)}
    est = exact_shapley(players, table.__getitem__)
    ref = dict.fromkeys(players, 0.0)
    orders = list(itertools.permutations(players))
    for order in orders:
        prefix: frozenset = frozenset()
        for p in order:
            ref[p] += (table[prefix | {p}] - table[prefix]) / len(orders)
            prefix = prefix | {p}
    for p in players:
        assert est.values[p] == pytest.approx(ref[p], abs=1e-12)


def test_leave_one_out_by_hand() -> None:
    est = leave_one_out(["a", "b", "c"], glove)
    # removing a or b leaves a pair; removing c leaves none
    assert est.values == {"a": 0.0, "b": 0.0, "c": 1.0}
    assert est.evaluations == 4


def test_tmc_close_to_exact_and_states_its_error() -> None:
    players = ["x", "y", "z", "d"]
    exact = exact_shapley(players, weighted).values
    est = tmc_shapley(players, weighted, permutations=400, truncation=0.0,
                      rng=np.random.default_rng(0))
    assert est.permutations == 400
    for p in players:
        assert abs(est.values[p] - exact[p]) <= 4 * est.standard_error[p] + 1e-9
    assert est.standard_error["x"] > 0 and est.standard_error["d"] == 0


def test_gtg_close_to_exact_deterministic_and_truncates() -> None:
    players = ["x", "y", "z", "d"]
    exact = exact_shapley(players, weighted).values

    def run(seed: int):
        return gtg_shapley(players, weighted, max_permutations=200, truncation=0.0, between=0.0,
                           convergence=0.01, rng=np.random.default_rng(seed))

    est = run(1)
    assert est.values == run(1).values  # the same seed, the same estimate
    for p in players:
        assert est.values[p] == pytest.approx(exact[p], abs=0.6)
    assert est.values["d"] == 0.0
    # between-round truncation: a round that moved v by less than `between` is not valued
    flat = gtg_shapley(players, lambda s: 1.0, max_permutations=50, truncation=0.0,
                       between=0.01, convergence=0.05, rng=np.random.default_rng(0))
    assert flat.truncated and set(flat.values.values()) == {0.0} and flat.evaluations == 2


def test_within_round_truncation_saves_evaluations() -> None:
    """Once a prefix is within `truncation` of v(N), the rest are not evaluated."""
    players = [f"p{i}" for i in range(8)]
    calls = CountingGame(lambda s: min(len(s), 2) / 2)  # saturates after two players
    est = tmc_shapley(players, calls, permutations=30, truncation=1e-9,
                      rng=np.random.default_rng(0))
    # only coalitions of size <= 2 (and N) are ever evaluated
    assert all(len(s) <= 2 or len(s) == 8 for s in calls.cache)
    assert sum(est.values.values()) == pytest.approx(1.0)


def test_exact_refuses_more_than_ten_players() -> None:
    players = [str(i) for i in range(MAX_EXACT_PLAYERS + 1)]
    with pytest.raises(ConfigError, match="2\\^11 = 2,048.*gtg-shapley.*leave-one-out"):
        exact_shapley(players, lambda s: 0.0)
