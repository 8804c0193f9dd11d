"""Group fairness of the final model: per-group accuracy, TPR, FPR and positive rate, and the
equalised-odds and demographic-parity gaps, per site and overall (``evaluation.groups``).

A group column is found among the data set's encoded features: a 0/1 feature of that name
(heart disease's ``sex``) or its one-hot block ``<name>=<value>`` (a row with none set is
``missing``). Definitions (binary tasks, class 1 positive): TPR = TP / (TP + FN), FPR = FP /
(FP + TN), positive rate = predicted positives / n; the equalised-odds gap is the larger of
the largest TPR difference and the largest FPR difference between groups (Hardt, Price,
Srebro, "Equality of Opportunity in Supervised Learning", NeurIPS 2016), the
demographic-parity gap the largest difference in positive rate. Counts are kept per site and
added for the overall figures, so the overall rates are pooled over the sites' test examples.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from consortium.errors import ConfigError

__all__ = ["group_metrics"]


def _group_of(x: np.ndarray, names: list[str], column: str) -> np.ndarray:
    """Each row's group label for ``column`` (text), from the encoded features."""
    if column in names:
        v = x[:, names.index(column)]
        return np.where(np.isclose(v, 1.0), "1", np.where(np.isclose(v, 0.0), "0", "missing"))
    block = [i for i, n in enumerate(names) if n.startswith(f"{column}=")]
    if not block:
        raise ConfigError(
            f"evaluation.groups names {column!r}, which is not a feature of this data set; "
            f"use a 0/1 feature or a categorical column (features: {', '.join(names[:20])}"
            f"{' …' if len(names) > 20 else ''})"
        )
    labels = np.array([names[i].split("=", 1)[1] for i in block] + ["missing"], dtype=object)
    onehot = x[:, block]
    which = np.where(onehot.max(axis=1) > 0.5, onehot.argmax(axis=1), len(block))
    return labels[which].astype(str)


def _rates(c: dict[str, int], binary: bool) -> dict[str, Any]:
    n = c["n"]
    out: dict[str, Any] = {"n": n, "accuracy": c["correct"] / n if n else None}
    if binary:
        pos, neg = c["tp"] + c["fn"], c["fp"] + c["tn"]
        out["tpr"] = c["tp"] / pos if pos else None
        out["fpr"] = c["fp"] / neg if neg else None
        out["positive_rate"] = (c["tp"] + c["fp"]) / n if n else None
    return out


def _gaps(by_group: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    def spread(key: str) -> float | None:
        values = [g[key] for label, g in by_group.items()
                  if label != "missing" and g.get(key) is not None]
        return max(values) - min(values) if len(values) >= 2 else None

    tpr, fpr = spread("tpr"), spread("fpr")
    odds = None if tpr is None and fpr is None else max(v for v in (tpr, fpr) if v is not None)
    return {"accuracy": spread("accuracy"), "equalized_odds": odds,
            "demographic_parity": spread("positive_rate")}


def group_metrics(
    module: torch.nn.Module, dataset: Any, groups: Sequence[str]
) -> dict[str, Any]:
    """``summary.json``'s ``groups``: per group column, per-group rates and the gaps, overall
    and per site, for ``module`` (the final global model) on every site's test split."""
    names = list(dataset.feature_names or ())
    binary = int(dataset.num_classes) == 2
    out: dict[str, Any] = {}
    module.eval()
    preds: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    with torch.no_grad():
        for cid, client in dataset.clients.items():
            if len(client.test) == 0:
                continue
            x = client.test.x
            pred = module(x).argmax(dim=1).numpy()
            preds[cid] = (x.numpy().reshape(len(x), -1), client.test.y.numpy(), pred)
    for column in groups:
        total: dict[str, dict[str, int]] = {}
        sites: dict[str, dict[str, Any]] = {}
        for cid, (x, y, pred) in preds.items():
            label = _group_of(x, names, column)
            mine: dict[str, dict[str, int]] = {}
            for g in np.unique(label):
                m = label == g
                yy, pp = y[m], pred[m]
                c = {"n": int(m.sum()), "correct": int((yy == pp).sum()),
                     "tp": int(((yy == 1) & (pp == 1)).sum()), "fn": int(((yy == 1) & (pp != 1)).sum()),
                     "fp": int(((yy != 1) & (pp == 1)).sum()), "tn": int(((yy != 1) & (pp != 1)).sum())}
                mine[str(g)] = c
                acc = total.setdefault(str(g), dict.fromkeys(c, 0))
                for k, v in c.items():
                    acc[k] += v
            rates = {g: _rates(c, binary) for g, c in sorted(mine.items())}
            sites[cid] = {"groups": rates, "gaps": _gaps(rates)}
        overall = {g: _rates(c, binary) for g, c in sorted(total.items())}
        out[column] = {"overall": {"groups": overall, "gaps": _gaps(overall)}, "sites": sites}
    return out
