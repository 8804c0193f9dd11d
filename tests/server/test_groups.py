"""Group fairness metrics of the final model: hand-computed rates and gaps, and the heart-disease
run by sex."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from consortium.config import ExperimentConfig
from consortium.errors import ConfigError
from consortium.server.groups import group_metrics
from consortium.simulation import simulate


class _Fixed(torch.nn.Module):
    """Predicts class 1 exactly when feature 1 (the score) is positive."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([-x[:, 1], x[:, 1]], dim=1)


class _Split:
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)


def _site(x: list[list[float]], y: list[int]) -> SimpleNamespace:
    return SimpleNamespace(test=_Split(torch.tensor(x), torch.tensor(y)))


def test_rates_and_gaps_by_hand() -> None:
    # feature 0: sex (0/1); feature 1: score (> 0 predicts 1)
    a = _site([[1, 1], [1, 1], [1, -1], [0, 1], [0, -1], [0, -1]], [1, 0, 1, 1, 1, 0])
    b = _site([[1, -1], [0, 1]], [0, 0])
    data = SimpleNamespace(feature_names=("sex", "score"), num_classes=2,
                           clients={"a": a, "b": b})
    out = group_metrics(_Fixed(), data, ["sex"])["sex"]
    men = out["overall"]["groups"]["1"]  # rows: (y, pred) = (1,1) (0,1) (1,0) | (0,0)
    rates = ("n", "accuracy", "tpr", "fpr", "positive_rate")
    assert {k: men[k] for k in rates} == {"n": 4, "accuracy": 0.5, "tpr": 0.5, "fpr": 0.5,
                                          "positive_rate": 0.5}
    women = out["overall"]["groups"]["0"]  # (1,1) (1,0) (0,0) | (0,1)
    assert {k: women[k] for k in rates} == {"n": 4, "accuracy": 0.5, "tpr": 0.5, "fpr": 0.5,
                                            "positive_rate": 0.5}
    site_a = out["sites"]["a"]["groups"]
    assert site_a["1"]["tpr"] == 0.5 and site_a["1"]["fpr"] == 1.0  # (1,1) (0,1) (1,0)
    assert site_a["0"]["tpr"] == 0.5 and site_a["0"]["fpr"] == 0.0  # (1,1) (1,0) (0,0)
    gaps = out["sites"]["a"]["gaps"]
    assert gaps["equalized_odds"] == pytest.approx(1.0)  # FPR 1.0 vs 0.0
    assert gaps["demographic_parity"] == pytest.approx(2 / 3 - 1 / 3)
    gaps = out["overall"]["gaps"]
    assert {k: gaps[k] for k in ("accuracy", "equalized_odds", "demographic_parity")} == {
        "accuracy": 0.0, "equalized_odds": 0.0, "demographic_parity": 0.0}


class _Prob(torch.nn.Module):
    """Outputs log-probabilities whose softmax gives P(class 1) = feature 1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = x[:, 1].double()
        return torch.stack([torch.log1p(-p), torch.log(p)], dim=1)


def test_calibration_by_hand() -> None:
    # feature 0: group, feature 1: p = P(y = 1); two sites, pooled overall
    a = _site([[1, .15], [1, .15], [1, .85], [1, .85], [0, .35], [0, .35], [0, .65], [0, .65]],
              [0, 1, 1, 1, 0, 1, 0, 0])
    b = _site([[1, .95]], [1])
    data = SimpleNamespace(feature_names=("g", "p"), num_classes=2, clients={"a": a, "b": b})
    out = group_metrics(_Prob(), data, ["g"])["g"]
    g1 = out["sites"]["a"]["groups"]["1"]
    # bin [0.1, 0.2): 2 rows, Σp = 0.3, Σy = 1; bin [0.8, 0.9): 2 rows, Σp = 1.7, Σy = 2
    assert g1["mean_predicted"] == pytest.approx(0.5)
    assert g1["observed_rate"] == pytest.approx(0.75)
    assert g1["calibration_in_the_large"] == pytest.approx(-0.25)
    assert g1["ece"] == pytest.approx((0.7 + 0.3) / 4)
    g0 = out["sites"]["a"]["groups"]["0"]
    # bin [0.3, 0.4): Σp = 0.7, Σy = 1; bin [0.6, 0.7): Σp = 1.3, Σy = 0
    assert g0["calibration_in_the_large"] == pytest.approx(0.25)
    assert g0["ece"] == pytest.approx((0.3 + 1.3) / 4)
    gaps = out["sites"]["a"]["gaps"]
    assert gaps["calibration"] == pytest.approx(0.5) and gaps["ece"] == pytest.approx(0.15)
    pooled = out["overall"]["groups"]["1"]  # site b adds p = 0.95, y = 1 in bin [0.9, 1]
    assert pooled["mean_predicted"] == pytest.approx(2.95 / 5)
    assert pooled["observed_rate"] == pytest.approx(0.8)
    assert pooled["ece"] == pytest.approx((0.7 + 0.3 + 0.05) / 5)


def test_kept_labels_are_used_instead_of_features() -> None:
    a = _site([[9.0, 1.0], [9.0, -1.0], [9.0, 1.0]], [1, 1, 0])
    kept = {"a": {"sex": {"train": np.array([]), "test": np.array(["f", "m", "m"])}}}
    data = SimpleNamespace(feature_names=("x", "score"), num_classes=2, clients={"a": a},
                           groups=kept)
    out = group_metrics(_Fixed(), data, ["sex"])["sex"]["overall"]["groups"]
    assert out["f"]["n"] == 1 and out["f"]["tpr"] == 1.0
    assert out["m"]["n"] == 2 and out["m"]["tpr"] == 0.0 and out["m"]["fpr"] == 1.0


def test_an_unknown_group_column_names_the_features() -> None:
    data = SimpleNamespace(feature_names=("age", "chol"), num_classes=2,
                           clients={"a": _site([[1.0, 2.0]], [1])})
    with pytest.raises(ConfigError, match="'sex'.*features: age, chol"):
        group_metrics(_Fixed(), data, ["sex"])


def test_heart_disease_by_sex_in_summary() -> None:
    cfg = ExperimentConfig.from_dict({"rounds": 2, "evaluation": {"groups": ["sex", "cp"]}})
    result = simulate(cfg)
    groups = result.summary["groups"]
    ds = result.summary["clients"]
    assert ds == 4
    sex = groups["sex"]["overall"]["groups"]
    assert set(sex) == {"0", "1"}
    n_test = sum(m["n"] for m in sex.values())
    assert n_test == 231  # the four hospitals' test splits
    assert {"equalized_odds", "demographic_parity", "accuracy"} <= set(groups["sex"]["overall"]["gaps"])
    assert set(groups["cp"]["overall"]["groups"]) == {"1", "2", "3", "4"}
    # the overall accuracy of the groups matches the final accuracy over all test examples
    acc = sum(m["accuracy"] * m["n"] for m in sex.values()) / n_test
    assert acc == pytest.approx(np.average(
        [result.per_client[c]["accuracy"] for c in result.per_client],
        weights=[sum(g["n"] for g in groups["sex"]["sites"][c]["groups"].values()) for c in result.per_client],
    ), abs=1e-9)
