"""Named coefficients of a linear model."""

from __future__ import annotations

import pytest
import torch

from consortium.interpret import feature_groups, linear_coefficients


def test_binary_log_odds_coefficients_with_names() -> None:
    names = ["age", "cp=1", "cp=2"]
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[0.5, 1.0, 0.0], [1.0, -1.0, 2.5]]))
        model[1].bias.copy_(torch.tensor([0.25, 1.0]))
    out = linear_coefficients(model, names, feature_groups(names, 3))
    assert out is not None
    assert out["columns"] == pytest.approx({"age": 0.5, "cp=1": -2.0, "cp=2": 2.5})
    assert out["intercept"] == pytest.approx(0.75)
    assert out["by_feature"] == pytest.approx({"age": 0.5, "cp": 2.5})
    assert out["ranking"] == ["cp", "age"]


def test_a_model_with_hidden_layers_has_no_coefficients() -> None:
    mlp = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    assert linear_coefficients(mlp, None, feature_groups(None, 3)) is None
