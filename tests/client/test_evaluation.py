"""Metrics: AUC against scikit-learn, balanced accuracy by hand, the across-client summary."""

from __future__ import annotations

import math

import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from consortium.client.evaluation import auc_binary, evaluate_model, summarise_clients
from consortium.data.base import Split


def test_auc_hand_computed_with_ties() -> None:
    # positives 0.8, 0.4; negatives 0.4, 0.1 → pairs: (0.8>0.4)=1, (0.8>0.1)=1, (0.4=0.4)=.5, (0.4>0.1)=1
    scores = torch.tensor([0.8, 0.4, 0.4, 0.1])
    labels = torch.tensor([1, 1, 0, 0])
    assert auc_binary(scores, labels) == pytest.approx(3.5 / 4)


def test_auc_matches_sklearn_on_random_data() -> None:
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 20, (300,), generator=g).float()  # many ties
    labels = torch.randint(0, 2, (300,), generator=g)
    assert auc_binary(scores, labels) == pytest.approx(roc_auc_score(labels.numpy(), scores.numpy()))


def test_auc_undefined_for_one_class() -> None:
    assert math.isnan(auc_binary(torch.tensor([0.1, 0.2]), torch.tensor([1, 1])))


def test_evaluate_model_metrics() -> None:
    model = torch.nn.Linear(1, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[-1.0], [1.0]]))  # predicts class 1 iff x > 0
    x = torch.tensor([[1.0], [2.0], [-1.0], [-2.0], [3.0]])
    y = torch.tensor([1, 0, 0, 0, 1])
    m = evaluate_model(model, Split(x, y), loss_fn=torch.nn.functional.cross_entropy, num_classes=2)
    pred = [1, 1, 0, 0, 1]
    assert m["accuracy"] == pytest.approx(4 / 5)
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y.numpy(), pred))
    assert m["auc"] == pytest.approx(roc_auc_score(y.numpy(), x[:, 0].numpy()))
    with torch.no_grad():
        expected = float(torch.nn.functional.cross_entropy(model(x), y))
    assert m["loss"] == pytest.approx(expected)


def test_summary_weights_by_test_size_and_reports_distribution() -> None:
    per_client = {"a": {"accuracy": 1.0, "auc": math.nan}, "b": {"accuracy": 0.5, "auc": 0.7}}
    out = summarise_clients(per_client, {"a": 30, "b": 10})
    assert out["accuracy"] == pytest.approx((30 * 1.0 + 10 * 0.5) / 40)
    assert out["accuracy_min"] == 0.5 and out["accuracy_median"] == pytest.approx(0.75)
    assert out["accuracy_p10"] == pytest.approx(0.55)
    assert out["auc"] == pytest.approx(0.7)  # NaN at a is left out, not counted as 0
