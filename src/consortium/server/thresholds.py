"""Equalised-odds post-processing: per-group decision thresholds on the final model's score,
fitted from per-site score histograms (``[fairness] method = "thresholds"``).

Hardt, Price, Srebro, "Equality of Opportunity in Supervised Learning", NeurIPS 2016, derive a
predictor from a score R and the protected group A: one threshold per group, chosen so that
the groups' true- and false-positive rates agree (equalised odds) at the least loss. They
reach exact equality with randomised thresholds (a linear programme); this module keeps the
thresholds **deterministic**: a grid search over every combination of the groups'
thresholds, which minimises the equalised-odds gap (the larger of the largest TPR difference
and the largest FPR difference between groups) and, among the combinations within
``tolerance`` of the smallest gap, keeps the most accurate (then the one nearest the model's
own 0.5, then the first), never wider than the gap of the model's own thresholds there.
Moving every group, the smallest gap is always 0 (every group all positive, or all
negative), so the search is Hardt et al.'s "most accurate subject to equalised odds" with a
slack ``tolerance``; with ``tolerance = 0`` it would predict every row positive (or every
row negative). With
``anchor`` (``fairness.anchor = "largest"``, the default) the largest group keeps the
model's own threshold and only the others move towards its rates: its rates, estimated from
the most rows, are the target, the smaller groups' noisy rates are not matched to each other
at the price of accuracy, and ``tolerance = 0`` (the default) is meaningful. A deterministic
rule treats every patient of a group alike; the price is a gap that is small rather than
zero.

Federated and private by construction: the score is R = P(y = 1 | x) of the final global
model, binned on a fixed grid of 101 points, bin ``⌊100·R⌋`` (0 … 100; R = 1 is bin 100).
Each site counts its own fitting rows (:attr:`FederatedDataset.fitting`, see
:func:`consortium.data.groups.fitting_split`) per group, label and bin
(:func:`score_histograms`) — counts only, no row leaves the site; the server adds the
counts (:func:`add_histograms`) and picks one threshold per group (:func:`choose_thresholds`).
A row of group g is predicted positive when its bin is at least ``k_g`` (threshold
``k_g / 100``; ``k_g = 101`` predicts no positive), so fitting and evaluation decide
identically. Rows of the group ``missing``, and of a group the fitting rows never held, keep
the model's own prediction (argmax). Binary tasks only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from consortium.errors import ConfigError, DataError
from consortium.server.groups import predict, row_labels, summarize

__all__ = [
    "BINS",
    "add_histograms",
    "choose_thresholds",
    "equalized_odds_postprocess",
    "score_bins",
    "score_histograms",
]

BINS = 101
"""Grid points of the score: bin ``⌊100·R⌋`` for R in [0, 1]."""
PLAIN = 50
"""The model's own decision, R ≥ 0.5, as a bin threshold (for tie-breaking)."""
MAX_GROUPS = 3
"""The grid search visits (BINS + 1) ** groups combinations: about a million for three."""


def score_bins(prob: np.ndarray) -> np.ndarray:
    """Each score's bin on the grid: ``⌊100·R⌋``, in 0 … 100."""
    return np.clip(np.floor(np.asarray(prob, dtype=np.float64) * (BINS - 1)), 0,
                   BINS - 1).astype(np.int64)


def score_histograms(
    prob: np.ndarray, y: np.ndarray, groups: np.ndarray
) -> dict[str, np.ndarray]:
    """One site's share: per group (``missing`` left out), a ``[2, BINS]`` table of counts,
    row 0 the label-0 rows and row 1 the label-1 rows, by score bin."""
    b, y, groups = score_bins(prob), np.asarray(y), np.asarray(groups).astype(str)
    out: dict[str, np.ndarray] = {}
    for g in np.unique(groups):
        if g == "missing":
            continue
        m = groups == g
        out[str(g)] = np.stack([np.bincount(b[m & (y != 1)], minlength=BINS),
                                np.bincount(b[m & (y == 1)], minlength=BINS)]).astype(np.int64)
    return out


