"""Group fairness of the final model: per-group accuracy, TPR, FPR, positive rate and
calibration, and the equalised-odds, demographic-parity and calibration gaps, per site and
overall (``evaluation.groups``).

A row's group comes from the labels each site keeps beside its data
(:attr:`FederatedDataset.groups`, filled by :func:`consortium.data.groups.keep_groups_aside`,
so the model need not see the column); a data set without them (one given to ``simulate``)
is read from its encoded features, a 0/1 feature of that name or its one-hot block.
Definitions (binary tasks, class 1 positive): TPR = TP / (TP + FN), FPR = FP / (FP + TN),
positive rate = predicted positives / n; the equalised-odds gap is the larger of the largest
TPR difference and the largest FPR difference between groups (Hardt, Price, Srebro,
"Equality of Opportunity in Supervised Learning", NeurIPS 2016), the demographic-parity gap
the largest difference in positive rate. Calibration, with p the model's predicted
probability of class 1 (softmax of its output): calibration-in-the-large is the mean p minus
the observed positive rate; the expected calibration error (ECE) is ``Σ_b (n_b / n) ·
|ȳ_b − p̄_b|`` over 10 equal-width bins of p (``[0, 0.1) … [0.9, 1]``), the binary
reliability-diagram form of Naeini, Cooper, Hauskrecht, "Obtaining Well Calibrated
Probabilities Using Bayesian Binning", AAAI 2015, and Guo, Pleiss, Sun, Weinberger, "On
Calibration of Modern Neural Networks", ICML 2017. The calibration gap is the largest
difference in calibration-in-the-large between groups, the ECE gap the largest difference in
ECE. Counts and bin sums are kept per site and added for the overall figures, so overall
rates are pooled over the sites' test examples. The group ``missing`` is reported but left
out of the gaps.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from consortium.client.training import module_device
from consortium.data.groups import feature_group_labels
from consortium.errors import DataError

__all__ = ["group_metrics", "predict", "row_labels", "summarize"]


BINS = 10


def _counts(y: np.ndarray, pred: np.ndarray, prob: np.ndarray | None) -> dict[str, Any]:
    """The additive statistics of one group at one site."""
    c: dict[str, Any] = {
        "n": len(y), "correct": int((y == pred).sum()),
        "tp": int(((y == 1) & (pred == 1)).sum()), "fn": int(((y == 1) & (pred != 1)).sum()),
        "fp": int(((y != 1) & (pred == 1)).sum()), "tn": int(((y != 1) & (pred != 1)).sum()),
    }
    if prob is not None:
        b = np.minimum((prob * BINS).astype(np.int64), BINS - 1)
        c["bin_n"] = np.bincount(b, minlength=BINS)
        c["bin_p"] = np.bincount(b, weights=prob, minlength=BINS)
        c["bin_y"] = np.bincount(b, weights=(y == 1).astype(np.float64), minlength=BINS)
    return c


def _rates(c: dict[str, Any], binary: bool) -> dict[str, Any]:
    n = c["n"]
    out: dict[str, Any] = {"n": n, "accuracy": c["correct"] / n if n else None}
    if binary:
        pos, neg = c["tp"] + c["fn"], c["fp"] + c["tn"]
        out["tpr"] = c["tp"] / pos if pos else None
        out["fpr"] = c["fp"] / neg if neg else None
        out["positive_rate"] = (c["tp"] + c["fp"]) / n if n else None
    if "bin_n" in c and n:
        mean_p, observed = float(c["bin_p"].sum()) / n, float(c["bin_y"].sum()) / n
        out["mean_predicted"] = mean_p
        out["observed_rate"] = observed
        out["calibration_in_the_large"] = mean_p - observed
        out["ece"] = float(np.abs(c["bin_y"] - c["bin_p"]).sum()) / n
    return out


def _gaps(by_group: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    def spread(key: str) -> float | None:
        values = [g[key] for label, g in by_group.items()
                  if label != "missing" and g.get(key) is not None]
        return max(values) - min(values) if len(values) >= 2 else None

    tpr, fpr = spread("tpr"), spread("fpr")
    odds = None if tpr is None and fpr is None else max(v for v in (tpr, fpr) if v is not None)
    out = {"accuracy": spread("accuracy"), "equalized_odds": odds,
           "demographic_parity": spread("positive_rate")}
    if any("ece" in g for g in by_group.values()):
        out["calibration"] = spread("calibration_in_the_large")
        out["ece"] = spread("ece")
    return out


def _add(total: dict[str, Any], c: dict[str, Any]) -> None:
    for k, v in c.items():
        total[k] = total[k] + v if k in total else (v.copy() if isinstance(v, np.ndarray) else v)


def predict(module: torch.nn.Module, x: torch.Tensor, *, binary: bool) -> tuple[
        np.ndarray, np.ndarray | None]:
    """``module``'s predicted class for each row of ``x`` (the argmax of its output) and, for
    a binary task, its probability of class 1 (softmax, in float64); ``None`` otherwise."""
    device = module_device(module)  # executor.device: the rows go to the model, logits back
    with torch.no_grad():
        logits = module(x) if device.type == "cpu" else module(x.to(device)).cpu()
    prob = torch.softmax(logits.double(), dim=1)[:, 1].numpy() if binary else None
    return logits.argmax(dim=1).numpy(), prob


def row_labels(
    dataset: Any, cid: str, column: str, part: str, x: np.ndarray, n: int
) -> np.ndarray:
    """The group labels of site ``cid``'s ``part`` rows (``n`` of them, features ``x``): the
    labels the site kept aside, else read from the encoded features.

    Raises:
        ConfigError: no kept labels and ``column`` is not a group feature.
        DataError: kept labels whose count differs from the rows.
    """
    kept: Mapping[str, Any] = getattr(dataset, "groups", None) or {}
    if column in kept.get(cid, {}) and part in kept[cid][column]:
        label = np.asarray(kept[cid][column][part]).astype(str)
        if len(label) != n:
            raise DataError(
                f"client {cid!r} keeps {len(label)} {column!r} labels for {n} {part} rows; "
                "rebuild the data set's groups after changing its splits"
            )
        return label
    return feature_group_labels(x, list(dataset.feature_names or ()), column)


Predictions = Mapping[str, tuple[np.ndarray, np.ndarray, "np.ndarray | None"]]


def summarize(
    predictions: Predictions, labels: Mapping[str, np.ndarray], *, binary: bool
) -> dict[str, Any]:
    """Per-group rates and gaps, per site and pooled over the sites (``overall``), from each
    site's ``(y, predicted class, probability of class 1 or None)`` and group labels."""
    total: dict[str, dict[str, Any]] = {}
    sites: dict[str, dict[str, Any]] = {}
    for cid, (y, pred, prob) in predictions.items():
        label = labels[cid]
        mine: dict[str, dict[str, Any]] = {}
        for g in np.unique(label):
            m = label == g
            mine[str(g)] = c = _counts(y[m], pred[m], prob[m] if prob is not None else None)
            _add(total.setdefault(str(g), {}), c)
        rates = {g: _rates(c, binary) for g, c in sorted(mine.items())}
        sites[cid] = {"groups": rates, "gaps": _gaps(rates)}
    overall = {g: _rates(c, binary) for g, c in sorted(total.items())}
    return {"overall": {"groups": overall, "gaps": _gaps(overall)}, "sites": sites}


def group_metrics(
    module: torch.nn.Module, dataset: Any, groups: Sequence[str]
) -> dict[str, Any]:
    """``summary.json``'s ``groups``: per group column, per-group rates (and, for binary
    tasks, calibration) and the gaps, overall and per site, for ``module`` (the final global
    model) on every site's test split.

    Raises:
        ConfigError: a group column with neither kept labels nor a feature of that name.
        DataError: kept labels whose count differs from the site's test rows.
    """
    binary = int(dataset.num_classes) == 2
    module.eval()
    preds: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]] = {}
    features: dict[str, np.ndarray] = {}
    for cid, client in dataset.clients.items():
        if len(client.test) == 0:
            continue
        x = client.test.x
        pred, prob = predict(module, x, binary=binary)
        preds[cid] = (client.test.y.numpy(), pred, prob)
        features[cid] = x.numpy().reshape(len(x), -1)
    return {
        column: summarize(preds, {cid: row_labels(dataset, cid, column, "test", features[cid],
                                                  len(preds[cid][0])) for cid in preds},
                          binary=binary)
        for column in groups
    }
