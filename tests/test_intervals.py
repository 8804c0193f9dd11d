"""Bootstrap intervals over test examples: stratified by site, seeded, around the reported number."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import stats

from consortium.client.evaluation import confusion_matrix, evaluate_model
from consortium.data.base import Split
from consortium.errors import ConfigError
from consortium.intervals import MANY_SITES, bootstrap_ci, confusion_metrics


def _confusion(labels: np.ndarray, predicted: np.ndarray, k: int = 2) -> np.ndarray:
    return np.bincount(labels * k + predicted, minlength=k * k).reshape(k, k)


def _site(n: int, accuracy: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(0, 2, size=n)
    wrong = rng.random(n) > accuracy
    return labels, np.where(wrong, 1 - labels, labels)


def test_confusion_metrics_by_hand() -> None:
    # site a: 3 of 4 right (class 0: 2/2, class 1: 1/2); site b: 1 of 2 (class 0: 1/2)
    confusions = {"a": np.array([[2, 0], [1, 1]]), "b": np.array([[1, 1], [0, 0]])}
    point = confusion_metrics(confusions)
    assert point["accuracy"] == pytest.approx((3 + 1) / 6)
    # balanced: a = (1 + 0.5) / 2 = 0.75, b = 0.5 (one class present); weighted 4:2
    assert point["balanced_accuracy"] == pytest.approx((4 * 0.75 + 2 * 0.5) / 6)
    assert confusion_metrics({"empty": np.zeros((2, 2), dtype=int)}) == {}


def test_bootstrap_brackets_the_estimate_and_is_reproducible() -> None:
    rng = np.random.default_rng(1)
    confusions = {s: _confusion(*_site(n, a, rng)) for s, n, a in (("a", 60, 0.9), ("b", 150, 0.7))}
    ci = bootstrap_ci(confusions, seed=7)
    point = confusion_metrics(confusions)
    for metric in ("accuracy", "balanced_accuracy"):
        low, high = ci[metric]
        assert low < point[metric] < high
    assert bootstrap_ci(confusions, seed=7) == ci
    assert bootstrap_ci(confusions, seed=8) != ci


def test_bootstrap_resamples_within_each_site() -> None:
    # one site all right, one all wrong, equal sizes: every stratified replicate is exactly
    # 0.5 (pooled resampling would spread it as Binomial(200, 0.5) / 200)
    confusions = {"right": np.array([[50, 0], [0, 50]]), "wrong": np.array([[0, 50], [50, 0]])}
    ci = bootstrap_ci(confusions, seed=0)
    assert ci["accuracy"] == [0.5, 0.5]
    assert ci["balanced_accuracy"] == [0.5, 0.5]


def test_bootstrap_narrows_with_more_examples() -> None:
    # the same proportions with 4x the examples: about half the width (1/sqrt(n))
    base = {"a": np.array([[40, 10], [15, 35]]), "b": np.array([[20, 5], [5, 20]])}
    big = {site: 4 * counts for site, counts in base.items()}
    width = {name: np.diff(bootstrap_ci(c, seed=3)["accuracy"])[0]
             for name, c in (("base", base), ("big", big))}
    assert 0.35 < width["big"] / width["base"] < 0.65


def test_bootstrap_matches_scipy_percentile_on_one_site() -> None:
    rng = np.random.default_rng(5)
    labels, predicted = _site(300, 0.8, rng)
    correct = (labels == predicted).astype(float)
    mine = bootstrap_ci({"only": _confusion(labels, predicted)}, seed=11, resamples=20_000)
    ref = stats.bootstrap((correct,), np.mean, method="percentile", n_resamples=20_000,
                          rng=np.random.default_rng(12))
    # different generators, same distribution: Monte Carlo error of a 2.5 % quantile at
    # B = 20,000 is ~0.002 here, the lattice of values is 1/300
    assert mine["accuracy"] == pytest.approx(
        [ref.confidence_interval.low, ref.confidence_interval.high], abs=0.008
    )

    # balanced accuracy: the examples of each class resampled among themselves, by hand
    hand = np.random.default_rng(13)
    right = {c: (predicted[labels == c] == c) for c in (0, 1)}
    reps = np.mean([right[c][hand.integers(0, right[c].size, size=(20_000, right[c].size))]
                    .mean(axis=1) for c in (0, 1)], axis=0)
    assert mine["balanced_accuracy"] == pytest.approx(np.quantile(reps, [0.025, 0.975]), abs=0.008)


@pytest.mark.parametrize("draws", ["cells", "classes"])
def test_balanced_accuracy_interval_holds_a_rare_missed_class(draws: str) -> None:
    """A site whose rare classes (one test example each) the model misses: resampled within
    the site alone, those classes drop out of a third of the replicates, which then score
    higher than the reported value (the README digits example's local-only baseline printed
    0.565 with [0.58, 0.69]). Resampled within site and class, the interval holds the value,
    and its replicates average to it."""
    site = np.zeros((4, 4), dtype=np.int64)
    site[0, 0], site[0, 1], site[1, 1], site[1, 0] = 30, 10, 25, 5  # recalls 0.75, 0.833
    site[2, 0] = site[3, 1] = 1  # one example of class 2 and of class 3, both missed
    confusions = {f"s{i}": site for i in range(12)}  # many such sites: the bias dominates
    point = confusion_metrics(confusions)["balanced_accuracy"]
    low, high = bootstrap_ci(confusions, seed=0, draws=draws)["balanced_accuracy"]
    assert low < point < high
    # the site-stratified draw this replaced: its lower bound lies above the value
    from consortium.intervals import _site_statistics

    rng = np.random.default_rng(0)
    drawn = [rng.multinomial(int(c.sum()), c.ravel() / c.sum(), size=4000).reshape(4000, 4, 4)
             for c in confusions.values()]
    _, bal, n = _site_statistics(drawn)
    assert np.quantile(bal @ (n / n.sum()), 0.025) > point
    from consortium.intervals import balanced_replicates

    reps = balanced_replicates(np.stack(list(confusions.values())), np.random.default_rng(1), 20_000)
    assert reps.mean() == pytest.approx(point, abs=0.002)


def test_confusion_matrix_predicts_as_evaluate_model() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 3)
    x = torch.randn(50, 3)
    y = torch.randint(0, 3, (50,))
    counts = confusion_matrix(model, Split(x, y), num_classes=3)
    assert counts.sum() == 50 and counts.shape == (3, 3)
    assert list(counts.sum(axis=1)) == [int((y == c).sum()) for c in range(3)]
    reported = evaluate_model(model, Split(x, y), loss_fn=torch.nn.functional.cross_entropy,
                              num_classes=3)
    point = confusion_metrics({"site": counts})
    assert point["accuracy"] == pytest.approx(reported["accuracy"])
    assert point["balanced_accuracy"] == pytest.approx(reported["balanced_accuracy"])


def test_a_run_reports_bootstrap_intervals(tmp_path) -> None:
    from consortium.simulation import simulate

    out = tmp_path / "run"
    result = simulate({"rounds": 2, "personalization": {"finetune_steps": 2},
                       "evaluation": {"baselines": ["local", "pooled"]}}, out=out, report=True)
    summary = json.loads((out / "summary.json").read_text())
    ci = summary["ci"]
    assert ci["method"] == ("percentile bootstrap over test examples, stratified by site "
                            "(balanced accuracy: by site and class), B=1000")
    for section, values in (("final", summary["final"]), ("personalized", summary["personalized"]),
                            ("local", summary["baselines"]["local"]),
                            ("pooled", summary["baselines"]["pooled"])):
        interval = ci[section] if section in ("final", "personalized") else ci["baselines"][section]
        for metric in ("accuracy", "balanced_accuracy"):
            low, high = interval[metric]
            assert low <= values[metric] <= high, (section, metric)
            assert high - low > 0.01
    assert result.summary["ci"] == ci
    page = (out / "report.html").read_text()
    low, high = ci["final"]["accuracy"]
    assert f"[{low:.3f}, {high:.3f}]" in page and "stratified by site" in page


def test_the_printed_table_shows_intervals_under_accuracy(tmp_path, capsys, monkeypatch) -> None:
    from consortium.cli import main

    monkeypatch.setenv("COLUMNS", "80")  # a narrow terminal: nothing wraps
    out = tmp_path / "run"
    assert main(["run", "--set", "rounds=2", "--set", 'evaluation.baselines=["local"]',
                 "--out", str(out), "--no-progress", "--no-report"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    lines = printed.splitlines()
    row = next(i for i, line in enumerate(lines) if line.startswith("│ accuracy "))
    value_row, ci_row = lines[row], lines[row + 1]
    for value, (low, high) in ((summary["final"]["accuracy"], summary["ci"]["final"]["accuracy"]),
                               (summary["baselines"]["local"]["accuracy"],
                                summary["ci"]["baselines"]["local"]["accuracy"])):
        assert f"{value:.3f}" in value_row
        assert f"{low:.2f}–{high:.2f}" in ci_row
    assert "95% CI" in ci_row
    assert "95% CI: percentile bootstrap" in printed


def _many_sites(count: int, k: int, seed: int) -> dict[str, np.ndarray]:
    """``count`` sites' ``K × K`` confusions with skewed classes and varied sizes."""
    rng = np.random.default_rng(seed)
    out = {}
    for s in range(count):
        cells = rng.dirichlet(np.full(k * k, 0.4)) + np.eye(k).ravel() * rng.random()
        out[f"s{s}"] = rng.multinomial(int(rng.integers(5, 80)), cells / cells.sum()).reshape(k, k)
    return out


