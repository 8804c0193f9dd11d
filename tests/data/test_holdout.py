"""Tests for the seeded, stratified hold-out split."""

from __future__ import annotations

import numpy as np
import pytest

from consortium.data.holdout import holdout
from consortium.errors import DataError


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


@pytest.mark.parametrize(
    ("n", "fraction", "expected_out"),
    [(8, 0.25, 2), (10, 0.25, 3), (1, 0.5, 0), (2, 0.1, 1), (10, 0.99, 9), (0, 0.5, 0)],
)
def test_sizes(n: int, fraction: float, expected_out: int) -> None:
    keep, out = holdout(np.zeros(n, dtype=int), fraction=fraction, rng=rng())
    assert (len(keep), len(out)) == (n - expected_out, expected_out)


def test_disjoint_complete_and_sorted() -> None:
    labels = rng(1).integers(0, 3, 50)
    keep, out = holdout(labels, fraction=0.3, rng=rng())
    assert keep.dtype == out.dtype == np.int64
    assert np.all(np.diff(keep) > 0) and np.all(np.diff(out) > 0)
    np.testing.assert_array_equal(np.sort(np.concatenate([keep, out])), np.arange(50))


def test_stratified_keeps_class_proportions_exactly() -> None:
    labels = np.array([0] * 40 + [1] * 20)
    _, out = holdout(rng(3).permutation(labels), fraction=0.25, rng=rng())
    permuted = rng(3).permutation(labels)
    assert np.bincount(permuted[out]).tolist() == [10, 5]


def test_stratified_rounding_gives_the_remainder_to_the_largest_share() -> None:
    # 15 held out of 7 + 7 + 6: quotas 5.25, 5.25, 4.5, so the 6-class gets the extra one.
    labels = np.array([0] * 7 + [1] * 7 + [2] * 6)
    _, out = holdout(labels, fraction=0.75, rng=rng())
    assert np.bincount(labels[out]).tolist() == [5, 5, 5]


def test_unstratified_has_the_right_size() -> None:
    keep, out = holdout(np.zeros(20, dtype=int), fraction=0.25, rng=rng(), stratify=False)
    assert (len(keep), len(out)) == (15, 5)


def test_seeded() -> None:
    labels = rng(1).integers(0, 4, 100)
    a = holdout(labels, fraction=0.2, rng=rng(7))
    b = holdout(labels, fraction=0.2, rng=rng(7))
    c = holdout(labels, fraction=0.2, rng=rng(8))
    assert np.array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_fraction_out_of_range(fraction: float) -> None:
    with pytest.raises(DataError, match=r"in \(0, 1\)"):
        holdout(np.zeros(4, dtype=int), fraction=fraction, rng=rng())
