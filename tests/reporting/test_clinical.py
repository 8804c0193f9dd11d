"""The clinical reading: rates by hand, ROC and AUC against scikit-learn, the bootstrap blocks,
the per-site sentences, the pooled-below-federated note and the DP paragraph."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from consortium.intervals import (
    bootstrap_auc_ci,
    bootstrap_ci,
    confusion_metrics,
    percentile_interval,
    resample_confusions,
    weighted_auc,
)
from consortium.reporting.clinical import (
    add_clinical,
    class_names,
    clinical_summary,
    confusion_rates,
    roc_curve,
)
from consortium.reporting.clinical_report import (
    clinical_section,
    epsilon_reading,
    majority_warning,
    pooled_note,
    privacy_section,
    site_sentence,
)
from consortium.reporting.report import write_report
from consortium.seeds import derive_seed

# rows: true (no disease, disease); columns: predicted (no disease, disease)
TINY = np.array([[3, 1], [2, 4]])  # TN 3, FP 1, FN 2, TP 4


def test_rates_of_a_tiny_confusion_matrix_by_hand() -> None:
    rates = {k: float(v) for k, v in confusion_rates(TINY).items()}
    assert rates["accuracy"] == pytest.approx(7 / 10)
    assert rates["sensitivity"] == pytest.approx(4 / 6)  # TP / (TP + FN)
    assert rates["specificity"] == pytest.approx(3 / 4)  # TN / (TN + FP)
    assert rates["ppv"] == pytest.approx(4 / 5)  # TP / (TP + FP)
    assert rates["npv"] == pytest.approx(3 / 5)  # TN / (TN + FN)
    assert rates["balanced_accuracy"] == pytest.approx((4 / 6 + 3 / 4) / 2)


def test_majority_reference_and_prevalence_by_hand() -> None:
    block = clinical_summary({"final": {"a": TINY, "b": np.array([[9, 0], [1, 0]])}}, seed=0,
                             classes=["no disease", "disease"])
    a = block["final"]["sites"]["a"]
    assert a["n"] == 10 and a["prevalence"] == pytest.approx(0.6)
    assert (a["majority_class"], a["majority_label"]) == (1, "disease")
    assert a["majority_accuracy"] == pytest.approx(0.6)
    assert a["vs_majority"] == pytest.approx(0.7 - 0.6)
    b = block["final"]["sites"]["b"]  # 9 of 10 without disease: "always no disease" scores 0.9
    assert (b["majority_label"], b["majority_accuracy"]) == ("no disease", pytest.approx(0.9))
    assert b["sensitivity"] == 0.0 and b["ppv"] is None  # nothing predicted positive
    overall = block["final"]["overall"]  # all 20 test cases together
    assert overall["confusion"] == [[12, 1], [3, 4]]
    assert overall["prevalence"] == pytest.approx(7 / 20)
    assert overall["majority_label"] == "no disease" and overall["majority_accuracy"] == pytest.approx(13 / 20)
    assert overall["sensitivity"] == pytest.approx(4 / 7) and overall["specificity"] == pytest.approx(12 / 13)
    assert "balanced_accuracy" not in overall  # the federation's is the sites' mean


def test_undefined_rates_are_nan_not_an_error() -> None:
    rates = confusion_rates(np.array([[5, 0], [0, 0]]))  # no positive case, nothing predicted positive
    assert np.isnan(rates["sensitivity"]) and np.isnan(rates["ppv"])
    assert float(rates["specificity"]) == 1.0 and float(rates["npv"]) == 1.0


def test_roc_curve_matches_scikit_learn_with_ties() -> None:
    from sklearn.metrics import roc_auc_score
    from sklearn.metrics import roc_curve as sk_roc

    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 300)
    scores = np.round(rng.normal(labels * 0.8, 1.0), 1)  # rounded: many ties
    fpr, tpr = roc_curve(scores, labels)
    sk_fpr, sk_tpr, _ = sk_roc(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    auc = weighted_auc(scores, labels, np.ones((1, len(scores))))[0]
    assert auc == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_weighted_auc_counts_an_example_as_often_as_its_weight() -> None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(5)
    labels = rng.integers(0, 2, 40)
    scores = np.round(rng.normal(labels, 1.0), 1)
    weights = rng.integers(0, 4, (3, 40))
    got = weighted_auc(scores, labels, weights)
    for row, w in zip(got, weights, strict=True):
        repeated = np.repeat(np.arange(40), w)
        assert row == pytest.approx(roc_auc_score(labels[repeated], scores[repeated]), abs=1e-12)
    assert np.isnan(weighted_auc(scores, np.ones(40, dtype=int), np.ones((1, 40)))[0])


def test_percentile_interval_is_none_when_mostly_undefined() -> None:
    assert percentile_interval(np.array([np.nan] * 6 + [0.5] * 4)) is None
    assert percentile_interval(np.array([0.1, 0.2, np.nan, 0.3])) is not None


def test_overall_accuracy_interval_is_the_run_ci() -> None:
    """The clinical block draws the replicates ``ci`` draws: one interval per number."""
    confusions = {"a": TINY, "b": np.array([[20, 5], [4, 11]])}
    block = clinical_summary({"final": confusions}, seed=7)
    expected = bootstrap_ci(confusions, seed=derive_seed(7, "bootstrap", "final"))["accuracy"]
    assert block["final"]["overall"]["ci"]["accuracy"] == pytest.approx(expected)


def test_resampled_confusions_keep_each_site_size() -> None:
    drawn = dict(resample_confusions({"a": TINY, "empty": np.zeros((2, 2))}, seed=1, resamples=50))
    assert list(drawn) == ["a"] and drawn["a"].shape == (50, 2, 2)
    assert (drawn["a"].sum(axis=(1, 2)) == 10).all()


def test_auc_interval_contains_the_auc() -> None:
    rng = np.random.default_rng(0)
    sites = {}
    for name in ("a", "b"):
        y = rng.integers(0, 2, 80)
        sites[name] = (rng.normal(y, 1.0), y)
    overall, by_site = bootstrap_auc_ci(sites, seed=0, resamples=300)
    s = np.concatenate([v[0] for v in sites.values()])
    y = np.concatenate([v[1] for v in sites.values()])
    auc = weighted_auc(s, y, np.ones((1, len(s))))[0]
    assert overall is not None and overall[0] < auc < overall[1]
    assert set(by_site) == {"a", "b"}


def test_class_names_from_the_data_notes() -> None:
    assert class_names({"labels": "0=no disease, 1=disease"}, 2) == ["no disease", "disease"]
    assert class_names({"labels": "0=a, 1=b, c, 2=d"}, 3) == ["a", "b, c", "d"]
    assert class_names({}, 2) is None and class_names({"labels": "0=x"}, 2) is None


SWITZERLAND = {"n": 31, "prevalence": 0.935, "majority_class": 1, "majority_label": "disease",
               "majority_accuracy": 0.935, "confusion": [[1, 1], [3, 26]],
               "sensitivity": 26 / 29, "specificity": 0.5, "ci": {"accuracy": [0.74, 0.97]}}


def test_a_site_below_its_majority_class_is_said_in_plain_words() -> None:
    local = {"confusion": [[0, 2], [0, 29]], "majority_class": 1, "majority_label": "disease",
             "ci": {"accuracy": [0.84, 1.0]}}
    text = site_sentence("switzerland", federated=0.871, local=0.935, entry=SWITZERLAND,
                         local_entry=local, positive="disease")
    assert "the federated model (0.871) is below always predicting disease (0.935)" in text
    assert "finds 26 of the 29 cases labelled disease" in text
    assert "does better alone (0.935)" in text
    assert "predicts disease for every case" in text and "intervals overlap" in text


def test_a_site_above_its_majority_class_is_not_called_below() -> None:
    entry = {**SWITZERLAND, "majority_accuracy": 0.6, "majority_label": "no disease"}
    text = site_sentence("cleveland", federated=0.868, local=0.842, entry=entry, positive="disease")
    assert "below" not in text and "is above always predicting no disease (0.600)" in text
    assert "gains from the federation" in text


def _summary(fed: float, pooled: float) -> dict:
    return {"final": {"accuracy": fed}, "baselines": {"pooled": {"accuracy": pooled}},
            "ci": {"final": {"accuracy": [0.80, 0.89]},
                   "baselines": {"pooled": {"accuracy": [0.79, 0.88]}}}}


def test_pooled_below_federated_is_explained_only_when_it_happens() -> None:
    note = pooled_note(_summary(0.848, 0.840))
    assert "Why pooled scores below federated" in note
    assert "trained differently" in note and "intervals overlap" in note
    assert pooled_note(_summary(0.848, 0.850)) == ""
    assert pooled_note(_summary(0.848, 0.848)) == ""
    assert pooled_note({"final": {"accuracy": 0.8}}) == ""


@pytest.mark.parametrize(("mode", "unit"), [
    ("central", "protects one site"), ("distributed", "protects one site"),
    ("local", "protects one record (one patient) at each site"),
])
def test_the_dp_paragraph_names_what_is_protected(mode: str, unit: str) -> None:
    summary = {"privacy": {"epsilon": 4.2, "delta": 1e-5}}
    text = privacy_section(summary, f'[privacy]\nmode = "{mode}"\n')
    assert unit in text and "ε = 4.20" in text and "<strong>moderate</strong>" in text
    assert "NIST Special Publication 800-226" in text and "Dwork" in text
    assert privacy_section(summary, '[privacy]\nmode = "none"\n') == ""


def test_dp_mode_falls_back_to_the_mechanism_and_epsilon_is_graded() -> None:
    summary = {"privacy": {"epsilon": 40.0, "delta": 1e-5, "mechanism": "DP-SGD (local, per site)",
                           "site_epsilon": {"a": 40.0, "b": 12.5}}}
    text = privacy_section(summary, None)
    assert "one record" in text and "<strong>weak</strong>" in text and "b 12.50" in text
    assert [epsilon_reading(e) for e in (0.5, 1.0, 5.0, 10.0, 10.5)] == [
        "strong", "strong", "moderate", "moderate", "weak"]


def test_a_deployment_says_what_is_not_available() -> None:
    summary = {"per_client": {"a": {"accuracy": 0.8, "local_accuracy": 0.7}}}
    text = clinical_section(summary)
    assert "were not available" in text and "accuracy" in text
    assert "0.800" in text and "0.700" in text  # the comparison the sites reported


def test_add_clinical_skips_predictions_that_are_not_the_run_s() -> None:
    summary: dict = {"final": {"accuracy": 0.5}, "per_client": {"a": {"accuracy": 0.7}}}
    add_clinical(summary, {"final": {"a": TINY}}, seed=0)  # 0.7 ≠ 0.5 reported
    assert "clinical" not in summary
    summary["final"].update(accuracy=0.7, balanced_accuracy=(4 / 6 + 3 / 4) / 2)
    add_clinical(summary, {"final": {"a": TINY}}, seed=0)
    entry = summary["per_client"]["a"]
    assert entry["prevalence"] == pytest.approx(0.6) and entry["majority_accuracy"] == pytest.approx(0.6)
    assert entry["sensitivity"] == entry["global_sensitivity"] == pytest.approx(4 / 6)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default experiment (heart disease, four hospitals), a few rounds."""
    from consortium.simulation import simulate

    out = tmp_path_factory.mktemp("clinical") / "run"
    simulate(overrides=["rounds=3"], out=out)
    return out


