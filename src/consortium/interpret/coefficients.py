"""The named coefficients of a linear model (``logistic``): what the weights say per feature."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = ["linear_coefficients"]


def _single_linear(module: torch.nn.Module) -> torch.nn.Linear | None:
    """The model's one ``Linear`` layer when every other layer is parameter-free (Flatten)."""
    linear = [m for m in module.modules() if isinstance(m, torch.nn.Linear)]
    if len(linear) != 1:
        return None
    own = {id(p) for p in linear[0].parameters()}
    if any(id(p) not in own for p in module.parameters()):
        return None
    return linear[0]


def linear_coefficients(
    module: torch.nn.Module, names: Sequence[str] | None, groups: Mapping[str, Sequence[int]]
) -> dict[str, Any] | None:
    """For a model that is one linear layer on the (encoded, standardised) features, each
    feature column's coefficient, or ``None`` for any other model.

    A binary model with two outputs (softmax) has log-odds ``(w₁ − w₀)·x + (b₁ − b₀)``: the
    coefficient of column ``j`` is ``w₁ⱼ − w₀ⱼ``, the change in log-odds of class 1 per unit
    of the column (per standard deviation for a standardised continuous column). With more
    classes each class's row is given. ``by_feature`` is, per original feature (a one-hot
    block, its missing indicator), the largest absolute coefficient among its columns, and
    ``ranking`` orders the features by it.
    """
    linear = _single_linear(module)
    if linear is None:
        return None
    w = linear.weight.detach().double().cpu()
    b = linear.bias.detach().double().cpu() if linear.bias is not None else torch.zeros(len(w))
    d = w.shape[1]
    columns = list(names) if names is not None and len(names) == d else [f"x{j}" for j in range(d)]
    out: dict[str, Any] = {}
    if w.shape[0] == 2:
        coef = (w[1] - w[0]).tolist()
        out["kind"] = "log-odds of class 1"
        out["intercept"] = float(b[1] - b[0])
        out["columns"] = dict(zip(columns, coef))
        strength = [abs(c) for c in coef]
    else:
        out["kind"] = "logit of each class"
        out["intercept"] = b.tolist()
        out["columns"] = {c: w[:, j].tolist() for j, c in enumerate(columns)}
        strength = w.abs().max(dim=0).values.tolist()
    out["by_feature"] = {f: max(strength[j] for j in cols) for f, cols in groups.items() if cols}
    out["ranking"] = sorted(out["by_feature"], key=lambda f: -out["by_feature"][f])
    return out