def test_class_draws_agree_with_cell_draws_within_monte_carlo_error() -> None:
    """The vectorised draw (class counts, then correct counts) has the cell draw's
    distribution: over 120 sites, 10 seeds of each give the same bounds within the seeds'
    spread (a bound's Monte-Carlo standard error with B = 1,000 is a few % of the width)."""
    confusions = _many_sites(120, 3, seed=2)
    for metric in ("accuracy", "balanced_accuracy"):
        bounds = {
            draws: np.array([bootstrap_ci(confusions, seed=s, draws=draws)[metric]
                             for s in range(10)])
            for draws in ("cells", "classes")
        }
        width = float(np.mean(bounds["cells"][:, 1] - bounds["cells"][:, 0]))
        for side in (0, 1):
            a, b = bounds["cells"][:, side], bounds["classes"][:, side]
            se = math.sqrt(a.var(ddof=1) / a.size + b.var(ddof=1) / b.size)
            assert abs(a.mean() - b.mean()) < 4 * se + 1e-12, (metric, side)
            assert a.std() < 0.1 * width  # the bounds are precise enough to compare
        # and the point estimate sits inside
        point = confusion_metrics(confusions)[metric]
        assert bounds["classes"][:, 0].max() < point < bounds["classes"][:, 1].min()


