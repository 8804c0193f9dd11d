"""Equalised-odds post-processing (Hardt, Price, Srebro 2016, deterministic thresholds):
hand-computed thresholds and rates, the summed site histograms, and a heart-disease run."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from consortium.config import ExperimentConfig
from consortium.errors import ConfigError, DataError
from consortium.executors.sequential import SequentialExecutor
from consortium.server.thresholds import (
    BINS,
    add_histograms,
    choose_thresholds,
    equalized_odds_postprocess,
    score_bins,
    score_histograms,
)
from consortium.simulation import simulate

# Fitting rows (score, label) per group, scores mid-bin (a softmax's rounding cannot move them
# across a bin edge). ROC points by bin threshold k:
#   a: k <= 15 (1, 1); 16..45 (1, 1/2); 46..65 (1/2, 1/2); 66..85 (1/2, 0); >= 86 (0, 0)
#   b: k <= 25 (1, 1); 26..35 (1, 1/2); 36..75 (1, 0);     76..95 (1/2, 0); >= 96 (0, 0)
FIT_A = ([0.855, 0.455, 0.655, 0.155], [1, 1, 0, 0])
FIT_B = ([0.955, 0.755, 0.355, 0.255], [1, 1, 0, 0])


def _hist() -> dict[str, np.ndarray]:
    scores = np.array(FIT_A[0] + FIT_B[0])
    return score_histograms(scores, np.array(FIT_A[1] + FIT_B[1]), np.array(["a"] * 4 + ["b"] * 4))


def test_score_bins_and_histograms() -> None:
    assert score_bins(np.array([0.0, 0.015, 0.45, 0.999, 1.0])).tolist() == [0, 1, 45, 99, 100]
    h = score_histograms(np.array([0.45, 0.45, 0.15, 0.9]), np.array([1, 0, 1, 1]),
                         np.array(["a", "a", "a", "missing"]))
    assert set(h) == {"a"} and h["a"].shape == (2, BINS)  # "missing" is not thresholded
    assert h["a"][0, 45] == 1 and h["a"][1, 45] == 1 and h["a"][1, 15] == 1
    assert h["a"].sum() == 3


def test_thresholds_by_hand_without_tolerance() -> None:
    # gap 0 with the most fitting rows right (6 of 8): a and b both at (TPR 1, FPR 1/2)
    # (a 16..45, b 26..35) or both at (1/2, 0) (a 66..85, b 76..95); nearest the model's own
    # 50: a = 45, b = 35 (distance 5 + 15) beats a = 66, b = 76 (16 + 26)
    out = choose_thresholds(_hist(), tolerance=0.0)
    assert out["thresholds"] == {"a": 45, "b": 35}
    fit = out["fit"]
    assert fit["groups"]["a"] == {"n": 4, "tpr": 1.0, "fpr": 0.5}
    assert fit["groups"]["b"] == {"n": 4, "tpr": 1.0, "fpr": 0.5}
    assert fit["equalized_odds"] == 0.0 and fit["accuracy"] == 0.75
    # the model's own decision (k = 50): a (1/2, 1/2), b (1, 0): gap 1/2, 6 of 8 right
    assert out["fit_plain"]["equalized_odds"] == 0.5 and out["fit_plain"]["accuracy"] == 0.75


def test_a_tolerance_buys_accuracy() -> None:
    # a gap up to 1/2 allows a (1, 1/2) with b (1, 0): 7 of 8 right; nearest 50: a = 45, b = 50
    out = choose_thresholds(_hist(), tolerance=0.5)
    assert out["thresholds"] == {"a": 45, "b": 50}
    assert out["fit"]["accuracy"] == 0.875 and out["fit"]["equalized_odds"] == 0.5


def test_the_plain_gap_is_never_widened() -> None:
    # a: positives 0.555, 0.455, negative 0.155; b: positives 0.555, 0.355, negative 0.455.
    # The model's own k = 50 gives both (TPR 1/2, FPR 0): gap 0, 4 of 6 right. a = 45 would
    # make a perfect (5 of 6 right) at a gap of 1/2: a tolerance of 1 must not buy it.
    h = score_histograms(np.array([0.555, 0.455, 0.155, 0.555, 0.355, 0.455]),
                         np.array([1, 1, 0, 1, 1, 0]), np.array(["a"] * 3 + ["b"] * 3))
    out = choose_thresholds(h, tolerance=1.0)
    assert out["thresholds"] == {"a": 50, "b": 50}
    assert out["fit"]["equalized_odds"] == 0.0 and out["fit"]["accuracy"] == pytest.approx(4 / 6)


def test_anchored_thresholds_by_hand() -> None:
    # a (6 rows, the largest) stays at k = 50: TPR 2/3, FPR 1/3. b's ROC points:
    # k <= 15 (1, 1); 16..35 (1, 1/2); 36..45 (1/2, 1/2); 46..75 (1/2, 0); >= 76 (0, 0);
    # gaps to a: 2/3, 1/3, 1/6, 1/3, 2/3: the smallest at 36..45, nearest 50: b = 45
    h = score_histograms(
        np.array([0.855, 0.655, 0.455, 0.555, 0.255, 0.155, 0.755, 0.355, 0.455, 0.155]),
        np.array([1, 1, 1, 0, 0, 0, 1, 1, 0, 0]), np.array(["a"] * 6 + ["b"] * 4))
    out = choose_thresholds(h, tolerance=0.0, anchor=True)
    assert out["thresholds"] == {"a": 50, "b": 45}
    assert out["fit"]["equalized_odds"] == pytest.approx(1 / 6)
    assert out["fit_plain"]["equalized_odds"] == pytest.approx(1 / 3)
    assert out["fit"]["groups"]["b"] == {"n": 4, "tpr": 0.5, "fpr": 0.5}
    # moving both groups, gap 0 is reached only by the trivial corners (a's ROC points are
    # (1, 1) (1, 2/3) (1, 1/3) (2/3, 1/3) (2/3, 0) (1/3, 0) (0, 0)): none positive, a >= 86
    # and b >= 76, is nearer 50 than all positive (a, b <= 15); half the rows right
    free = choose_thresholds(h, tolerance=0.0)
    assert free["thresholds"] == {"a": 86, "b": 76}
    assert free["fit"]["equalized_odds"] == 0.0 and free["fit"]["accuracy"] == 0.5


def test_sites_add_their_counts() -> None:
    scores, labels = np.array(FIT_A[0] + FIT_B[0]), np.array(FIT_A[1] + FIT_B[1])
    groups = np.array(["a"] * 4 + ["b"] * 4)
    first = [0, 2, 4, 6]
    rest = [1, 3, 5, 7]
    shares = [score_histograms(scores[i], labels[i], groups[i]) for i in (first, rest)]
    total = add_histograms(shares)
    assert all(np.array_equal(total[g], _hist()[g]) for g in ("a", "b"))
    # neither site alone gives the pooled answer
    assert choose_thresholds(shares[0], tolerance=0.0)["thresholds"] != {"a": 45, "b": 35}


def test_groups_are_refused_when_too_few_or_too_many() -> None:
    with pytest.raises(DataError, match="at least two groups"):
        choose_thresholds({"a": _hist()["a"]}, tolerance=0.0)
    many = {g: _hist()["a"] for g in "abcd"}
    with pytest.raises(ConfigError, match="at most 3"):
        choose_thresholds(many, tolerance=0.0)


class _Prob(torch.nn.Module):
    """Outputs log-probabilities whose softmax gives P(class 1) = feature 1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = x[:, 1].double()
        return torch.stack([torch.log1p(-p), torch.log(p)], dim=1)