def test_a_run_records_the_clinical_block_consistent_with_its_metrics(demo: Path) -> None:
    summary = json.loads((demo / "summary.json").read_text())
    clinical = summary["clinical"]
    assert clinical["classes"] == ["no disease", "disease"]
    sites = clinical["final"]["sites"]
    assert set(sites) == set(summary["per_client"]) == {"cleveland", "hungarian", "switzerland", "va"}
    for site, entry in sites.items():
        reported = summary["per_client"][site]
        assert entry["accuracy"] == pytest.approx(reported["accuracy"], abs=1e-12)
        assert entry["auc"] == pytest.approx(reported["auc"], abs=1e-12)  # same scores as the evaluation
        assert reported["sensitivity"] == entry["sensitivity"]
        assert entry["roc"]["fpr"][0] == 0.0 and entry["roc"]["tpr"][-1] == 1.0
        assert "local_sensitivity" in reported
    assert clinical["final"]["overall"]["n"] == sum(e["n"] for e in sites.values())
    below = [s for s, e in sites.items() if e["accuracy"] < e["majority_accuracy"]]
    warning = majority_warning(summary)
    assert (warning is None) == (not below)
    assert warning is None or all(site in warning for site in below)
    assert set(clinical["baselines"]) == {"local", "pooled"}


