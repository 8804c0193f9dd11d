"""The clinical reading of a run: prevalence, the majority-class reference, sensitivity,
specificity, PPV, NPV, confusion matrices and ROC curves, with bootstrap intervals, per site
and overall (``summary.json``'s ``clinical`` block and per-client keys)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from consortium.intervals import BOOTSTRAP_METHOD

__all__ = [
    "POSITIVE", "RATES", "SITE_LIMIT", "add_clinical", "class_names", "clinical_summary",
    "confusion_rates", "roc_curve",
]

POSITIVE = 1
"""The positive class of a binary task (``1``: e.g. "disease" in the heart-disease data)."""

RATES = ("accuracy", "balanced_accuracy", "sensitivity", "specificity", "ppv", "npv")
"""The rates of :func:`confusion_rates`, in the order the report shows them."""

SITE_LIMIT = 100
"""Above this many sites, ``clinical`` keeps the overall blocks only (per-site rates stay in
``per_client``); bootstrap intervals and ROC curves of every site would swell summary.json."""

ROC_POINTS = 200
"""A ROC curve keeps at most this many points (evenly spaced along the curve, ends kept)."""

AUC_BUDGET = 20_000_000
"""The AUC's bootstrap weighs every test case in every replicate: above this many
(cases × resamples: 20,000 test cases at B = 1,000) its interval is left out, as it would
take minutes."""

RESAMPLES = 1000
POISSON_METHOD = ("Poisson bootstrap over test examples (Hanley & MacGibbon 2006), B=1000: "
                  f"more than {SITE_LIMIT} sites")
METHOD = BOOTSTRAP_METHOD

# per_client keys: the model kinds of ``summary["clinical"]`` and their prefixes
_PREFIXES = {"final": ("", "global_"), "personalized": ("personalized_",),
             "baselines/local": ("local_",)}
_SITE_KEYS = ("sensitivity", "specificity", "ppv", "npv")


def confusion_rates(counts: np.ndarray) -> dict[str, np.ndarray]:
    """Rates of confusion matrices ``[..., K, K]`` (rows: true class, columns: predicted).

    ``accuracy`` and ``balanced_accuracy`` (mean recall over the classes present) for any
    ``K``; for ``K = 2`` with class 1 positive, also ``sensitivity = TP / (TP + FN)``,
    ``specificity = TN / (TN + FP)``, ``ppv = TP / (TP + FP)`` (positive predictive value,
    precision) and ``npv = TN / (TN + FN)`` (Altman & Bland 1994, *BMJ* 308:1552 and 309:102).
    A rate whose denominator is 0 (no positive patient; nothing predicted positive) is NaN.
    """
    c = np.asarray(counts, dtype=np.float64)
    k = c.shape[-1]
    n = c.sum(axis=(-2, -1))
    hits = np.diagonal(c, axis1=-2, axis2=-1)
    rows = c.sum(axis=-1)
    present = rows > 0
    recall = _ratio(hits, rows)
    out = {
        "accuracy": _ratio(hits.sum(axis=-1), n),
        "balanced_accuracy": _ratio(np.where(present, recall, 0.0).sum(axis=-1),
                                    present.sum(axis=-1).astype(np.float64)),
    }
    if k == 2:
        tn, fp, fn, tp = c[..., 0, 0], c[..., 0, 1], c[..., 1, 0], c[..., 1, 1]
        out.update({
            "sensitivity": _ratio(tp, tp + fn), "specificity": _ratio(tn, tn + fp),
            "ppv": _ratio(tp, tp + fp), "npv": _ratio(tn, tn + fn),
        })
    return out


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The ROC curve (false-positive rate, true-positive rate) of ``scores`` against 0/1
    ``labels``, one point per distinct score from (0, 0) to (1, 1) (Fawcett 2006, *Pattern
    Recognition Letters* 27:861, algorithm 1); the same points as scikit-learn's
    ``roc_curve(drop_intermediate=False)`` without importing it (a second and more at the end
    of every run). Empty arrays when a class is missing."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels) == POSITIVE
    if y.all() or not y.any():
        return np.zeros(0), np.zeros(0)
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    ends = np.r_[np.flatnonzero(s[1:] != s[:-1]), len(s) - 1]  # last example of each score
    tps = np.cumsum(y)[ends]
    fps = ends + 1 - tps
    return np.r_[0.0, fps / fps[-1]], np.r_[0.0, tps / tps[-1]]


def class_names(notes: Mapping[str, str], num_classes: int) -> list[str] | None:
    """The class names a data set records in ``notes["labels"]`` (``"0=no disease,
    1=disease"``, as :func:`~consortium.data.files.load_csv` writes it), by class index;
    ``None`` when absent or incomplete."""
    text = notes.get("labels", "")
    names: dict[int, str] = {}
    for part in re.split(r",\s*(?=\d+=)", text) if text else []:
        index, _, name = part.partition("=")
        if index.strip().isdigit():
            names[int(index)] = name.strip()
    if sorted(names) != list(range(num_classes)):
        return None
    return [names[i] for i in range(num_classes)]


def clinical_summary(
    confusions: Mapping[str, Mapping[str, np.ndarray]],
    *,
    seed: int,
    scores: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
    classes: list[str] | None = None,
    confidence: float = 0.95,
    resamples: int = RESAMPLES,
) -> dict[str, Any]:
    """``summary.json``'s ``clinical`` block from each model's per-site confusion matrices.

    Args:
        confusions: model kind (``"final"``, ``"personalized"``, ``"baselines/local"``,
            ``"baselines/pooled"``) → site → ``[K, K]`` counts.
        seed: the run's seed (each kind's bootstrap derives its own from it).
        scores: site → ``(scores, labels)`` of the ``final`` model (the log-odds of class 1),
            for ROC curves and AUC; ``None`` or ``{}``: no ROC.
        classes: the class names by index, when the data set records them.

    Returns:
        ``{"positive_class", "classes", "method", "confidence", "site_limit", <kind blocks>}``
        with each kind's block nested as its name (``final``, ``baselines.local`` ...). A
        block is ``{"overall": {...}, "sites": {site: {...}}}`` (``sites`` only up to
        :data:`SITE_LIMIT` sites; ``overall``: all test cases together, i.e. the summed
        confusion matrix, without ``balanced_accuracy``, which ``final`` states as the mean
        of the sites'), each entry holding ``n``, ``prevalence`` (share of class
        1; binary only), ``class_shares``, ``majority_class``, ``majority_label``,
        ``majority_accuracy`` (always predicting the most frequent class there),
        ``vs_majority`` (accuracy minus that), ``confusion``, the :data:`RATES` (``null``
        where undefined), ``auc`` and ``roc`` (``{"fpr", "tpr", "operating_point"}``) where
        scores are given, and ``ci``: rate → ``[low, high]`` (95 % percentile bootstrap over
        the test examples, resampled within each site).
    """
    from consortium.seeds import derive_seed

    first = next((c for per_site in confusions.values() for c in per_site.values()), None)
    k = int(np.asarray(first).shape[-1]) if first is not None else 0
    out: dict[str, Any] = {
        "positive_class": POSITIVE if k == 2 else None,
        "classes": classes,
        "method": METHOD if resamples == RESAMPLES else METHOD.replace("1000", str(resamples)),
        "confidence": confidence,
        "site_limit": SITE_LIMIT,
    }
    for kind, per_site in confusions.items():
        if not any(np.sum(c) > 0 for c in per_site.values()):
            continue
        block = _kind_block(
            per_site, scores=(scores or {}) if kind == "final" else {}, classes=classes,
            # the seed and draws of ``ci`` (bootstrap_ci): the same replicates, the same
            # accuracy interval
            seed=derive_seed(seed, "bootstrap", kind), confidence=confidence, resamples=resamples,
        )
        section, _, name = kind.partition("/")
        if name:
            out.setdefault(section, {})[name] = block
        else:
            out[section] = block
    return out


def add_clinical(
    summary: dict[str, Any],
    confusions: Mapping[str, Mapping[str, np.ndarray]],
    *,
    seed: int,
    scores: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
    classes: list[str] | None = None,
) -> None:
    """Add ``clinical`` (:func:`clinical_summary`) to a run's ``summary`` and each site's
    clinical rates to ``summary["per_client"][site]``: ``prevalence`` and
    ``majority_accuracy`` (of the site's test split), and ``sensitivity``, ``specificity``,
    ``ppv``, ``npv`` of the global model (also as ``global_<rate>``), of each site's own
    model (``personalized_<rate>``) and of the local-only baseline (``local_<rate>``).

    Only the kinds whose confusion matrices reproduce the accuracy the run reports are used
    (as for ``ci``: numbers from other predictions would not be the run's). Nothing is added
    when no kind qualifies (a deployment: the test examples stay at the sites).
    """
    usable = {kind: per_site for kind, per_site in confusions.items()
              if _reproduces(summary, kind, per_site)}
    if not usable:
        return
    final_scores = scores if "final" in usable else None
    block = clinical_summary(usable, seed=seed, scores=final_scores, classes=classes)
    summary["clinical"] = block
    per_client = summary.setdefault("per_client", {})
    for kind, prefixes in _PREFIXES.items():
        per_site = usable.get(kind)
        if not per_site:
            continue
        sites = [site for site, c in per_site.items() if np.sum(c) > 0]
        stacked = np.stack([np.asarray(per_site[site], dtype=np.int64) for site in sites])
        rates = confusion_rates(stacked)
        shares = stacked.sum(axis=2) / stacked.sum(axis=(1, 2))[:, None]
        for i, site in enumerate(sites):
            entry = per_client.setdefault(site, {})
            entry.setdefault("majority_accuracy", float(shares[i].max()))
            if stacked.shape[1] == 2:
                entry.setdefault("prevalence", float(shares[i][POSITIVE]))
            for prefix in prefixes:
                entry.update({f"{prefix}{key}": _finite(rates[key][i])
                              for key in _SITE_KEYS if key in rates})


def _reproduces(summary: Mapping[str, Any], kind: str, per_site: Mapping[str, np.ndarray]) -> bool:
    """Whether ``per_site``'s weighted accuracy is the accuracy ``summary`` reports for ``kind``."""
    from consortium.intervals import confusion_metrics

    section, _, name = kind.partition("/")
    reported = summary.get(section) or {}
    reported = (reported.get(name) or {}) if name else reported
    point = confusion_metrics(per_site)
    return bool(point) and all(
        isinstance(reported.get(m), float) and abs(reported[m] - v) <= 1e-9 for m, v in point.items()
    )


def _kind_block(
    per_site: Mapping[str, np.ndarray],
    *,
    scores: Mapping[str, tuple[np.ndarray, np.ndarray]],
    classes: list[str] | None,
    seed: int,
    confidence: float,
    resamples: int,
) -> dict[str, Any]:
    from consortium.intervals import (
        bootstrap_auc_ci,
        resample_confusions,
        resample_pooled_confusion,
    )

    detailed = len(per_site) <= SITE_LIMIT
    total: np.ndarray | None = None
    sites: dict[str, dict[str, Any]] = {}
    if detailed:  # a site at a time, as ``ci`` draws: the same replicates
        for i, (site, replicates) in enumerate(
                resample_confusions(per_site, seed=seed, resamples=resamples)):
            total = replicates if total is None else total + replicates
            sites[site] = _entry(per_site[site], replicates, scores.get(site), classes=classes,
                                 confidence=confidence,
                                 balanced_rng=np.random.default_rng((seed, 2, i)))
    else:  # hundreds of sites and more: the pooled matrix drawn at once, overall only
        total = resample_pooled_confusion(per_site, seed=seed, resamples=resamples)
    counts = sum(np.asarray(c, dtype=np.int64) for c in per_site.values())
    pooled = _pool([scores[s] for s in per_site if s in scores])
    overall = _entry(np.asarray(counts), total, pooled, classes=classes, confidence=confidence)
    # the rates of all test cases together; the federation's balanced accuracy is a mean of
    # the sites' (``final``, ``ci``), which this one would contradict
    overall.pop("balanced_accuracy", None)
    overall["ci"].pop("balanced_accuracy", None)
    kept = {site: scores[site] for site in per_site if site in scores}
    cases = sum(len(s) for s, _ in kept.values())
    if kept and cases * resamples <= AUC_BUDGET:
        auc_all, auc_sites = bootstrap_auc_ci(kept, seed=seed + 1, resamples=resamples,
                                              confidence=confidence, per_site=detailed)
        overall["ci"]["auc"] = auc_all
        for site, interval in auc_sites.items():
            if site in sites:
                sites[site]["ci"]["auc"] = interval
    if not detailed:
        overall["ci_method"] = POISSON_METHOD
    block: dict[str, Any] = {"overall": overall}
    if detailed:
        block["sites"] = sites
    return block


def _entry(
    counts: np.ndarray,
    replicates: np.ndarray | None,
    scores: tuple[np.ndarray, np.ndarray] | None,
    *,
    classes: list[str] | None,
    confidence: float,
    balanced_rng: np.random.Generator | None = None,
) -> dict[str, Any]:
    """One site's (or all sites') numbers, with intervals from ``replicates`` ``[B, K, K]``;
    balanced accuracy's from ``balanced_rng``'s draws within each class
    (:func:`~consortium.intervals.balanced_replicates`: a rare class missing from a resample
    would otherwise lift the replicates above the reported value)."""
    from consortium.intervals import balanced_replicates, percentile_interval, weighted_auc

    c = np.asarray(counts, dtype=np.int64)
    n = int(c.sum())
    shares = c.sum(axis=1) / n
    majority = int(np.argmax(shares))
    rates = confusion_rates(c)
    entry: dict[str, Any] = {
        "n": n,
        "class_shares": [float(v) for v in shares],
        "majority_class": majority,
        "majority_label": classes[majority] if classes else f"class {majority}",
        "majority_accuracy": float(shares[majority]),
        "confusion": c.tolist(),
        **{name: _finite(value) for name, value in rates.items()},
    }
    if c.shape[0] == 2:
        entry["prevalence"] = float(shares[POSITIVE])
    accuracy = entry["accuracy"]
    entry["vs_majority"] = None if accuracy is None else accuracy - entry["majority_accuracy"]
    ci: dict[str, list[float] | None] = {}
    if replicates is not None:
        reps = confusion_rates(replicates)
        if balanced_rng is not None:
            reps["balanced_accuracy"] = balanced_replicates(c[None], balanced_rng, len(replicates))
        ci = {name: percentile_interval(values, confidence=confidence) for name, values in reps.items()}
        b_n = replicates.sum(axis=(1, 2))
        share = replicates[:, majority, :].sum(axis=1) / b_n
        ci["vs_majority"] = percentile_interval(reps["accuracy"] - share, confidence=confidence)
    entry["ci"] = ci
    if scores is not None and c.shape[0] == 2:
        s, y = scores
        auc = weighted_auc(s, y, np.ones((1, len(s))))[0]
        entry["auc"] = _finite(auc)
        fpr, tpr = roc_curve(s, y)
        if fpr.size:
            keep = np.unique(np.linspace(0, fpr.size - 1, min(fpr.size, ROC_POINTS)).round().astype(int))
            specificity, sensitivity = entry["specificity"], entry["sensitivity"]
            entry["roc"] = {
                "fpr": [round(float(v), 5) for v in fpr[keep]],
                "tpr": [round(float(v), 5) for v in tpr[keep]],
                # the model's own decision (class 1 when its log-odds > 0) on the curve
                "operating_point": None if specificity is None or sensitivity is None
                else [1.0 - specificity, sensitivity],
            }
    return entry


def _pool(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray] | None:
    if not parts:
        return None
    return np.concatenate([s for s, _ in parts]), np.concatenate([y for _, y in parts])


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    num = np.asarray(numerator, dtype=np.float64)
    den = np.asarray(denominator, dtype=np.float64)
    return np.divide(num, den, out=np.full(np.broadcast(num, den).shape, np.nan), where=den > 0)


def _finite(value: Any) -> float | None:
    number = float(value)
    return number if math.isfinite(number) else None