class _Split:
    def __init__(self, p: list[float], y: list[int]) -> None:
        self.x = torch.tensor([[0.0, v] for v in p], dtype=torch.float64).reshape(len(p), 2)
        self.y = torch.tensor(y, dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.y)


def test_postprocessed_rates_by_hand() -> None:
    # site s1 fits on one row of each (group, label) cell, s2 on the others; s1 alone is tested
    fit1 = _Split([0.855, 0.655, 0.955, 0.355], [1, 0, 1, 0])
    fit2 = _Split([0.455, 0.155, 0.755, 0.255], [1, 0, 1, 0])
    test = _Split([0.55, 0.40, 0.48, 0.20, 0.36, 0.30, 0.38, 0.60], [1, 1, 0, 0, 1, 0, 0, 1])
    data = SimpleNamespace(
        num_classes=2, feature_names=("g", "score"),
        clients={"s1": SimpleNamespace(test=test), "s2": SimpleNamespace(test=_Split([], []))},
        fitting={"s1": fit1, "s2": fit2},
        groups={"s1": {"g": {"fit": np.array(["a", "a", "b", "b"]),
                             "test": np.array(["a"] * 4 + ["b"] * 3 + ["missing"])}},
                "s2": {"g": {"fit": np.array(["a", "a", "b", "b"]), "test": np.array([])}}},
    )
    out = equalized_odds_postprocess(_Prob(), data, "g", tolerance=0.0)
    assert out["thresholds"] == {"a": 0.45, "b": 0.35}
    groups = out["overall"]["groups"]
    # a (>= bin 45): 0.55 TP, 0.40 FN, 0.48 FP, 0.20 TN; b (>= 35): 0.36 TP, 0.30 TN, 0.38 FP
    assert (groups["a"]["tpr"], groups["a"]["fpr"], groups["a"]["accuracy"]) == (0.5, 0.5, 0.5)
    assert (groups["b"]["tpr"], groups["b"]["fpr"]) == (1.0, 0.5)
    assert groups["missing"]["tpr"] == 1.0  # keeps the model's own decision: 0.60 > 0.5
    assert out["overall"]["gaps"]["equalized_odds"] == 0.5
    # plain (argmax, p > 0.5): a TP FN TN TN, b FN TN TN, missing TP: 6 of 8; after: 5 of 8
    assert out["plain"]["accuracy"] == 0.75 and out["accuracy"] == 0.625
    assert out["accuracy_cost"] == pytest.approx(0.125)
    # balanced: after recall 3/4 and specificity 2/4; plain 2/4 and 4/4
    assert out["balanced_accuracy"] == pytest.approx(0.625)
    assert out["plain"]["balanced_accuracy"] == pytest.approx(0.75)
    assert out["fit"]["n"] == 8 and out["fit"]["chosen"]["equalized_odds"] == 0.0
    assert set(out["sites"]) == {"s1"}
    del data.fitting["s2"]
    with pytest.raises(DataError, match="no fitting rows"):
        equalized_odds_postprocess(_Prob(), data, "g", tolerance=0.0)


