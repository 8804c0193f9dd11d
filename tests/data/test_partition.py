"""Tests for the partitioners: disjoint and complete, seeded, skewed as their papers say."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from consortium.data import partition as P
from consortium.errors import DataError

# 10 classes x 30 samples, shuffled so that no partitioner can rely on the input order.
LABELS = np.random.default_rng(123).permutation(np.repeat(np.arange(10), 30))

Partitioner = Callable[[np.random.Generator], list[np.ndarray]]

PARTITIONERS: dict[str, Partitioner] = {
    "iid": lambda rng: P.iid(len(LABELS), 7, rng=rng),
    "dirichlet": lambda rng: P.dirichlet(LABELS, 7, alpha=0.5, rng=rng),
    "shards": lambda rng: P.shards(LABELS, 7, shards_per_client=2, rng=rng),
    "quantity": lambda rng: P.quantity(len(LABELS), 7, sigma=1.0, rng=rng),
}


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def assert_partition(parts: list[np.ndarray], n: int) -> None:
    """Disjoint, complete, sorted int64 index arrays."""
    for p in parts:
        assert p.dtype == np.int64
        assert np.all(np.diff(p) > 0), "indices must be sorted and unique within a client"
    joined = np.sort(np.concatenate(parts))
    np.testing.assert_array_equal(joined, np.arange(n))


def label_share(parts: list[np.ndarray], labels: np.ndarray, k: int) -> np.ndarray:
    return np.stack([np.bincount(labels[p], minlength=k) / len(p) for p in parts])


@pytest.mark.parametrize("name", PARTITIONERS)
def test_disjoint_and_complete(name: str) -> None:
    for seed in range(3):
        parts = PARTITIONERS[name](rng(seed))
        assert len(parts) == 7
        assert all(len(p) >= 1 for p in parts)
        assert_partition(parts, len(LABELS))


@pytest.mark.parametrize("name", PARTITIONERS)
def test_same_seed_same_result_other_seed_other_result(name: str) -> None:
    a, b, c = (PARTITIONERS[name](rng(s)) for s in (5, 5, 6))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_iid_sizes_differ_by_at_most_one() -> None:
    sizes = [len(p) for p in P.iid(10, 3, rng=rng(0))]
    assert sorted(sizes) == [3, 3, 4]


def test_iid_label_shares_are_close_to_the_whole() -> None:
    parts = P.iid(len(LABELS), 3, rng=rng(0))
    shares = label_share(parts, LABELS, 10)
    assert np.abs(shares - 0.1).max() < 0.08


def test_iid_errors() -> None:
    with pytest.raises(DataError, match="at least 1 client"):
        P.iid(10, 0, rng=rng(0))
    with pytest.raises(DataError, match="found 3"):
        P.iid(3, 4, rng=rng(0))


def _mean_distance_from_uniform(alpha: float) -> float:
    """Average total-variation distance of client label shares from the global (uniform) one."""
    out = []
    for seed in range(5):
        parts = P.dirichlet(LABELS, 10, alpha=alpha, rng=rng(seed))
        shares = label_share(parts, LABELS, 10)
        out.append(0.5 * np.abs(shares - 0.1).sum(axis=1).mean())
    return float(np.mean(out))


def test_dirichlet_small_alpha_is_more_skewed_than_large_alpha() -> None:
    skewed, near_iid = _mean_distance_from_uniform(0.05), _mean_distance_from_uniform(1000.0)
    assert skewed > 0.6
    assert near_iid < 0.15
    assert skewed > near_iid + 0.4


def test_dirichlet_respects_min_size() -> None:
    for seed in range(5):
        parts = P.dirichlet(LABELS, 10, alpha=0.1, rng=rng(seed), min_size=15)
        assert min(len(p) for p in parts) >= 15
        assert_partition(parts, len(LABELS))


def test_dirichlet_one_client_gets_everything() -> None:
    (only,) = P.dirichlet(LABELS, 1, alpha=0.5, rng=rng(0))
    np.testing.assert_array_equal(only, np.arange(len(LABELS)))


def test_dirichlet_errors() -> None:
    with pytest.raises(DataError, match="needs at least 12 samples, found 10"):
        P.dirichlet(np.zeros(10, dtype=int), 12, alpha=1.0, rng=rng(0))
    with pytest.raises(DataError, match="alpha > 0"):
        P.dirichlet(LABELS, 3, alpha=0.0, rng=rng(0))
    # One class and a tiny alpha: almost surely a single client takes the whole class,
    # so no draw gives 5 clients 2 samples each.
    with pytest.raises(DataError, match="larger alpha or fewer clients"):
        P.dirichlet(np.zeros(10, dtype=int), 5, alpha=1e-3, rng=rng(0), min_size=2)
    with pytest.raises(DataError, match="1-D"):
        P.dirichlet(np.zeros((4, 2)), 2, alpha=1.0, rng=rng(0))


def test_shards_hand_checked() -> None:
    # 4 labels x 4 samples, 4 clients x 2 shards: 8 shards of 2, each of a single label.
    labels = np.repeat(np.arange(4), 4)
    parts = P.shards(labels, 4, shards_per_client=2, rng=rng(0))
    assert_partition(parts, 16)
    assert [len(p) for p in parts] == [4, 4, 4, 4]
    for p in parts:
        assert len(np.unique(labels[p])) <= 2
        # Two shards of two: every label a client holds, it holds an even number of times.
        assert all(count % 2 == 0 for count in np.bincount(labels[p]))


@pytest.mark.parametrize("per_client", [1, 2, 3])
def test_shards_at_most_shards_per_client_labels(per_client: int) -> None:
    # 300 samples in 10 x per_client shards: the shard size (30 / per_client) divides the
    # class size 30, so no shard straddles two labels.
    for seed in range(3):
        parts = P.shards(LABELS, 10, shards_per_client=per_client, rng=rng(seed))
        assert_partition(parts, len(LABELS))
        assert max(len(np.unique(LABELS[p])) for p in parts) <= per_client


def test_shards_are_much_more_skewed_than_iid() -> None:
    n_labels = [
        len(np.unique(LABELS[p])) for p in P.shards(LABELS, 10, shards_per_client=2, rng=rng(0))
    ]
    iid_labels = [len(np.unique(LABELS[p])) for p in P.iid(len(LABELS), 10, rng=rng(0))]
    assert max(n_labels) <= 2 < min(iid_labels)


def test_shards_errors() -> None:
    with pytest.raises(DataError, match="shards_per_client >= 1"):
        P.shards(LABELS, 3, shards_per_client=0, rng=rng(0))
    with pytest.raises(DataError, match="needs at least 12 samples, found 10"):
        P.shards(np.arange(10), 4, shards_per_client=3, rng=rng(0))


def test_quantity_sigma_zero_gives_equal_sizes() -> None:
    sizes = [len(p) for p in P.quantity(20, 4, sigma=0.0, rng=rng(0))]
    assert sizes == [5, 5, 5, 5]


def test_quantity_every_client_has_one_sample_even_when_skewed() -> None:
    assert [len(p) for p in P.quantity(3, 3, sigma=5.0, rng=rng(0))] == [1, 1, 1]
    for seed in range(5):
        parts = P.quantity(100, 20, sigma=3.0, rng=rng(seed))
        assert min(len(p) for p in parts) >= 1
        assert_partition(parts, 100)


def test_quantity_larger_sigma_gives_more_unequal_sizes() -> None:
    def spread(sigma: float) -> float:
        cv = []
        for seed in range(5):
            sizes = np.array([len(p) for p in P.quantity(3000, 20, sigma=sigma, rng=rng(seed))])
            cv.append(sizes.std() / sizes.mean())
        return float(np.mean(cv))

    assert spread(0.0) < 0.01
    assert spread(2.0) > spread(0.5) + 0.5


def test_quantity_errors() -> None:
    with pytest.raises(DataError, match="sigma >= 0"):
        P.quantity(10, 2, sigma=-1.0, rng=rng(0))
    with pytest.raises(DataError, match="found 2"):
        P.quantity(2, 3, sigma=1.0, rng=rng(0))


def test_natural_groups_in_order_of_first_appearance() -> None:
    parts = P.natural(["b", "a", "b", "c", "a"])
    assert [p.tolist() for p in parts] == [[0, 2], [1, 4], [3]]
    assert_partition(parts, 5)
    arr = P.natural(np.array([3, 3, 1]))
    assert [p.tolist() for p in arr] == [[0, 1], [2]]


def test_natural_empty_is_an_error() -> None:
    with pytest.raises(DataError, match="no rows"):
        P.natural([])


def test_partition_by_dispatches_and_rejects_natural() -> None:
    a = P.partition_by("shards", LABELS, 5, rng=rng(1), shards_per_client=2)
    b = P.shards(LABELS, 5, shards_per_client=2, rng=rng(1))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    with pytest.raises(DataError, match="'iid', 'dirichlet', 'shards', 'quantity'"):
        P.partition_by("natural", LABELS, 5, rng=rng(0))
    with pytest.raises(DataError, match="'bogus'"):
        P.partition_by("bogus", LABELS, 5, rng=rng(0))


def test_partitions_table_names_every_method() -> None:
    assert set(P.PARTITIONS) == {"natural", "iid", "dirichlet", "shards", "quantity"}