def test_the_report_is_one_self_contained_page(demo: Path) -> None:
    page = write_report(demo).read_text(encoding="utf-8")
    links = re.findall(r'\b(?:src|href)\s*=\s*["\']?([^"\' >]*)', page)
    assert links and all(link.startswith("data:") for link in links), links
    assert "<link" not in page and "<script" not in page and "@import" not in page
    assert "plots/roc.png" in page  # inlined, its name kept
    for text in ("Clinical reading", "always predicting", "sensitivity", "specificity", "PPV",
                 "NPV", "Who gains", "Confusion matrices", "At <strong>switzerland</strong>"):
        assert text in page, text


def test_a_deployment_still_says_who_gains_from_what_the_sites_reported() -> None:
    summary = {"per_client": {"a": {"accuracy": 0.8, "local_accuracy": 0.7},
                              "b": {"accuracy": 0.6, "local_accuracy": 0.75}}}
    text = clinical_section(summary)
    assert "At <strong>a</strong> the federated model scores 0.800" in text
    assert "gains from the federation: alone it reaches 0.700" in text
    assert "does better alone (0.750)" in text


def test_many_sites_keep_overall_intervals_and_per_site_rates() -> None:
    from consortium.reporting.clinical import SITE_LIMIT

    rng = np.random.default_rng(2)
    confusions = {f"s{i}": rng.integers(0, 6, (2, 2)) + np.eye(2, dtype=int) for i in range(SITE_LIMIT + 50)}
    block = clinical_summary({"final": confusions}, seed=0)["final"]
    assert "sites" not in block and block["overall"]["ci_method"].startswith("Poisson")
    low, high = block["overall"]["ci"]["accuracy"]
    assert low < block["overall"]["accuracy"] < high
    total = sum(confusions.values())
    assert block["overall"]["accuracy"] == pytest.approx(np.trace(total) / total.sum())
    summary: dict = {"final": confusion_metrics(confusions)}  # the run's own numbers
    add_clinical(summary, {"final": confusions}, seed=0)
    assert "sites" not in summary["clinical"]["final"]
    assert len(summary["per_client"]) == SITE_LIMIT + 50
    first = confusions["s0"]
    assert summary["per_client"]["s0"]["sensitivity"] == pytest.approx(first[1, 1] / first[1].sum())


