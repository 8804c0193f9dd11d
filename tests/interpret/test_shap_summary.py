"""Mean |SHAP| per feature: Kernel SHAP per site against exact Shapley values by hand."""

from __future__ import annotations

import itertools
import math
import sys

import numpy as np
import pytest
import torch

from consortium.errors import MissingExtraError
from consortium.interpret import aggregate_shap, feature_groups, site_shap

pytest.importorskip("shap")

NAMES = ["age", "cp=1", "cp=2", "chol", "chol_missing", "ca"]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(len(NAMES), 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    with torch.no_grad():
        m[0].weight[:, 5] = 0.0  # "ca" is not used
    return m


def _exact(model: torch.nn.Module, x: torch.Tensor, bg: torch.Tensor,
           groups: dict[str, list[int]]) -> np.ndarray:
    """Interventional Shapley values of p(class 1), one player per feature, by enumeration."""
    names = list(groups)
    m = len(names)

    def value(row: torch.Tensor, coalition: tuple[int, ...]) -> float:
        z = bg.clone()
        for g in coalition:
            z[:, groups[names[g]]] = row[groups[names[g]]]
        with torch.no_grad():
            return float(torch.softmax(model(z).double(), 1)[:, 1].mean())

    out = np.zeros((len(x), m))
    for i, row in enumerate(x):
        for g in range(m):
            others = [h for h in range(m) if h != g]
            for size in range(m):
                for s in itertools.combinations(others, size):
                    w = math.factorial(size) * math.factorial(m - size - 1) / math.factorial(m)
                    out[i, g] += w * (value(row, (*s, g)) - value(row, s))
    return out


def test_site_shap_matches_exact_shapley_values_per_feature_group() -> None:
    model = _model()
    g = torch.Generator().manual_seed(1)
    x, bg = torch.randn(6, len(NAMES), generator=g), torch.randn(5, len(NAMES), generator=g)
    groups = feature_groups(NAMES, len(NAMES))  # 4 players: 16 coalitions, enumerated exactly
    s = site_shap(model, x, bg, groups, num_classes=2, seed=3)
    exact = _exact(model, x, bg, groups)
    for k, f in enumerate(groups):
        assert s.abs_sum[f] == pytest.approx(np.abs(exact[:, k]).sum(), abs=1e-6)
        assert s.sum[f] == pytest.approx(exact[:, k].sum(), abs=1e-6)
    assert s.abs_sum["ca"] == pytest.approx(0.0, abs=1e-9)
    assert s.n == 6


def test_aggregate_weights_sites_by_their_rows() -> None:
    model = _model()
    groups = feature_groups(NAMES, len(NAMES))
    g = torch.Generator().manual_seed(2)
    a = site_shap(model, torch.randn(2, 6, generator=g), torch.randn(4, 6, generator=g), groups,
                  num_classes=2, seed=0)
    b = site_shap(model, torch.randn(6, 6, generator=g), torch.randn(4, 6, generator=g), groups,
                  num_classes=2, seed=0)
    out = aggregate_shap({"a": a, "b": b})
    for f in groups:
        assert out["mean_abs"][f] == pytest.approx((a.abs_sum[f] + b.abs_sum[f]) / 8)
    assert out["n"] == 8 and out["ranking"][-1] == "ca"
    assert out["sites"]["a"]["age"] == pytest.approx(a.abs_sum["age"] / 2)


def test_multiclass_averages_over_classes() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 3)
    s = site_shap(model, torch.randn(4, 3), torch.randn(3, 3), feature_groups(None, 3),
                  num_classes=3, seed=0)
    assert s.n == 4 and set(s.abs_sum) == {"x0", "x1", "x2"}
    assert all(v > 0 for v in s.abs_sum.values())


def test_missing_shap_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "shap", None)
    with pytest.raises(MissingExtraError, match=r"consortium\[interpret\]"):
        site_shap(_model(), torch.zeros(2, 6), torch.zeros(2, 6),
                  feature_groups(NAMES, len(NAMES)), num_classes=2, seed=0)
