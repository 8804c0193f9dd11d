"""The weighted mean: hand-computed means, summed extras, bad input, order independence."""

from __future__ import annotations

import itertools

import pytest
import torch

from consortium.aggregation.base import Aggregate
from consortium.aggregation.mean import weighted_mean
from consortium.errors import PipelineError
from consortium.types import Layout, TensorSpec, Update


def layout(size: int) -> Layout:
    return Layout((TensorSpec("w", (size,), torch.float32),))


def mean_of(updates: list[Update], size: int) -> Aggregate:
    agg = weighted_mean()
    acc = agg.start(layout(size))
    for u in updates:
        acc = agg.accumulate(acc, u)
    return agg.finalize(acc)


def vec(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def test_weighted_mean_of_three_vectors_by_hand() -> None:
    updates = [
        Update("a", vec(1.0, 2.0, 3.0), 1.0),
        Update("b", vec(4.0, 0.0, -2.0), 2.0),
        Update("c", vec(0.0, 6.0, 1.0), 3.0),
    ]
    # Σ wΔ = 1·(1,2,3) + 2·(4,0,-2) + 3·(0,6,1) = (1+8+0, 2+0+18, 3-4+3) = (9, 20, 2); Σ w = 6
    expected = [9 / 6, 20 / 6, 2 / 6]
    out = mean_of(updates, 3)
    assert out.delta.tolist() == pytest.approx(expected, abs=1e-6)
    assert out.delta.dtype == torch.float32
    assert out.weight == 6.0
    assert out.count == 3


def test_two_vectors_with_unequal_weights_are_not_the_plain_mean() -> None:
    # 3·(2, -2) + 1·(6, 2) = (12, -4); / 4 = (3, -1). The unweighted mean would be (4, 0).
    out = mean_of([Update("a", vec(2.0, -2.0), 3.0), Update("b", vec(6.0, 2.0), 1.0)], 2)
    assert out.delta.tolist() == pytest.approx([3.0, -1.0], abs=1e-6)


def test_a_zero_weight_update_counts_but_does_not_move_the_mean() -> None:
    out = mean_of([Update("a", vec(1.0), 2.0), Update("b", vec(100.0), 0.0)], 1)
    assert out.delta.tolist() == pytest.approx([1.0], abs=1e-6)
    assert out.count == 2


def test_extras_are_summed_not_averaged() -> None:
    updates = [
        Update("a", vec(0.0, 0.0), 1.0, extras={"k": vec(1.0, 2.0), "only_a": vec(5.0)}),
        Update("b", vec(0.0, 0.0), 3.0, extras={"k": vec(10.0, 20.0)}),
        Update("c", vec(0.0, 0.0), 4.0, extras={"k": vec(-0.5, 0.25)}),
    ]
    out = mean_of(updates, 2)
    # plain sums, whatever the weights: (1+10-0.5, 2+20+0.25)
    assert out.extras["k"].tolist() == pytest.approx([10.5, 22.25], abs=1e-6)
    assert out.extras["only_a"].tolist() == pytest.approx([5.0])
    assert {v.dtype for v in out.extras.values()} == {torch.float32}


def test_accumulating_does_not_alias_the_first_updates_extras() -> None:
    first = vec(1.0, 1.0)
    mean_of(
        [
            Update("a", vec(0.0, 0.0), 1.0, extras={"k": first}),
            Update("b", vec(0.0, 0.0), 1.0, extras={"k": vec(2.0, 2.0)}),
        ],
        2,
    )
    assert first.tolist() == [1.0, 1.0]


def test_zero_total_weight_raises() -> None:
    with pytest.raises(PipelineError, match="total weight"):
        mean_of([Update("a", vec(1.0), 0.0), Update("b", vec(2.0), 0.0)], 1)


@pytest.mark.parametrize("weight", [-1.0, float("nan")])
def test_negative_or_nan_weight_raises_naming_the_client(weight: float) -> None:
    with pytest.raises(PipelineError, match="'bad'"):
        mean_of([Update("ok", vec(1.0), 1.0), Update("bad", vec(2.0), weight)], 1)


def test_size_mismatch_raises_naming_the_client_and_sizes() -> None:
    with pytest.raises(PipelineError, match=r"'b' sent 2 values, expected 3"):
        mean_of([Update("a", vec(1.0, 2.0, 3.0), 1.0), Update("b", vec(1.0, 2.0), 1.0)], 3)


def test_order_of_accumulation_does_not_change_the_result() -> None:
    # Large values that cancel: summed in float32, 1e7 + 0.125 loses the 0.125 (the spacing of
    # float32 numbers near 1e7 is 1), so the result would depend on the order.
    updates = [
        Update("a", vec(1e7, 3.0), 1.0),
        Update("b", vec(0.125, -1.0), 1.0),
        Update("c", vec(-1e7, 0.5), 1.0),
        Update("d", vec(0.25, 2.0), 2.0),
    ]
    # Σ wΔ = (1e7 + 0.125 - 1e7 + 0.5, 3 - 1 + 0.5 + 4) = (0.625, 6.5); Σ w = 5
    expected = torch.tensor([0.625 / 5, 6.5 / 5])
    for order in itertools.permutations(updates):
        out = mean_of(list(order), 2)
        assert torch.allclose(out.delta, expected, rtol=0, atol=1e-6), [u.client_id for u in order]


def test_random_updates_in_shuffled_orders_agree() -> None:
    g = torch.Generator().manual_seed(0)
    updates = [Update(f"c{i}", torch.randn(50, generator=g), float(1 + i % 7)) for i in range(30)]
    reference = mean_of(updates, 50).delta
    for seed in range(5):
        perm = torch.randperm(len(updates), generator=torch.Generator().manual_seed(seed))
        out = mean_of([updates[i] for i in perm], 50).delta
        assert torch.allclose(out, reference, rtol=0, atol=1e-6)
