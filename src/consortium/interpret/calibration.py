"""Calibration of the final model per site and overall: ECE and the reliability diagram's bins.

The bins and the expected calibration error are those of ``evaluation.groups``
(:mod:`consortium.server.groups`, reused here): 10 equal-width bins of the predicted
probability, ``ECE = Σ_b (n_b / n) · |ȳ_b − p̄_b|`` (Naeini, Cooper, Hauskrecht, AAAI 2015;
Guo, Pleiss, Sun, Weinberger, "On Calibration of Modern Neural Networks", ICML 2017). For a
binary task p is the probability of class 1 and ȳ the share of class 1; for more classes it is
Guo et al.'s top-label form: p the confidence (largest softmax probability) and ȳ the share
of rows predicted correctly. A site returns only its per-bin counts and sums; the overall
figures add them (pooled over the sites' test rows).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from consortium.client.training import module_device
from consortium.server.groups import BINS, _add, _counts, _rates

__all__ = ["BINS", "calibration_summary", "site_calibration_counts"]


def site_calibration_counts(
    module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, num_classes: int
) -> dict[str, Any]:
    """One site's additive calibration statistics (``n``, per-bin ``bin_n``, ``bin_p``,
    ``bin_y``) for ``module`` on its rows."""
    device = module_device(module)
    module.eval()
    with torch.no_grad():
        logits = module(x.to(device)).cpu().double()
    prob = torch.softmax(logits, dim=1)
    labels = y.numpy().astype(np.int64)
    pred = prob.argmax(dim=1).numpy()
    if num_classes == 2:
        return _counts(labels, pred, prob[:, 1].numpy())
    correct = (pred == labels).astype(np.int64)  # top-label: "positive" = predicted correctly
    return _counts(correct, np.ones_like(correct), prob.max(dim=1).values.numpy())


def _describe(c: Mapping[str, Any]) -> dict[str, Any]:
    rates = _rates(dict(c), False)
    n_b = np.asarray(c["bin_n"])
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.where(n_b > 0, np.asarray(c["bin_p"]) / np.maximum(n_b, 1), np.nan)
        observed = np.where(n_b > 0, np.asarray(c["bin_y"]) / np.maximum(n_b, 1), np.nan)
    return {
        "n": int(c["n"]),
        "ece": rates.get("ece"),
        "mean_predicted": rates.get("mean_predicted"),
        "observed_rate": rates.get("observed_rate"),
        "bins": [
            {"lower": b / BINS, "upper": (b + 1) / BINS, "n": int(n_b[b]),
             "mean_predicted": None if n_b[b] == 0 else float(mean_p[b]),
             "observed": None if n_b[b] == 0 else float(observed[b])}
            for b in range(BINS)
        ],
    }


def calibration_summary(sites: Mapping[str, Mapping[str, Any]], *, num_classes: int) -> dict[str, Any]:
    """``summary.json``'s ``interpret.calibration``: ECE, mean predicted and observed rate and
    the reliability bins, ``overall`` (the sites' counts added) and per site."""
    total: dict[str, Any] = {}
    for c in sites.values():
        _add(total, dict(c))
    kind = "class 1 probability" if num_classes == 2 else "top-label confidence"
    return {
        "bins": BINS,
        "predicted": kind,
        "overall": _describe(total) if total.get("n") else None,
        "sites": {cid: _describe(c) for cid, c in sites.items() if c.get("n")},
    }
