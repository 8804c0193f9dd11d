"""Federated Table 1 and statistics equal the pooled computation; small cells are withheld at
the site; the quantile brackets hold the pooled quantile."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from consortium.analytics.analysis import analyze, in_process, run_query
from consortium.analytics.query import Query, coarse_ceil, coarse_floor
from consortium.analytics.server import quantile
from consortium.analytics.site import DisclosureError, _coarsen
from consortium.analytics.sources import heart_disease_tables
from consortium.cli import main
from consortium.config import ExperimentConfig
from consortium.data._tables import Table, numbers
from consortium.errors import ConfigError, DataError


def _table(site: str, **cols: list) -> Table:
    arrays = {k: pa.array(v) for k, v in cols.items()}
    return Table(Path(f"{site}.csv"), site, list(cols), arrays, lambda i: f"row {i}")


def _pooled(tables: dict[str, Table], col: str) -> np.ndarray:
    parts = []
    for t in tables.values():
        x = numbers(t.columns[col])
        assert x is not None
        parts.append(x)
    return np.concatenate(parts)


def test_heart_disease_table1_equals_pooled_with_min_count_1() -> None:
    tables = heart_disease_tables()
    q = Query(min_count=1)
    a = run_query(in_process(tables, q), q)
    overall = a.result["table1"]["overall"]
    assert overall["n"] == 920
    for col in ("age", "trestbps", "chol", "thalach", "oldpeak"):
        x = _pooled(tables, col)
        present = x[~np.isnan(x)]
        c = overall["columns"][col]
        assert c["mean"] == pytest.approx(present.mean(), rel=1e-12, abs=1e-12)
        assert c["sd"] == pytest.approx(present.std(ddof=1), rel=1e-9)
        assert c["missing"] == int(np.isnan(x).sum())
        for name, qq in (("median", 0.5), ("q1", 0.25), ("q3", 0.75)):
            bound = a.result["quantile_bounds"]["overall"][col][name]
            exact = np.quantile(present, qq, method="inverted_cdf")
            assert abs(c[name] - exact) <= bound + 1e-12
    # categorical columns: exact counts
    for col in ("sex", "cp", "restecg", "num"):
        x = _pooled(tables, col)
        c = overall["columns"][col]
        for level, count in c["counts"].items():
            assert count == int((x == float(level)).sum()), (col, level)
        assert c["missing"] == int(np.isnan(x).sum())
    # per site as well
    for site, t in tables.items():
        x = numbers(t.columns["age"])
        assert x is not None
        got = a.result["table1"]["sites"][site]["columns"]["age"]
        assert got["mean"] == pytest.approx(x.mean(), rel=1e-12)


def test_a_rare_category_is_withheld_at_its_site_and_in_the_total() -> None:
    a_ = _table("a", sex=["M"] * 6 + ["F"] * 6, smoker=["yes"] * 2 + ["no"] * 10)
    b_ = _table("b", sex=["M"] * 7 + ["F"] * 5, smoker=["yes"] * 6 + ["no"] * 6)
    q = Query(min_count=5)
    res = run_query(in_process({"a": a_, "b": b_}, q), q).result
    site_a = res["table1"]["sites"]["a"]["columns"]["smoker"]["counts"]
    assert site_a == {"no": 10, "yes": None}  # 2 < 5: withheld at site a
    assert res["table1"]["sites"]["b"]["columns"]["smoker"]["counts"] == {"no": 6, "yes": 6}
    assert res["table1"]["overall"]["columns"]["smoker"]["counts"] == {"no": 16, "yes": None}
    # the site's answer itself carries no trace of the value 2
    a_answer = run_query(in_process({"a": a_, "b": b_}, q), q).answers[0]
    assert 2.0 not in a_answer.values["all|smoker|counts"].tolist()


def test_refuse_instead_of_suppress() -> None:
    t = _table("a", smoker=["yes"] * 2 + ["no"] * 10)
    q = Query(min_count=5, suppress="refuse")
    with pytest.raises(DisclosureError, match="site 'a' refuses the query.*smoker"):
        run_query(in_process({"a": t}, q), q)


def test_a_cohort_below_min_count_releases_nothing() -> None:
    big = _table("big", age=list(range(30, 60)))
    tiny = _table("tiny", age=[40, 41, 42])
    q = Query(min_count=5)
    res = run_query(in_process({"big": big, "tiny": tiny}, q), q)
    assert res.profiles[1].n is None
    assert res.result["table1"]["sites"]["tiny"]["n"] is None
    assert res.result["table1"]["overall"]["n"] is None
    assert res.result["table1"]["overall"]["columns"]["age"]["mean"] is None


def test_rare_values_across_sites_become_other_and_never_name_the_value() -> None:
    a_ = _table("a", dx=["x"] * 8 + ["zebra"])
    b_ = _table("b", dx=["x"] * 8 + ["y"] * 6)
    q = Query(min_count=5)
    res = run_query(in_process({"a": a_, "b": b_}, q), q)
    assert res.schema.spec("dx").categories == ("x", "y")  # 'zebra' (1 row) never released
    assert "zebra" not in json.dumps(res.result)
    assert res.result["table1"]["sites"]["a"]["columns"]["dx"]["counts"]["(other)"] is None


def test_group_by_crosstab_and_correlation_equal_pooled() -> None:
    rng = np.random.default_rng(0)
    tables = {}
    xs, ys, gs = [], [], []
    for s in range(3):
        n = 200 + 50 * s
        x = rng.normal(100 + 10 * s, 15, n)
        y = 0.5 * x + rng.normal(0, 5, n)
        g = rng.choice(["a", "b"], n)
        x[rng.random(n) < 0.05] = np.nan
        tables[f"s{s}"] = _table(f"s{s}", x=x.tolist(), y=y.tolist(), g=g.tolist())
        xs.append(x)
        ys.append(y)
        gs.append(g)
    x, y, g = np.concatenate(xs), np.concatenate(ys), np.concatenate(gs)
    q = Query(min_count=1, group_by="g", crosstabs=(("g", "g"),), correlation=("x", "y"))
    res = run_query(in_process(tables, q), q).result
    for level in ("a", "b"):
        sel = (g == level) & ~np.isnan(x)
        got = res["groups"]["tables"][level]["columns"]["x"]
        assert got["mean"] == pytest.approx(x[sel].mean(), rel=1e-12)
        assert got["sd"] == pytest.approx(x[sel].std(ddof=1), rel=1e-9)
    ok = ~np.isnan(x)
    expect = np.corrcoef(x[ok], y[ok])
    got = np.array(res["correlation"]["correlation"])
    np.testing.assert_allclose(got, expect, rtol=1e-9)
    np.testing.assert_allclose(res["correlation"]["covariance"], np.cov(x[ok], y[ok]), rtol=1e-9)
    xt = res["crosstabs"][0]
    assert xt["counts"][0][0] == int((g == "a").sum()) and xt["counts"][0][1] == 0


def test_coarsened_histograms_release_only_big_bins() -> None:
    rng = np.random.default_rng(1)
    for _ in range(50):
        hist = rng.integers(0, 4, size=rng.integers(1, 40))
        known = _coarsen(hist, 5)
        cdf = np.cumsum(hist)
        released = np.concatenate([[0], cdf[known]])
        steps = np.diff(released)
        assert np.all((steps == 0) | (steps >= 5)) or cdf[-1] < 5
        assert known[-1]


def test_quantile_bracket_holds_the_pooled_quantile_under_coarsening() -> None:
    rng = np.random.default_rng(2)
    for trial in range(30):
        parts_x = [rng.gamma(2.0, 3.0, rng.integers(10, 300)).round(int(trial % 3)) for _ in range(4)]
        tables = {f"s{i}": _table(f"s{i}", v=p.tolist()) for i, p in enumerate(parts_x)}
        q = Query(min_count=5, bins=50, quantiles=(0.1, 0.9))
        res = run_query(in_process(tables, q), q)
        pooled = np.concatenate(parts_x)
        for name, qq in (("median", 0.5), ("q1", 0.25), ("q3", 0.75)):
            value = res.result["table1"]["overall"]["columns"]["v"][name]
            bound = res.result["quantile_bounds"]["overall"]["v"][name]
            exact = float(np.quantile(pooled, qq, method="inverted_cdf"))
            if value is not None:
                assert abs(value - exact) <= bound + 1e-9, (trial, name)
        for qq in (0.1, 0.9):
            est = res.result["quantile_bounds"]["overall"]["v"][f"q{qq:g}"]
            exact = float(np.quantile(pooled, qq, method="inverted_cdf"))
            if est["low"] is not None:
                assert est["low"] <= exact + 1e-12
            if est["high"] is not None:
                assert exact < est["high"] + 1e-12


def test_quantile_hand_case() -> None:
    # one site, edges 0..4, values 0.5, 1.5, 1.5, 2.5, 3.5 (all known): median = 1.5
    edges = np.array([0.0, 1, 2, 3, 4])
    values = np.array([0.5, 1.5, 1.5, 2.5, 3.5])
    hist = np.bincount(np.searchsorted(edges, values, side="right"), minlength=6)
    cdf = np.cumsum(hist).astype(float)
    est = quantile([(cdf, np.ones(6, bool))], edges, 0.5)
    assert (est.low, est.high) == (1.0, 2.0)  # C(1) = 1 < 2.5 ≤ C(2) = 3
    assert est.value == pytest.approx(1.75)  # 1 + (2.5 - 1) / (3 - 1)


def test_coarse_rounding() -> None:
    assert coarse_floor(1234.0) == 1200 and coarse_ceil(1234.0) == 1300
    assert coarse_floor(-1234.0) == -1300 and coarse_ceil(-1234.0) == -1200
    assert coarse_floor(0.0123) == pytest.approx(0.012) and coarse_ceil(0.0) == 0


def test_csv_sites_through_the_cli(tmp_path: Path) -> None:
    for name, rows in (("north", 40), ("south", 30)):
        lines = ["age,sex,bp"] + [
            f"{30 + i % 40},{'M' if i % 3 else 'F'},{110 + i}" for i in range(rows)
        ]
        (tmp_path / f"{name}.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    code = main(["analyze", "--set", "data.dataset=\"csv\"", "--set",
                 f"data.path=\"{tmp_path}/*.csv\"", "--set", "data.target=\"sex\"",
                 "--out", str(out), "--bias"])
    assert code == 0
    res = json.loads((out / "analysis.json").read_text())
    assert set(res["table1"]["sites"]) == {"north", "south"}
    assert res["table1"]["overall"]["n"] == 70
    bp = [110 + i for i in range(40)] + [110 + i for i in range(30)]
    assert res["table1"]["overall"]["columns"]["bp"]["mean"] == pytest.approx(np.mean(bp), rel=1e-12)
    assert (out / "table1.csv").read_text().startswith("characteristic,")
    html = (out / "analysis.html").read_text()
    assert "<table>" in html and "src=" not in html.replace("data:image", "")
    bias = json.loads((out / "bias.json").read_text())
    assert all(set(f) == {"site", "column", "kind", "detail"} for f in bias["findings"])


def test_bias_on_the_four_hospitals() -> None:
    a = analyze(ExperimentConfig(), bias=True)
    assert a.bias is not None
    found = {(f["kind"], f["site"], f["column"]) for f in a.bias["findings"]}
    assert ("all_zero", "switzerland", "chol") in found
    assert ("label_prevalence", "switzerland", None) in found
    assert {("mostly_missing", s, "ca") for s in ("hungarian", "switzerland", "va")} <= found
    assert a.bias["findings"][0]["column"] == "chol"  # the measurement anomaly ranks first


def _unused_dp_refusal() -> None:
    cfg = ExperimentConfig.from_dict({"privacy": {"mode": "central", "noise_multiplier": 1.0}})
    with pytest.raises(ConfigError, match="not available yet"):
        analyze(cfg)


def test_unknown_column_names_the_site_and_the_fix() -> None:
    t = _table("a", age=[1, 2, 3, 4, 5, 6])
    q = Query(columns=("weight",))
    with pytest.raises(DataError, match="site 'a' has no column 'weight'.*harmonize"):
        run_query(in_process({"a": t}, q), q)


def test_generated_data_sets_are_refused() -> None:
    cfg = ExperimentConfig.from_dict({"data": {"dataset": "synthetic"}})
    with pytest.raises(DataError, match="reads tables"):
        analyze(cfg)


def test_mean_far_from_zero_keeps_its_digits() -> None:
    rng = np.random.default_rng(3)
    parts = [1e9 + rng.normal(0, 1, 500) for _ in range(3)]
    tables = {f"s{i}": _table(f"s{i}", v=p.tolist()) for i, p in enumerate(parts)}
    q = Query(min_count=1)
    c = run_query(in_process(tables, q), q).result["table1"]["overall"]["columns"]["v"]
    pooled = np.concatenate(parts)
    assert c["sd"] == pytest.approx(pooled.std(ddof=1), rel=1e-6)
    assert math.isclose(c["mean"], pooled.mean(), rel_tol=1e-15, abs_tol=1e-6)


def test_cohort_filter_equals_the_pooled_filter() -> None:
    tables = heart_disease_tables()
    q = Query(min_count=1, where="age >= 50 and sex == 1", columns=("age", "chol"))
    res = run_query(in_process(tables, q), q).result["table1"]["overall"]
    age = _pooled(tables, "age")
    sex = _pooled(tables, "sex")
    sel = (age >= 50) & (sex == 1)
    assert res["n"] == int(sel.sum())
    assert res["columns"]["age"]["mean"] == pytest.approx(age[sel].mean(), rel=1e-12)


def test_an_unsafe_filter_is_refused_before_any_site_reads_data() -> None:
    q = Query(where="__import__('os').system('true')")
    with pytest.raises(ConfigError, match="where"):
        run_query(in_process(heart_disease_tables(), q), q)


def test_kaplan_meier_across_sites_equals_lifelines_on_the_rounded_times() -> None:
    lifelines = pytest.importorskip("lifelines")
    from consortium.analytics.query import coarse_ceil

    rng = np.random.default_rng(5)
    tables, ts, es, gs = {}, [], [], []
    for s in range(3):
        n = 300
        t = rng.integers(1, 30, n).astype(float)  # whole months: the grid keeps every time
        e = (rng.random(n) < 0.7).astype(int)
        g = rng.choice(["A", "B"], n)
        tables[f"s{s}"] = _table(f"s{s}", months=t.tolist(), died=e.tolist(), arm=g.tolist())
        ts.append(t)
        es.append(e)
        gs.append(g)
    t, e, g = np.concatenate(ts), np.concatenate(es), np.concatenate(gs)
    q = Query(min_count=1, columns=("months",), survival=("months", "died", "arm"))
    res = run_query(in_process(tables, q), q).result["survival"]
    assert res["groups"] == ["A", "B"]
    for i, arm in enumerate(("A", "B")):
        km = lifelines.KaplanMeierFitter().fit(t[g == arm], e[g == arm])
        expect = km.survival_function_at_times(res["time"]).to_numpy()
        np.testing.assert_allclose(res["survival"][i], expect, rtol=1e-9)
    lr = lifelines.statistics.logrank_test(t[g == "A"], t[g == "B"], e[g == "A"], e[g == "B"])
    assert res["logrank"]["chi2"] == pytest.approx(lr.test_statistic, rel=1e-9)
    assert res["logrank"]["p_value"] == pytest.approx(lr.p_value, rel=1e-9)
    assert all(coarse_ceil(v) == v for v in res["time"])


def test_survival_counts_below_min_count_are_merged_at_the_site() -> None:
    rng = np.random.default_rng(6)
    tables = {}
    for s in range(2):
        n = 200
        t = rng.integers(1, 40, n).astype(float)
        e = (rng.random(n) < 0.6).astype(int)
        tables[f"s{s}"] = _table(f"s{s}", months=t.tolist(), died=e.tolist())
    q = Query(min_count=5, columns=("months",), survival=("months", "died", ""))
    a = run_query(in_process(tables, q), q)
    for ans in a.answers:
        released = ans.values["surv|events"][~ans.withheld["surv|events"]]
        assert np.all((released == 0) | (released >= 5))
        released = ans.values["surv|censored"][~ans.withheld["surv|censored"]]
        assert np.all((released == 0) | (released >= 5))
    surv = a.result["survival"]
    assert len(surv["time"]) < 39 and surv["survival"][0][-1] < surv["survival"][0][0]


def test_differently_coded_sites_are_refused_and_harmonised(tmp_path: Path) -> None:
    rows = [(30 + i, i % 2) for i in range(20)]
    (tmp_path / "a.csv").write_text("age,sex\n" + "".join(f"{a},{'M' if s else 'F'}\n" for a, s in rows))
    (tmp_path / "b.csv").write_text("age,sex\n" + "".join(f"{a},{'male' if s else 'female'}\n" for a, s in rows))
    base = {"data": {"dataset": "csv", "path": str(tmp_path / "*.csv"), "target": "sex"}}
    with pytest.raises(DataError, match="sex") as err:
        analyze(ExperimentConfig.from_dict(base))
    assert "M" in str(err.value) and "male" in str(err.value)
    h = tmp_path / "harmonize.toml"
    h.write_text('[map.sex]\n"M" = "male"\n"F" = "female"\n')
    cfg = ExperimentConfig.from_dict({"data": {**base["data"], "harmonize": str(h)}})
    res = analyze(cfg).result
    assert res["table1"]["overall"]["columns"]["sex"]["counts"] == {"female": 20, "male": 20}
    same = tmp_path / "same"
    same.mkdir()
    (same / "a.csv").write_text((tmp_path / "b.csv").read_text())
    (same / "b.csv").write_text((tmp_path / "b.csv").read_text())
    ref = analyze(ExperimentConfig.from_dict(
        {"data": {"dataset": "csv", "path": str(same / "*.csv"), "target": "sex"}})).result
    assert ref["table1"]["overall"] == res["table1"]["overall"]


def test_histograms_over_given_bounds_equal_pooled_and_respect_min_count() -> None:
    tables = heart_disease_tables()
    age = _pooled(tables, "age")
    q = Query(min_count=1, histograms=("age",), bounds=(("age", 20.0, 80.0),), bins=6)
    h = run_query(in_process(tables, q), q).result["histograms"]["age"]
    assert h["edges"] == [None, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, None]
    expect = np.histogram(age, bins=[-np.inf, 20, 30, 40, 50, 60, 70, 80, np.inf])[0]
    assert h["counts"] == expect.tolist()
    q5 = Query(min_count=5, histograms=("age",), bounds=(("age", 20.0, 80.0),), bins=60)
    for secure_mode in (False, True):
        q5 = Query(min_count=5, histograms=("age",), bounds=(("age", 20.0, 80.0),), bins=60,
                   secure=secure_mode)
        h = run_query(in_process(tables, q5), q5).result["histograms"]["age"]
        assert sum(h["counts"]) == 920
        assert all(c == 0 or c >= 5 for c in h["counts"])


@pytest.mark.slow
def test_on_ray_gives_the_in_process_result() -> None:
    pytest.importorskip("ray")
    import ray

    cfg = ExperimentConfig.from_dict({"executor": {"kind": "ray", "workers": 2}})
    try:
        on = analyze(cfg).result
    finally:
        ray.shutdown()
    here = analyze(ExperimentConfig()).result
    assert on["table1"] == here["table1"]
