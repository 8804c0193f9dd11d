"""The update norm bound (``aggregation/bound.py``): hand-computed rounds, honest rounds untouched
bit for bit, and where the server can and cannot apply it."""

from __future__ import annotations

import math

import pytest
import torch

from consortium.aggregation.base import Pipeline, RoundContext
from consortium.aggregation.bound import BoundedUpdates, bound_updates, update_norm
from consortium.aggregation.mean import weighted_mean
from consortium.aggregation.robust import make_rule
from consortium.errors import ConfigError
from consortium.types import Layout, TensorSpec, Update

LAYOUT = Layout((TensorSpec("w", (2,), torch.float32),))
CTX = RoundContext(round=1, seed=0, population=4, sampled=4, layout=LAYOUT)


def _updates(norms: list[float], weights: list[float] | None = None) -> list[Update]:
    weights = weights or [1.0] * len(norms)
    # along one axis, so each norm is exact and the scaled value can be checked exactly
    return [Update(f"c{i}", torch.tensor([n, 0.0]), w) for i, (n, w) in enumerate(zip(norms, weights))]


def test_norms_1_2_3_100_with_multiplier_3_bound_the_100_to_7_5() -> None:
    """Median of 1, 2, 3, 100 is 2.5; 3 × 2.5 = 7.5; only the 100 is scaled, to 7.5 exactly."""
    bounded, info = BoundedUpdates(weighted_mean(), 3.0).bound(_updates([1, 2, 3, 100]))
    assert info["update_bound"] == 7.5
    assert info["update_bound_clipped"] == {"c3": 0.075}
    assert [u.delta.tolist() for u in bounded] == [[1, 0], [2, 0], [3, 0], [7.5, 0]]
    agg = BoundedUpdates(weighted_mean(), 3.0).aggregate(_updates([1, 2, 3, 100]), ctx=CTX)
    assert agg.delta.tolist() == [(1 + 2 + 3 + 7.5) / 4, 0.0]
    assert agg.info["update_bound"] == 7.5


def test_a_round_within_the_bound_passes_the_very_same_updates() -> None:
    updates = _updates([1, 2, 3, 7.5])
    bounded, info = BoundedUpdates(weighted_mean(), 3.0).bound(updates)
    assert all(a is b for a, b in zip(bounded, updates))
    assert "update_bound_clipped" not in info
    plain = weighted_mean()
    acc = plain.start(LAYOUT)
    for u in updates:
        acc = plain.accumulate(acc, u)
    expected = plain.finalize(acc).delta
    got = BoundedUpdates(weighted_mean(), 3.0).aggregate(updates, ctx=CTX).delta
    assert torch.equal(got, expected)


def test_all_zero_updates_are_left_alone() -> None:
    bounded, info = BoundedUpdates(weighted_mean(), 3.0).bound(_updates([0, 0, 0]))
    assert info == {"update_bound": 0.0}
    assert all(u.delta.tolist() == [0, 0] for u in bounded)


def test_a_huge_weight_moves_the_mean_by_at_most_the_bound() -> None:
    """The review's takeover: weight inflation and a long delta together; the mean of vectors
    of norm ≤ B is within B whatever the weights."""
    updates = _updates([1, 1, 1, 1e6], weights=[90, 90, 90, 1e9])
    agg = BoundedUpdates(weighted_mean(), 3.0).aggregate(updates, ctx=CTX)
    assert float(torch.linalg.vector_norm(agg.delta)) <= 3.0


def test_an_update_of_3e38_is_scaled_to_a_finite_bound() -> None:
    updates = [Update(f"c{i}", torch.tensor([0.6, 0.8]), 1.0) for i in range(3)]
    updates.append(Update("evil", torch.full((2,), 3e38), 1.0))
    agg = BoundedUpdates(weighted_mean(), 3.0).aggregate(updates, ctx=CTX)
    assert torch.isfinite(agg.delta).all()
    evil = agg.info["update_bound_clipped"]["evil"]
    assert evil == pytest.approx(3.0 / (3e38 * math.sqrt(2)), rel=1e-3)


def test_non_finite_updates_are_left_out_and_named() -> None:
    updates = _updates([1, 2, 3]) + [Update("nan", torch.tensor([math.nan, 0.0]), 1.0)]
    agg = BoundedUpdates(weighted_mean(), 3.0).aggregate(updates, ctx=CTX)
    assert agg.info["update_bound_dropped"] == ["nan"] and agg.count == 3
    assert agg.delta.tolist() == [2.0, 0.0]


def test_the_norm_is_measured_in_float64_blocks() -> None:
    assert update_norm(torch.full((3 << 20,), 1e30)) == pytest.approx(1e30 * math.sqrt(3 << 20))
    assert math.isinf(update_norm(torch.tensor([math.inf, 1.0])))


def test_a_robust_rule_runs_on_the_bounded_updates() -> None:
    """The bound comes before the rule; the rule's own record stays."""
    updates = _updates([1, 2, 3, 100])
    agg = BoundedUpdates(make_rule("trimmed-mean", beta=0.25), 3.0).aggregate(updates, ctx=CTX)
    assert agg.delta.tolist() == [2.5, 0.0]  # trimmed mean of 1, 2, 3, 7.5
    assert agg.info["robust_rule"] == "trimmed-mean" and agg.info["update_bound"] == 7.5


def test_a_stateful_rule_keeps_its_state_through_the_bound() -> None:
    rule = make_rule("centered-clipping", tau=100.0)
    bounded = BoundedUpdates(rule, 3.0)
    pipe = Pipeline(aggregator=bounded)
    assert pipe.stateful
    state = pipe.init(LAYOUT)
    agg, state = pipe.aggregate(_updates([1, 2, 3, 100]), state, CTX)
    assert agg is not None and torch.equal(state.aggregator["center"], agg.delta)
    assert agg.delta.tolist() == [(1 + 2 + 3 + 7.5) / 4, 0.0]


def test_where_the_server_cannot_see_single_updates_the_bound_is_not_applied() -> None:
    from consortium.privacy.central import central_dp
    from consortium.secagg.stage import secure_aggregation

    mean = weighted_mean()
    assert bound_updates(mean, 0.0) is mean
    assert isinstance(bound_updates(mean, 3.0), BoundedUpdates)
    assert bound_updates(mean, 3.0, stages=[secure_aggregation()[0]]) is mean
    assert bound_updates(mean, 3.0, stages=[central_dp(1.0, 0.5)]) is mean


@pytest.mark.parametrize("value", [-1.0, math.nan, math.inf])
def test_a_bound_that_is_not_a_finite_non_negative_number_is_refused(value: float) -> None:
    with pytest.raises(ConfigError, match="update_bound"):
        bound_updates(weighted_mean(), value)