def add_histograms(shares: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The server's sum of the sites' :func:`score_histograms`, group by group."""
    total: dict[str, np.ndarray] = {}
    for share in shares:
        for g, h in share.items():
            total[g] = total[g] + h if g in total else np.array(h, dtype=np.int64)
    return dict(sorted(total.items()))


def _rates_by_threshold(h: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For thresholds k = 0 … BINS: predicted positives among label 1 (TP) and label 0 (FP),
    and correct predictions (TP + TN)."""
    # positives at threshold k: rows in bins >= k (a reversed cumulative sum, then 0 at k = BINS)
    above = np.concatenate([np.cumsum(h[:, ::-1], axis=1)[:, ::-1],
                            np.zeros((2, 1), np.int64)], axis=1)
    fp, tp = above[0], above[1]
    return tp, fp, tp + (int(h[0].sum()) - fp)


def choose_thresholds(
    histograms: Mapping[str, np.ndarray], *, tolerance: float, anchor: bool = False
) -> dict[str, Any]:
    """One threshold per group from the summed histograms (Hardt, Price, Srebro 2016, with
    deterministic thresholds; see the module docstring).

    Args:
        histograms: group → ``[2, BINS]`` counts (label 0, label 1) over the fitting rows.
        tolerance: how far above the smallest equalised-odds gap a more accurate combination
            may be, in rate units (``fairness.tolerance``); never above the gap of the
            model's own thresholds (k = 50 for every group).
        anchor: keep the largest group (most fitting rows; the first by name on a tie) at
            the model's own threshold (k = 50) and move only the others towards its rates
            (``fairness.anchor = "largest"``).

    Returns:
        ``thresholds`` (group → bin ``k``, a row positive when its bin is >= k), and on the
        fitting rows, for the chosen and for the plain (k = 50) thresholds: per group ``n``,
        ``tpr``, ``fpr``, and ``equalized_odds`` and ``accuracy``.

    Raises:
        DataError: fewer than two groups with fitting rows.
        ConfigError: more than :data:`MAX_GROUPS` groups.
    """
    names = sorted(histograms)
    if len(names) < 2:
        raise DataError(
            f"equalised-odds thresholds need fitting rows of at least two groups; found "
            f"{names} (a group of the fairness column is absent from every site's fitting rows)"
        )
    if len(names) > MAX_GROUPS:
        raise ConfigError(
            f"fairness.method = \"thresholds\" searches every combination of per-group "
            f"thresholds, (BINS + 1) ** groups; fairness.column has {len(names)} groups "
            f"({', '.join(names)}), at most {MAX_GROUPS} are supported: choose a column with "
            "fewer groups (or fewer bands)"
        )
    k = BINS + 1
    tprs, fprs, correct = [], [], np.zeros((k,) * len(names))
    for i, g in enumerate(names):
        h = np.asarray(histograms[g], dtype=np.int64)
        tp, fp, right = _rates_by_threshold(h)
        shape = [1] * len(names)
        shape[i] = k
        pos, neg = int(h[1].sum()), int(h[0].sum())
        if pos:
            tprs.append((tp / pos).reshape(shape))
        if neg:
            fprs.append((fp / neg).reshape(shape))
        correct = correct + right.reshape(shape)

    def spread(rates: list[np.ndarray]) -> np.ndarray:
        if len(rates) < 2:
            return np.zeros((k,) * len(names))
        return np.maximum.reduce(np.broadcast_arrays(*rates)) - np.minimum.reduce(
            np.broadcast_arrays(*rates))

    gap = np.maximum(spread(tprs), spread(fprs))
    if anchor:  # only combinations that keep the largest group at k = 50
        largest = max(range(len(names)), key=lambda i: (int(
            np.asarray(histograms[names[i]]).sum()), -i))
        keep = np.zeros(k, dtype=bool)
        keep[PLAIN] = True
        gap = np.where(keep.reshape([k if j == largest else 1 for j in range(len(names))]),
                       gap, np.inf)
    allowed = min(float(gap.min()) + tolerance, float(gap[(PLAIN,) * len(names)]))
    near = gap <= allowed + 1e-12
    best = np.where(near, correct, -1)
    top = best == best.max()
    # among equally accurate combinations: nearest the model's own decision, then the first
    distance = sum(np.abs(np.arange(k) - PLAIN).reshape(
        [k if j == i else 1 for j in range(len(names))]) for i in range(len(names)))
    pick = int(np.argmin(np.where(top, distance, np.iinfo(np.int64).max)))
    chosen = dict(zip(names, (int(v) for v in np.unravel_index(pick, gap.shape))))
    return {"thresholds": chosen,
            "fit": _fit_report(histograms, chosen),
            "fit_plain": _fit_report(histograms, dict.fromkeys(names, PLAIN))}


def _fit_report(histograms: Mapping[str, np.ndarray], thresholds: Mapping[str, int]) -> dict[
        str, Any]:
    groups: dict[str, Any] = {}
    right = n = 0
    for g, kg in thresholds.items():
        h = np.asarray(histograms[g], dtype=np.int64)
        tp, fp, correct = _rates_by_threshold(h)
        pos, neg = int(h[1].sum()), int(h[0].sum())
        groups[g] = {"n": pos + neg, "tpr": tp[kg] / pos if pos else None,
                     "fpr": fp[kg] / neg if neg else None}
        right, n = right + int(correct[kg]), n + pos + neg

    def spread(key: str) -> float | None:
        values = [v[key] for v in groups.values() if v[key] is not None]
        return max(values) - min(values) if len(values) >= 2 else None

    odds = [v for v in (spread("tpr"), spread("fpr")) if v is not None]
    return {"groups": groups, "equalized_odds": max(odds) if odds else None,
            "accuracy": right / n if n else None}


def _pooled(predictions: Mapping[str, tuple[np.ndarray, np.ndarray, Any]]) -> dict[str, float]:
    """Accuracy and balanced accuracy over every test row (every group, ``missing`` too),
    combined as the run's ``final`` metrics are (:func:`~consortium.intervals.confusion_metrics`:
    each site's value weighted by its test rows)."""
    from consortium.intervals import confusion_metrics

    return confusion_metrics({
        cid: np.bincount(2 * y.astype(np.int64) + pred.astype(np.int64), minlength=4).reshape(2, 2)
        for cid, (y, pred, _) in predictions.items()})


def equalized_odds_postprocess(
    module: torch.nn.Module, dataset: Any, column: str, *, tolerance: float,
    anchor: bool = False,
) -> dict[str, Any]:
    """``summary.json``'s ``groups.<column>.postprocessed``: fit per-group thresholds on the
    sites' fitting rows (each site's :func:`score_histograms`, added on the server) and
    report, on every site's test split, the same per-group rates and gaps as
    :func:`~consortium.server.groups.group_metrics`, with the pooled accuracy and balanced
    accuracy beside the plain model's (``plain``) and the cost, plain minus post-processed
    (``accuracy_cost``, ``balanced_accuracy_cost``; positive = accuracy lost).

    Raises:
        ConfigError: a task that is not binary, or a column with too many groups.
        DataError: fitting rows missing for a site, of fewer than two groups, or no test rows.
    """
    if int(dataset.num_classes) != 2:
        raise ConfigError(
            f"fairness.method = \"thresholds\" thresholds the probability of class 1, so it "
            f"needs a binary task; this data set has {dataset.num_classes} classes"
        )
    fitting: Mapping[str, Any] = getattr(dataset, "fitting", None) or {}
    module.eval()
    shares, preds, labels = [], {}, {}
    for cid, client in dataset.clients.items():
        if cid not in fitting:
            raise DataError(
                f"client {cid!r} has no fitting rows for the equalised-odds thresholds; load "
                "the data with [fairness] method = \"thresholds\" (consortium.data.load_dataset "
                "sets them aside), or build them with consortium.data.groups.fitting_split"
            )
        fit = fitting[cid]
        if len(fit):  # the site's share: counts only
            _, prob = predict(module, fit.x, binary=True)
            assert prob is not None
            fx = fit.x.numpy().reshape(len(fit), -1)
            shares.append(score_histograms(
                prob, fit.y.numpy(), row_labels(dataset, cid, column, "fit", fx, len(fit))))
        if len(client.test):
            pred, prob = predict(module, client.test.x, binary=True)
            assert prob is not None
            tx = client.test.x.numpy().reshape(len(client.test), -1)
            preds[cid] = (client.test.y.numpy(), pred, prob)
            labels[cid] = row_labels(dataset, cid, column, "test", tx, len(client.test))
    if not preds:
        raise DataError("no site has test rows to evaluate the equalised-odds thresholds on")
    choice = choose_thresholds(add_histograms(shares), tolerance=tolerance, anchor=anchor)
    ks: dict[str, int] = choice["thresholds"]
    post = {}
    for cid, (y, pred, prob) in preds.items():
        k = np.array([ks.get(g, -1) for g in labels[cid].tolist()], dtype=np.int64)
        post[cid] = (y, np.where(k >= 0, (score_bins(prob) >= k).astype(pred.dtype), pred), prob)
    after = summarize(post, labels, binary=True)
    mine, theirs = _pooled(post), _pooled(preds)
    return {
        "method": "equalised-odds thresholds (Hardt, Price, Srebro 2016), deterministic, "
                  f"grid of {BINS} points",
        "tolerance": tolerance,
        "anchor": "largest" if anchor else "none",
        "thresholds": {g: k / (BINS - 1) for g, k in ks.items()},
        "fit": {"n": sum(v["n"] for v in choice["fit"]["groups"].values()),
                "chosen": choice["fit"], "plain": choice["fit_plain"]},
        **after,
        **mine,
        "plain": theirs,
        "accuracy_cost": theirs["accuracy"] - mine["accuracy"],
        "balanced_accuracy_cost": theirs["balanced_accuracy"] - mine["balanced_accuracy"],
    }
