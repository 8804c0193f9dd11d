"""Tests for federated preprocessing: sums per site give the pooled statistics exactly."""

from __future__ import annotations

import numpy as np
import pytest

from consortium.data.preprocess import (
    Column,
    encode_sites,
    federated_mean_std,
    fit_encoder,
    merge_summaries,
    summarize_site,
)
from consortium.errors import DataError

NAN = np.nan
CONT = [Column("a", "continuous"), Column("b", "continuous")]


def test_hand_checked_sums_and_statistics() -> None:
    col = [Column("v", "continuous")]
    a = summarize_site(np.array([[1.0], [3.0]]), columns=col)
    b = summarize_site(np.array([[5.0], [NAN]]), columns=col)
    total = merge_summaries([a, b])
    assert (total.count[0], total.total[0], total.total_sq[0]) == (3.0, 9.0, 35.0)
    mean, std = federated_mean_std(total)
    assert mean[0] == 3.0
    assert std[0] == pytest.approx(np.sqrt(35 / 3 - 9))  # = sqrt(8/3)
    assert total.has_missing[0]


def test_federated_statistics_equal_pooled_numpy() -> None:
    gen = np.random.default_rng(0)
    sites = []
    for n, shift in ((30, 0.0), (7, 50.0), (120, -3.0)):
        x = gen.normal(shift, 1 + shift / 10 if shift > 0 else 2.0, size=(n, 2))
        x[gen.random((n, 2)) < 0.2] = NAN
        sites.append(x)
    mean, std = federated_mean_std(merge_summaries(summarize_site(s, columns=CONT) for s in sites))
    pooled = np.concatenate(sites)
    np.testing.assert_allclose(mean, np.nanmean(pooled, axis=0), rtol=1e-12)
    np.testing.assert_allclose(std, np.nanstd(pooled, axis=0), rtol=1e-10)


def test_merge_is_order_independent_and_equals_one_pooled_site() -> None:
    gen = np.random.default_rng(1)
    sites = [gen.normal(size=(n, 2)) for n in (5, 9, 4)]
    parts = [summarize_site(s, columns=CONT) for s in sites]
    one = summarize_site(np.concatenate(sites), columns=CONT)
    for order in ([0, 1, 2], [2, 0, 1]):
        merged = merge_summaries(parts[i] for i in order)
        np.testing.assert_allclose(merged.total, one.total)
        np.testing.assert_allclose(merged.total_sq, one.total_sq)
        np.testing.assert_array_equal(merged.count, one.count)


def test_summary_uses_train_only_for_statistics_but_sees_test_missingness() -> None:
    col = [Column("v", "continuous")]
    s = summarize_site(np.array([[2.0], [4.0]]), columns=col, holdout=np.array([[NAN], [100.0]]))
    assert s.count[0] == 2 and s.total[0] == 6.0
    assert s.has_missing[0]


def test_transform_standardises_imputes_and_flags_missing() -> None:
    trains = [np.array([[1.0, 10.0], [NAN, 20.0]]), np.array([[3.0, 30.0], [5.0, 40.0]])]
    tests = [np.array([[NAN, 25.0]]), np.array([[3.0, 10.0]])]
    enc, tr, te = encode_sites(trains, tests, columns=CONT)
    assert enc.feature_names == ("a", "a_missing", "b")
    mean_a, std_a = 3.0, np.sqrt(8 / 3)  # train values of a: 1, 3, 5
    np.testing.assert_allclose(tr[0][:, 0], [(1 - mean_a) / std_a, 0.0], rtol=1e-6)
    np.testing.assert_array_equal(tr[0][:, 1], [0.0, 1.0])
    np.testing.assert_array_equal(te[0][0, :2], [0.0, 1.0])  # imputed with the mean -> 0
    pooled = np.concatenate(tr)
    np.testing.assert_allclose(pooled[:, 2].mean(), 0.0, atol=1e-6)
    np.testing.assert_allclose(pooled[:, 2].std(), 1.0, rtol=1e-6)
    for arr in (*tr, *te):
        assert arr.dtype == np.float32
        assert not np.isnan(arr).any()


def test_missing_only_in_a_test_split_still_gets_an_indicator() -> None:
    col = [Column("v", "continuous")]
    enc, _, te = encode_sites([np.array([[1.0], [2.0]])], [np.array([[NAN]])], columns=col)
    assert enc.feature_names == ("v", "v_missing")
    np.testing.assert_array_equal(te[0], [[0.0, 1.0]])