def test_pooled_poisson_replicates_centre_on_the_counts() -> None:
    from consortium.intervals import resample_pooled_confusion

    confusions = {"a": TINY, "b": np.array([[20, 5], [4, 11]])}
    drawn = resample_pooled_confusion(confusions, seed=0, resamples=20_000)
    assert drawn is not None and drawn.shape == (20_000, 2, 2)
    np.testing.assert_allclose(drawn.mean(axis=0), TINY + confusions["b"], rtol=0.02)
    assert resample_pooled_confusion({"z": np.zeros((2, 2))}, seed=0) is None


def test_inlining_refuses_files_outside_the_run(tmp_path: Path) -> None:
    from consortium.reporting.report import _inline_images

    (tmp_path / "secret.png").write_bytes(b"\x89PNG secret")
    run = tmp_path / "run"
    (run / "plots").mkdir(parents=True)
    (run / "plots" / "a.png").write_bytes(b"\x89PNG mine")
    page = _inline_images(run, '<img src="../secret.png" alt="x"> <img src="plots/a.png" alt="y">')
    assert 'data-source="../secret.png" src="data:,"' in page
    assert "data:image/png;base64," in page and page.count("base64,") == 1


def test_the_console_warns_of_sites_below_their_majority_class() -> None:
    summary = {"clinical": {"final": {"sites": {
        "switzerland": {"accuracy": 0.871, "majority_accuracy": 0.935, "vs_majority": -0.064},
        "cleveland": {"accuracy": 0.868, "majority_accuracy": 0.539, "vs_majority": 0.329}}}}}
    warning = majority_warning(summary)
    assert warning is not None and "At 1 of 2 sites" in warning
    assert "switzerland 0.871 < 0.935" in warning and "cleveland" not in warning
    assert majority_warning({}) is None


def test_the_brief_names_sites_below_their_majority_and_the_dp_unit() -> None:
    from consortium.reporting.clinical_report import brief_section

    overall = {"n": 81, "accuracy": 0.87, "majority_accuracy": 0.6, "majority_label": "disease",
               "sensitivity": 0.9, "specificity": 0.8, "ci": {"accuracy": [0.8, 0.93]}}
    sites = {"switzerland": {**SWITZERLAND, "accuracy": 0.871, "vs_majority": -0.064},
             "cleveland": {"accuracy": 0.868, "majority_accuracy": 0.539, "vs_majority": 0.329}}
    summary = {"clinical": {"final": {"overall": overall, "sites": sites}},
               "privacy": {"epsilon": 0.7, "mechanism": "gaussian (DP-FedAvg)"}}
    text = brief_section(summary)
    assert "accuracy 0.870 [0.80, 0.93]; always predicting disease: 0.600" in text
    assert "At 1 of 2 sites" in text and "<strong>switzerland</strong>" in text
    assert "cleveland" not in text
    assert "protects one site at ε = 0.70, strong" in text
    assert brief_section({}) == ""


def test_a_site_balanced_accuracy_interval_holds_its_value_with_a_rare_missed_class() -> None:
    """A site with one example each of two classes the model misses: its balanced accuracy
    interval (drawn within each class) holds the reported value; resampling the site's
    examples alone would drop those classes from a third of the replicates and lift them."""
    site = np.zeros((4, 4), dtype=np.int64)
    site[0, 0], site[0, 1], site[1, 1], site[1, 0] = 30, 10, 25, 5
    site[2, 0] = site[3, 1] = 1
    entry = clinical_summary({"final": {"a": site}}, seed=0)["final"]["sites"]["a"]
    low, high = entry["ci"]["balanced_accuracy"]
    value = entry["balanced_accuracy"]
    # about ±2 sd of (Binomial(40, .75)/40 + Binomial(30, .83)/30) / 4 around the value; the
    # site-stratified draw gave about [0.33, 0.80], centred far above it
    assert low < value < high and abs((low + high) / 2 - value) < 0.03 and high - low < 0.15
    assert entry["balanced_accuracy"] == pytest.approx((0.75 + 25 / 30) / 4)
