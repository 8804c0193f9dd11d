"""Confidence intervals for comparing methods: Student t over seeds, bootstrap over test examples."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from consortium.errors import ConfigError

__all__ = ["BOOTSTRAP_METHOD", "T_METHOD", "bootstrap_ci", "confusion_metrics", "t_interval"]

T_METHOD = "Student t over seeds: mean ± t(0.975, n−1) · s / √n"
BOOTSTRAP_METHOD = "percentile bootstrap over test examples, stratified by site, B=1000"


def t_interval(
    values: Sequence[float], *, confidence: float = 0.95
) -> tuple[float, float | None, float | None]:
    """The mean of ``values`` and its Student t confidence interval.

    ``mean ± t_{(1+confidence)/2, n−1} · s / √n`` with ``s`` the sample standard deviation
    (``n − 1`` in the denominator): the interval for the mean of a normal population with
    unknown variance (Student 1908). Here the values are one metric of the same experiment
    run with ``n`` seeds. Fewer than two values have no spread to estimate from: the bounds
    are then ``None``.

    Raises:
        ConfigError: ``confidence`` is not in (0, 1), or a value is not finite.
    """
    if not 0.0 < confidence < 1.0:
        raise ConfigError(f"confidence must be in (0, 1), got {confidence!r}")
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ConfigError("t_interval needs at least one value")
    if not np.isfinite(x).all():
        raise ConfigError(f"t_interval needs finite values, got {list(values)!r}")
    mean = float(x.mean())
    if x.size < 2:
        return mean, None, None
    from scipy.stats import t

    half = float(t.ppf((1.0 + confidence) / 2.0, x.size - 1)) * float(x.std(ddof=1)) / math.sqrt(x.size)
    return mean, mean - half, mean + half


def confusion_metrics(confusions: Mapping[str, np.ndarray]) -> dict[str, float]:
    """``accuracy`` and ``balanced_accuracy`` of per-site confusion matrices (rows: true
    label, columns: predicted), combined as the federated evaluation combines them: each
    site's value weighted by its test examples. A site's balanced accuracy is its mean recall
    over the classes present in its test split. Sites without examples are left out; no
    examples at all give ``{}``."""
    stacked = [np.asarray(c, dtype=np.int64)[None] for c in confusions.values() if np.sum(c) > 0]
    if not stacked:
        return {}
    acc, bal, n = _site_statistics(stacked)
    weights = n / n.sum()
    return {"accuracy": float(acc[0] @ weights), "balanced_accuracy": float(bal[0] @ weights)}


def bootstrap_ci(
    confusions: Mapping[str, np.ndarray],
    *,
    seed: int,
    resamples: int = 1000,
    confidence: float = 0.95,
) -> dict[str, list[float]]:
    """Percentile bootstrap intervals of ``accuracy`` and ``balanced_accuracy`` over the test
    examples, resampled within each site (Efron & Tibshirani 1993, *An Introduction to the
    Bootstrap*, §13.3 percentile intervals; stratified resampling as in §8.3's two-sample case).

    Each replicate draws, at every site, as many test examples as the site has, with
    replacement, and recomputes the statistic of :func:`confusion_metrics` (per-site values
    weighted by the sites' fixed test sizes), so the interval is around exactly the number the
    run reports. Both statistics depend on a site's examples only through its confusion
    matrix, so a site's resample is drawn as its cell counts — multinomial with ``n`` trials
    and the cells' observed frequencies — which has the same distribution as drawing ``n``
    example indices, at a cost independent of the number of examples.

    Args:
        confusions: site → ``[K, K]`` counts (rows: true label, columns: predicted).
        seed: the generator's seed (a run derives it from its own seed).
        resamples: ``B``, the number of bootstrap replicates.
        confidence: the interval's coverage; the bounds are the ``(1 ± confidence) / 2``
            quantiles of the replicates.

    Returns:
        metric → ``[low, high]``; ``{}`` when no site has test examples.

    Raises:
        ConfigError: ``resamples`` < 1 or ``confidence`` not in (0, 1).
    """
    if resamples < 1:
        raise ConfigError(f"bootstrap resamples must be >= 1, got {resamples!r}")
    if not 0.0 < confidence < 1.0:
        raise ConfigError(f"confidence must be in (0, 1), got {confidence!r}")
    rng = np.random.default_rng(seed)
    drawn = []
    for counts in confusions.values():
        cells = np.asarray(counts, dtype=np.int64)
        n = int(cells.sum())
        if n == 0:
            continue
        draws = rng.multinomial(n, cells.ravel() / n, size=resamples)
        drawn.append(draws.reshape(resamples, *cells.shape))
    if not drawn:
        return {}
    acc, bal, n_site = _site_statistics(drawn)
    weights = n_site / n_site.sum()
    tails = [(1.0 - confidence) / 2.0, (1.0 + confidence) / 2.0]
    return {
        name: [float(q) for q in np.quantile(values @ weights, tails)]
        for name, values in (("accuracy", acc), ("balanced_accuracy", bal))
    }


def _site_statistics(
    confusions: Sequence[np.ndarray],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per replicate and site: accuracy ``[B, S]``, balanced accuracy ``[B, S]``, and the
    sites' sizes ``[S]``, from each site's ``[B, K, K]`` counts."""
    acc, bal, sizes = [], [], []
    for counts in confusions:
        n = counts.sum(axis=(1, 2))
        hits = np.diagonal(counts, axis1=1, axis2=2)
        rows = counts.sum(axis=2)
        present = rows > 0
        recall = np.divide(hits, rows, out=np.zeros(hits.shape), where=present)
        acc.append(hits.sum(axis=1) / n)
        bal.append(recall.sum(axis=1) / present.sum(axis=1))
        sizes.append(n[0])
    return np.stack(acc, axis=1), np.stack(bal, axis=1), np.asarray(sizes, dtype=np.float64)