def test_class_draws_of_one_site_are_binomial() -> None:
    """One site of n = 40 with 30 right: a replicate's accuracy is Binomial(40, 0.75) / 40, so
    the 2.5 % and 97.5 % quantiles of 1,000 replicates are near scipy's binomial ones."""
    confusions = {"a": np.array([[20, 4], [6, 10]])}
    low, high = bootstrap_ci(confusions, seed=3, resamples=20_000, draws="classes")["accuracy"]
    exact = stats.binom(40, 0.75)
    assert low == pytest.approx(exact.ppf(0.025) / 40, abs=1 / 40)
    assert high == pytest.approx(exact.ppf(0.975) / 40, abs=1 / 40)


def test_class_draws_resample_within_each_site() -> None:
    confusions = {"right": np.array([[50, 0], [0, 50]]), "wrong": np.array([[0, 50], [50, 0]])}
    ci = bootstrap_ci(confusions, seed=0, draws="classes")
    assert ci["accuracy"] == [0.5, 0.5] and ci["balanced_accuracy"] == [0.5, 0.5]


def test_auto_draws_cells_up_to_many_sites_and_classes_above() -> None:
    few = _many_sites(MANY_SITES, 2, seed=4)
    assert bootstrap_ci(few, seed=1) == bootstrap_ci(few, seed=1, draws="cells")
    many = _many_sites(MANY_SITES + 1, 2, seed=4)
    assert bootstrap_ci(many, seed=1) == bootstrap_ci(many, seed=1, draws="classes")
    assert bootstrap_ci({"e": np.zeros((2, 2), dtype=int)}, seed=1, draws="classes") == {}
    with pytest.raises(ConfigError, match="draws"):
        bootstrap_ci(few, seed=1, draws="pooled")