def test_heart_disease_thresholds_in_summary_and_deterministic() -> None:
    cfg = ExperimentConfig.from_dict({
        "rounds": 2, "evaluation": {"groups": ["sex"], "baselines": []},
        "fairness": {"method": "thresholds", "column": "sex", "fit_fraction": 0.3}})
    first = simulate(cfg).summary
    post = first["groups"]["sex"]["postprocessed"]
    assert set(post["thresholds"]) == {"0", "1"}
    assert all(0 <= t <= 1.01 for t in post["thresholds"].values())
    # the plain figures are the run's own final metrics
    assert post["plain"]["accuracy"] == pytest.approx(first["final"]["accuracy"], abs=1e-12)
    assert post["plain"]["balanced_accuracy"] == pytest.approx(
        first["final"]["balanced_accuracy"], abs=1e-12)
    assert sum(g["n"] for g in post["overall"]["groups"].values()) == 231
    assert post["fit"]["chosen"]["equalized_odds"] <= post["fit"]["plain"]["equalized_odds"]
    again = simulate(cfg).summary["groups"]["sex"]["postprocessed"]
    assert again == post


def test_config_checks() -> None:
    groups = {"groups": ["sex"]}
    with pytest.raises(ConfigError, match="fit_fraction"):
        ExperimentConfig.from_dict({"evaluation": groups, "fairness": {
            "method": "reweigh", "column": "sex", "fit_fraction": 0.3}})
    with pytest.raises(ConfigError, match=r"in \[0, 1\)"):
        ExperimentConfig.from_dict({"evaluation": groups, "fairness": {
            "method": "thresholds", "column": "sex", "fit_fraction": 1.0}})
    with pytest.raises(ConfigError, match="tolerance"):
        ExperimentConfig.from_dict({"evaluation": groups, "fairness": {
            "method": "thresholds", "column": "sex", "tolerance": -0.1}})
    cfg = ExperimentConfig.from_dict({"evaluation": groups, "fairness": {
        "method": "reweigh+thresholds", "column": "sex"}})
    assert cfg.fairness.fit_fraction == 0.0


class _Remote(SequentialExecutor):
    name = "remote"


def test_thresholds_are_refused_over_grpc() -> None:
    cfg = ExperimentConfig.from_dict({"rounds": 1, "evaluation": {"groups": ["sex"]}, "fairness": {
        "method": "thresholds", "column": "sex"}})
    with pytest.raises(ConfigError, match=r"\[fairness\] run in simulation only"):
        simulate(cfg, executor=_Remote())


def test_a_carved_fitting_split_trains_the_same_in_every_executor() -> None:
    cfg = {"rounds": 2, "evaluation": {"groups": ["sex"], "baselines": []},
           "fairness": {"method": "thresholds", "column": "sex", "fit_fraction": 0.3}}
    ref = simulate(ExperimentConfig.from_dict({**cfg, "executor": {"kind": "sequential"}}))
    got = simulate(ExperimentConfig.from_dict({**cfg, "executor": {"kind": "vectorized"}}))
    assert torch.allclose(got.params.vector, ref.params.vector, atol=1e-5)
    assert (got.summary["groups"]["sex"]["postprocessed"]["thresholds"]
            == ref.summary["groups"]["sex"]["postprocessed"]["thresholds"])