def test_binary_column_stays_zero_one_and_is_imputed_with_the_share_of_ones() -> None:
    col = [Column("flag", "binary")]
    enc, (tr,), _ = encode_sites(
        [np.array([[1.0], [0.0], [NAN], [1.0]])], [np.zeros((0, 1))], columns=col
    )
    assert enc.feature_names == ("flag", "flag_missing")
    np.testing.assert_allclose(tr[:, 0], [1.0, 0.0, 2 / 3, 1.0], rtol=1e-6)
    np.testing.assert_array_equal(tr[:, 1], [0, 0, 1, 0])


def test_binary_column_with_other_values_is_an_error() -> None:
    with pytest.raises(DataError, match="'flag' is declared binary"):
        summarize_site(np.array([[0.0], [2.0]]), columns=[Column("flag", "binary")])


def test_numeric_kind_is_binary_only_if_every_site_is_zero_one() -> None:
    cols = [Column("z", "numeric"), Column("c", "numeric")]
    site_a = np.array([[0.0, 0.0], [1.0, 1.0]])
    site_b = np.array([[1.0, 5.0], [0.0, 7.0]])
    enc, (ta, tb), _ = encode_sites([site_a, site_b], [np.zeros((0, 2))] * 2, columns=cols)
    assert enc.kinds == ("binary", "continuous")
    np.testing.assert_array_equal(np.concatenate([ta, tb])[:, 0], [0, 1, 1, 0])
    assert abs(np.concatenate([ta, tb])[:, 1].mean()) < 1e-6


def test_one_hot_over_the_union_of_site_categories() -> None:
    col = [Column("colour", "categorical")]
    a = np.array([["red"], ["blue"]], dtype=object)
    b = np.array([["green"], [None]], dtype=object)
    enc, (ta, tb), _ = encode_sites([a, b], [np.zeros((0, 1), dtype=object)] * 2, columns=col)
    assert enc.feature_names == (
        "colour=blue",
        "colour=green",
        "colour=red",
        "colour_missing",
    )
    np.testing.assert_array_equal(ta, [[0, 0, 1, 0], [1, 0, 0, 0]])
    np.testing.assert_array_equal(tb, [[0, 1, 0, 0], [0, 0, 0, 1]])
    unseen = enc.transform(np.array([["purple"]], dtype=object))
    np.testing.assert_array_equal(unseen, [[0, 0, 0, 0]])


def test_fixed_categories_give_a_stable_layout_and_reject_strays() -> None:
    col = [Column("cp", "categorical", categories=(1, 2, 3, 4))]
    enc, (tr,), _ = encode_sites([np.array([[2.0], [4.0]])], [np.zeros((0, 1))], columns=col)
    assert enc.feature_names == ("cp=1", "cp=2", "cp=3", "cp=4")
    np.testing.assert_array_equal(tr, [[0, 1, 0, 0], [0, 0, 0, 1]])
    with pytest.raises(DataError, match=r"categories \{9\} outside its allowed set \{1, 2, 3, 4\}"):
        summarize_site(np.array([[9.0]]), columns=col)


def test_constant_column_does_not_produce_nan() -> None:
    enc, (tr,), _ = encode_sites([np.full((3, 1), 7.0)], [np.zeros((0, 1))], columns=CONT[:1])
    np.testing.assert_array_equal(tr, np.zeros((3, 1)))
    assert enc.std[0] == 1.0


def test_shape_and_kind_errors() -> None:
    with pytest.raises(DataError, match=r"expected \[rows, 2\]"):
        summarize_site(np.zeros((3, 3)), columns=CONT)
    with pytest.raises(DataError, match="expected one of"):
        Column("x", "ordinal")  # type: ignore[arg-type]
    with pytest.raises(DataError, match="row 1 holds 'abc'"):
        summarize_site(np.array([["1"], ["abc"]], dtype=object), columns=CONT[:1])
    with pytest.raises(DataError, match="no site summaries"):
        merge_summaries([])
    one = summarize_site(np.zeros((2, 2)), columns=CONT)
    with pytest.raises(DataError, match="covers 2 columns, but the declared columns number 1"):
        fit_encoder(CONT[:1], one)
