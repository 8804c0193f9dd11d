"""ECE and reliability bins on a hand-made case, per site and pooled."""

from __future__ import annotations

import math

import pytest
import torch

from consortium.interpret import calibration_summary, site_calibration_counts


def _prob_model() -> torch.nn.Module:
    """p(class 1) = sigmoid(x): the input column is the log-odds."""
    m = torch.nn.Linear(1, 2, bias=False).double()
    with torch.no_grad():
        m.weight.copy_(torch.tensor([[0.0], [1.0]]))
    return m


def _logit(p: list[float]) -> torch.Tensor:
    return torch.tensor([[math.log(q / (1 - q))] for q in p], dtype=torch.float64)


def test_ece_by_hand_per_site_and_pooled() -> None:
    model = _prob_model()
    # site a: p = .05 (y 0), .15 (y 0)            bins 0, 1: |0-.05| + |0-.15| = .2  → .2/2
    # site b: p = .15 (1), .85 (1), .95 (1), .95 (0): |1-.15| + |1-.85| + |1-1.9| = 1.9 → 1.9/4
    # pooled: |0-.05| + |1-.30| + |1-.85| + |1-1.9| = 1.8 → 1.8/6 = .3 (not (.2+1.9)/6 = .35)
    a = site_calibration_counts(model, _logit([0.05, 0.15]), torch.tensor([0, 0]), num_classes=2)
    b = site_calibration_counts(model, _logit([0.15, 0.85, 0.95, 0.95]),
                                torch.tensor([1, 1, 1, 0]), num_classes=2)
    out = calibration_summary({"a": a, "b": b}, num_classes=2)
    assert out["sites"]["a"]["ece"] == pytest.approx(0.1)
    assert out["sites"]["b"]["ece"] == pytest.approx(0.475)
    assert out["overall"]["ece"] == pytest.approx(0.3)
    assert out["overall"]["n"] == 6
    bins = out["overall"]["bins"]
    assert [x["n"] for x in bins] == [1, 2, 0, 0, 0, 0, 0, 0, 1, 2]
    assert bins[1]["mean_predicted"] == pytest.approx(0.15)
    assert bins[1]["observed"] == pytest.approx(0.5)
    assert bins[9]["observed"] == pytest.approx(0.5) and bins[2]["observed"] is None
    assert out["overall"]["mean_predicted"] == pytest.approx(3.1 / 6)
    assert out["overall"]["observed_rate"] == pytest.approx(0.5)


def test_a_perfectly_calibrated_site_has_zero_ece() -> None:
    # four rows at p = .25, one of them positive; four at p = .75, three positive
    x = _logit([0.25] * 4 + [0.75] * 4)
    y = torch.tensor([1, 0, 0, 0, 1, 1, 1, 0])
    out = calibration_summary(
        {"s": site_calibration_counts(_prob_model(), x, y, num_classes=2)}, num_classes=2)
    assert out["overall"]["ece"] == pytest.approx(0.0, abs=1e-12)


def test_multiclass_uses_top_label_confidence() -> None:
    model = torch.nn.Identity()  # the rows are the logits
    x = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.6, 0.3, 0.1]],
                               dtype=torch.float64))
    y = torch.tensor([0, 0, 0])  # right, wrong, right
    out = calibration_summary({"s": site_calibration_counts(model, x, y, num_classes=3)},
                              num_classes=3)
    # bins 7 (.7, correct), 8 (.8, wrong), 6 (.6, correct): (.3 + .8 + .4) / 3
    assert out["overall"]["ece"] == pytest.approx(1.5 / 3)
    assert out["predicted"] == "top-label confidence"
