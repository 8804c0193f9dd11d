"""Federated Kaplan–Meier and log-rank (consortium.analytics.survival): hand-computed cases,
lifelines on rows split across sites, and properties of the counts."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import chi2, norm

from consortium.analytics.survival import (
    SurvivalCounts,
    coarsen,
    kaplan_meier,
    logrank,
    merge_small_intervals,
    site_counts,
    small_cells,
    sum_counts,
    time_grid,
)
from consortium.errors import ConfigError, DataError

Z = norm.ppf(0.975)

# Eight patients: (time, event) — deaths at 2, 3, 5, 7, 9; censored at 3, 6, 10.
TIMES = np.array([2, 3, 3, 5, 6, 7, 9, 10], dtype=float)
EVENTS = np.array([1, 1, 0, 1, 0, 1, 1, 0])


def test_kaplan_meier_by_hand() -> None:
    km = kaplan_meier(site_counts(TIMES, EVENTS, np.unique(TIMES)))
    np.testing.assert_array_equal(km.grid, [2, 3, 5, 6, 7, 9, 10])
    # at risk: 8 at t=2; 7 at t=3 (one died at 2); 5 at t=5 (one died, one censored at 3);
    # 4 at 6; 3 at 7 (one censored at 6); 2 at 9; 1 at 10.
    np.testing.assert_array_equal(km.at_risk[0], [8, 7, 5, 4, 3, 2, 1])
    # S: 7/8; ·6/7 = 6/8; ·4/5 = 0.6; censoring only: 0.6; ·2/3 = 0.4; ·1/2 = 0.2; 0.2.
    np.testing.assert_allclose(km.survival[0], [0.875, 0.75, 0.6, 0.6, 0.4, 0.2, 0.2], rtol=1e-12)
    # Greenwood: Σ d/(n(n−d)) = 1/56; +1/42 = 1/24; +1/20 = 11/120; (+0); +1/6 = 31/120;
    # +1/2 = 91/120; (+0).  SE = S·sqrt(Σ).
    sums = np.array([1 / 56, 1 / 24, 11 / 120, 11 / 120, 31 / 120, 91 / 120, 91 / 120])
    np.testing.assert_allclose(km.std_error[0], km.survival[0] * np.sqrt(sums), rtol=1e-12)
    assert km.std_error[0, 2] == pytest.approx(math.sqrt(0.36 * 11 / 120), rel=1e-12)  # 0.1817
    # log-log interval at t=5: S^exp(∓z·σ/log S), σ = sqrt(11/120), log 0.6 = −0.5108
    shift = math.exp(Z * math.sqrt(11 / 120) / math.log(0.6))  # exp(−1.1617) = 0.3130
    assert km.ci_lower[0, 2] == pytest.approx(0.6 ** (1 / shift), rel=1e-12)  # 0.1955
    assert km.ci_upper[0, 2] == pytest.approx(0.6**shift, rel=1e-12)  # 0.8523
    assert 0.195 < km.ci_lower[0, 2] < 0.196 and 0.852 < km.ci_upper[0, 2] < 0.853
    # median: the first time S <= 0.5 is t = 7
    assert km.median[0] == 7.0
    assert km.confidence == pytest.approx(0.95)


def test_interval_limits_and_unreached_median() -> None:
    # no event before t=4; everyone still alive at the end: S stays above 0.5
    km = kaplan_meier(site_counts([1, 2, 4, 5, 6], [0, 0, 1, 0, 0], grid=[1, 2, 4, 5, 6]))
    np.testing.assert_array_equal(km.ci_lower[0, :2], [1.0, 1.0])  # S = 1: interval [1, 1]
    np.testing.assert_array_equal(km.ci_upper[0, :2], [1.0, 1.0])
    assert km.median[0] == math.inf
    # everyone dies: S reaches 0 and the interval is [0, 0] there
    km0 = kaplan_meier(site_counts([1, 2], [1, 1], grid=[1, 2]))
    np.testing.assert_allclose(km0.survival[0], [0.5, 0.0])
    assert (km0.ci_lower[0, 1], km0.ci_upper[0, 1], km0.std_error[0, 1]) == (0.0, 0.0, 0.0)


def test_logrank_by_hand() -> None:
    # A dies at 1 and 3; B dies at 2 and is censored at 4.
    # t=1: n=4 (2 A), d=1 (A): O−E = 1 − 1/2, V = 1·3/3 · 2·2/16 = 1/4
    # t=2: n=3 (1 A), d=1 (B): O−E = 0 − 1/3, V = 1·2/2 · 1·2/9 = 2/9
    # t=3: n=2 (1 A), d=1 (A): O−E = 1 − 1/2, V = 1 · 1·1/4 = 1/4
    # Z = 2/3, V = 13/18, chi2 = (4/9)/(13/18) = 8/13
    counts = site_counts([1, 3, 2, 4], [1, 1, 1, 0], [1, 2, 3, 4], ["A", "A", "B", "B"], ["A", "B"])
    result = logrank(counts)
    assert result.chi2 == pytest.approx(8 / 13, rel=1e-12)
    assert result.dof == 1
    assert result.p_value == pytest.approx(chi2.sf(8 / 13, 1), rel=1e-12)
    stat, dof, p = result  # unpacks as (chi2, dof, p_value)
    assert (stat, dof, p) == tuple(result)


def _synthetic(seed: int, n: int = 600, groups: int = 3) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    group = rng.integers(0, groups, n)
    # whole days: many ties between and within groups, as in real follow-up data
    death = np.ceil(rng.exponential(30.0 * (1 + 0.4 * group)))
    censor = np.ceil(rng.exponential(45.0, n))
    time = np.minimum(death, censor)
    time[:5] = 0.0  # a few events/censorings at the origin
    return time, (death <= censor).astype(int), group


def _sites(n: int, k: int, seed: int) -> list[np.ndarray]:
    return np.array_split(np.random.default_rng(seed).permutation(n), k)


@pytest.mark.parametrize("n_sites", [3, 4])
def test_equals_lifelines_kaplan_meier(n_sites: int) -> None:
    lifelines = pytest.importorskip("lifelines")
    from lifelines.utils import median_survival_times

    time, event, group = _synthetic(1)
    grid = np.unique(time)  # exact mode
    counts = sum_counts(
        site_counts(time[rows], event[rows], grid, group[rows], [0, 1, 2])
        for rows in _sites(time.size, n_sites, 2)
    )
    km = kaplan_meier(counts)
    for g in range(3):
        rows = group == g
        ref = lifelines.KaplanMeierFitter().fit(time[rows], event[rows])
        # lifelines' own timeline holds this group's times only; the curve is a step function
        surv = ref.survival_function_.iloc[:, 0].reindex(grid, method="pad").to_numpy()
        band = ref.confidence_interval_.reindex(grid, method="pad").to_numpy()
        np.testing.assert_allclose(km.survival[g], surv, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(km.ci_lower[g], band[:, 0], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(km.ci_upper[g], band[:, 1], rtol=1e-9, atol=1e-12)
        assert km.median[g] == ref.median_survival_time_
        ref_ci = median_survival_times(ref.confidence_interval_).to_numpy().ravel()
        np.testing.assert_array_equal(km.median_ci[g], ref_ci)
        table = ref.event_table  # at risk at each time where this group has a row
        own = table.index[table["removed"].to_numpy() > 0].to_numpy()
        np.testing.assert_array_equal(
            km.at_risk[g, np.searchsorted(grid, own)], table.loc[own, "at_risk"].to_numpy()
        )


def test_equals_lifelines_logrank() -> None:
    pytest.importorskip("lifelines")
    from lifelines.statistics import logrank_test, multivariate_logrank_test

    time, event, group = _synthetic(3, groups=4)
    grid = np.unique(time)
    counts = sum_counts(
        site_counts(time[rows], event[rows], grid, group[rows], [0, 1, 2, 3])
        for rows in _sites(time.size, 3, 4)
    )
    ours = logrank(counts)
    ref = multivariate_logrank_test(time, group, event)
    assert ours.chi2 == pytest.approx(ref.test_statistic, rel=1e-9)
    assert ours.p_value == pytest.approx(ref.p_value, rel=1e-9)
    assert ours.dof == ref.degrees_of_freedom == 3

    pair = group < 2
    two = sum_counts(
        site_counts(time[rows], event[rows], grid, group[rows], [0, 1])
        for rows in _sites(time.size, 4, 5)
        for rows in [rows[pair[rows]]]
    )
    ref2 = logrank_test(
        time[group == 0], time[group == 1], event[group == 0], event[group == 1]
    )
    assert logrank(two).chi2 == pytest.approx(ref2.test_statistic, rel=1e-9)
    assert logrank(two).p_value == pytest.approx(ref2.p_value, rel=1e-9)


def test_coarse_grid_is_the_curve_of_the_rounded_up_times() -> None:
    lifelines = pytest.importorskip("lifelines")
    from lifelines.statistics import multivariate_logrank_test

    time, event, group = _synthetic(6)
    grid = time_grid(100.0, step=10.0)  # 10, 20, …, 100; later times count as beyond
    assert grid[0] == 10.0 and grid[-1] == 100.0 and grid.size == 10
    counts = sum_counts(
        site_counts(time[rows], event[rows], grid, group[rows], [0, 1, 2])
        for rows in _sites(time.size, 3, 7)
    )
    slot = np.searchsorted(grid, time)
    rounded = np.where(slot < grid.size, grid[np.minimum(slot, grid.size - 1)], time)
    km = kaplan_meier(counts)
    for g in range(3):
        rows = group == g
        ref = lifelines.KaplanMeierFitter().fit(rounded[rows], event[rows])
        surv = ref.survival_function_.iloc[:, 0].reindex(grid, method="pad").to_numpy()
        np.testing.assert_allclose(km.survival[g], surv, rtol=1e-9)
    # beyond the grid the rows are at risk throughout and add no event: the test restricted
    # to the grid is the pooled test with those rows censored at the grid's end
    cut = np.where(slot < grid.size, rounded, grid[-1] + 1.0)
    ref = multivariate_logrank_test(cut, group, np.where(slot < grid.size, event, 0))
    assert logrank(counts).chi2 == pytest.approx(ref.test_statistic, rel=1e-9)
    assert counts.beyond.sum() == (time > 100).sum() > 0


@settings(max_examples=40, deadline=None)
@given(
    data=st.lists(
        st.tuples(st.integers(0, 12), st.booleans(), st.integers(0, 2), st.integers(0, 4)),
        min_size=1,
        max_size=60,
    )
)
def test_any_split_of_rows_sums_to_the_pooled_counts(
    data: list[tuple[int, bool, int, int]],
) -> None:
    time, event, group, site = (np.array(col) for col in zip(*data, strict=True))
    grid = np.array([0.0, 2.0, 3.0, 7.0, 10.0])  # 11 and 12 fall beyond the grid
    pooled = site_counts(time, event, grid, group, [0, 1, 2])
    parts = [
        site_counts(time[site == s], event[site == s], grid, group[site == s], [0, 1, 2])
        for s in range(5)
    ]
    summed = sum_counts(parts)
    np.testing.assert_array_equal(summed.to_vector(), pooled.to_vector())
    vec = np.sum([p.to_vector() for p in parts], axis=0)  # what secure aggregation would sum
    again = SurvivalCounts.from_vector(vec, grid=grid, groups=[0, 1, 2])
    np.testing.assert_array_equal(kaplan_meier(again).survival, kaplan_meier(pooled).survival)
    assert pooled.total.sum() == len(data)
    # at risk never rises and starts at each group's size
    np.testing.assert_array_equal(pooled.at_risk[:, 0], pooled.total)
    assert np.all(np.diff(pooled.at_risk, axis=1) <= 0)


def test_missing_rows_and_event_codings() -> None:
    time = np.array([1.0, np.nan, 2.0, 3.0, 4.0], dtype=object)
    time[4] = None
    event = np.array(["dead", "alive", None, "alive", "dead"], dtype=object)
    counts = site_counts(time, event, [1, 2, 3, 4], event_values=["dead"])
    assert counts.missing == 3  # NaN time, None event, None time
    np.testing.assert_array_equal(counts.events, [[1, 0, 0, 0]])
    np.testing.assert_array_equal(counts.censored, [[0, 0, 1, 0]])

    grid = [1, 2, 3]
    as_int = site_counts([1, 2, 3], [1, 0, 1], grid).to_vector()
    np.testing.assert_array_equal(site_counts([1, 2, 3], [True, False, True], grid).to_vector(), as_int)
    np.testing.assert_array_equal(
        site_counts([1, 2, 3], np.array(["TRUE", "false", "1"]), grid).to_vector(), as_int
    )
    np.testing.assert_array_equal(site_counts([1, 2, 3], [1.0, 0.0, 1.0], grid).to_vector(), as_int)
    from_table = np.array([1.0, 0.0, 1.0, None], dtype=object)  # a numeric column with a gap
    np.testing.assert_array_equal(
        site_counts([1, 2, 3, 3], from_table, grid).to_vector()[:-1], as_int[:-1]
    )
    with pytest.raises(DataError, match="event_values"):
        site_counts([1, 2], [1, 2], grid)
    with pytest.raises(DataError, match="event_values"):
        site_counts([1, 2], ["yes", "no"], grid)
    g = np.array(["a", None, "b"], dtype=object)
    assert site_counts([1, 2, 3], [1, 1, 1], grid, g, ["a", "b"]).missing == 1


def test_input_errors() -> None:
    with pytest.raises(DataError, match=">= 0"):
        site_counts([-1.0, 2.0], [1, 0], [1, 2])
    with pytest.raises(DataError, match="agreed groups"):
        site_counts([1, 2], [1, 0], [1, 2], ["a", "c"], ["a", "b"])
    with pytest.raises(ConfigError, match="groups="):
        site_counts([1, 2], [1, 0], [1, 2], ["a", "b"])
    with pytest.raises(ConfigError, match="strictly increasing"):
        site_counts([1, 2], [1, 0], [2, 1])
    with pytest.raises(DataError, match="equal length"):
        site_counts([1, 2], [1], [1, 2])
    a = site_counts([1, 2], [1, 0], [1, 2], ["a", "b"], ["a", "b"])
    b = site_counts([1, 2], [1, 0], [1, 2], ["a", "b"], ["b", "a"])
    with pytest.raises(DataError, match="different grids or groups"):
        _ = a + b
    with pytest.raises(DataError, match="entries"):
        SurvivalCounts.from_vector(np.zeros(3), grid=np.array([1.0, 2.0]), groups=["a"])
    with pytest.raises(DataError, match="at least two groups"):
        logrank(site_counts([1, 2], [1, 0], [1, 2], ["a", "a"], ["a", "b"]))


def test_logrank_leaves_out_empty_groups() -> None:
    time, event, group = _synthetic(8, n=200, groups=2)
    with_empty = site_counts(time, event, np.unique(time), group, [0, 1, 2])
    without = site_counts(time, event, np.unique(time), group, [0, 1])
    assert logrank(with_empty) == logrank(without)
    assert logrank(with_empty).dof == 1


def test_time_grid() -> None:
    np.testing.assert_allclose(time_grid(1.0, step=0.1), np.arange(1, 11) / 10, rtol=1e-12)
    assert time_grid(1.0, step=0.1).size == 10  # no extra point from rounding
    np.testing.assert_allclose(time_grid(25.0, step=10.0), [10.0, 20.0, 30.0])
    np.testing.assert_allclose(time_grid(12.0, points=4, start=4.0), [6.0, 8.0, 10.0, 12.0])
    np.testing.assert_array_equal(time_grid(edges=[1, 5, 30]), [1.0, 5.0, 30.0])
    with pytest.raises(ConfigError):
        time_grid(10.0)
    with pytest.raises(ConfigError):
        time_grid(10.0, step=1.0, points=3)
    with pytest.raises(ConfigError):
        time_grid(edges=[3, 1])


def test_small_cells_and_merging_by_hand() -> None:
    # grid 1..6, events per time: A 1,0,4,2,0,3  B 0,0,0,5,1,0 ; min_count 3
    time = np.array([1, 3, 3, 3, 3, 4, 4, 6, 6, 6, 4, 4, 4, 4, 4, 5])
    group = np.array(["A"] * 10 + ["B"] * 6)
    counts = site_counts(time, np.ones(16, int), [1, 2, 3, 4, 5, 6], group, ["A", "B"])
    np.testing.assert_array_equal(
        small_cells(counts, 3), [[1, 0, 0, 1, 0, 0], [0, 0, 0, 0, 1, 0]]
    )
    merged = merge_small_intervals(counts, 3)
    # (0,1]: A=1 → merge; (0,2]: A=1; (0,3]: A=5 B=0 ✓ close at 3;
    # (3,4]: A=2 → merge; (3,5]: A=2 B=6; (3,6]: A=5 B=6 ✓ close at 6.
    np.testing.assert_array_equal(merged.grid, [3.0, 6.0])
    np.testing.assert_array_equal(merged.events, [[5, 5], [0, 6]])
    assert not small_cells(merged, 3).any()
    # a short tail folds backwards: events 3, 0, 1, then 2 censored at 4 (censored do not count
    # by default); (0,1] closes with 3, (1,4] holds 1 → merged with it: one interval (0,4]
    tail = site_counts([1, 1, 1, 3, 4, 4], [1, 1, 1, 1, 0, 0], [1, 2, 3, 4])
    merged_tail = merge_small_intervals(tail, 3)
    np.testing.assert_array_equal(merged_tail.grid, [4.0])
    np.testing.assert_array_equal(merged_tail.events, [[4]])
    np.testing.assert_array_equal(merged_tail.censored, [[2]])
    # with censored=True the 2 censorings are a small cell too, and no merge can hide them
    with pytest.raises(DataError, match="censorings"):
        merge_small_intervals(tail, 3, censored=True)


@settings(max_examples=40, deadline=None)
@given(
    times=st.lists(st.integers(1, 30), min_size=10, max_size=80),
    min_count=st.integers(1, 6),
    seed=st.integers(0, 1000),
)
def test_merging_properties(times: list[int], min_count: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    time = np.array(times, dtype=float)
    event = rng.integers(0, 2, time.size)
    group = rng.integers(0, 2, time.size)
    grid = np.arange(1.0, 31.0)
    counts = site_counts(time, event, grid, group, [0, 1])
    totals = counts.events.sum(axis=1)
    if np.any((totals > 0) & (totals < min_count)):
        with pytest.raises(DataError, match="min_count"):
            merge_small_intervals(counts, min_count)
        return
    merged = merge_small_intervals(counts, min_count)
    assert not small_cells(merged, min_count).any()
    assert set(merged.grid) <= set(grid) and merged.grid[-1] == grid[-1]
    # the merged counts are the site's counts on the coarser grid, from the rows
    direct = site_counts(time, event, merged.grid, group, [0, 1])
    np.testing.assert_array_equal(merged.to_vector(), direct.to_vector())
    np.testing.assert_array_equal(merged.total, counts.total)


def test_coarsen_lets_differently_merged_sites_sum() -> None:
    time, event, group = _synthetic(9, n=300, groups=2)
    grid = time_grid(120.0, step=5.0)
    a, b = (site_counts(time[r], event[r], grid, group[r], [0, 1]) for r in _sites(300, 2, 1))
    ma, mb = merge_small_intervals(a, 5), merge_small_intervals(b, 5)
    common = np.intersect1d(ma.grid, mb.grid)
    summed = coarsen(ma, common) + coarsen(mb, common)
    pooled = site_counts(time, event, common, group, [0, 1])
    np.testing.assert_array_equal(summed.to_vector(), pooled.to_vector())
    assert not small_cells(summed, 5).any()
    with pytest.raises(ConfigError, match="some of the counts' grid times"):
        coarsen(a, np.array([7.5]))
