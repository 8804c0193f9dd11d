"""Federated permutation importance: each site permutes its own test rows, the server adds sums.

Permutation importance (Breiman, "Random Forests", Machine Learning 45, 2001; the
model-agnostic form of Fisher, Rudin, Dominici, "All Models are Wrong, but Many are Useful",
JMLR 20, 2019) of a feature is how much the model's loss rises (and its accuracy falls) when
that feature's column is shuffled across the evaluation rows, breaking its link to the label.

Federated form. A site shuffles each feature of *its own* test split (``repeats`` times, with
its own random generator: in simulation seeded from (run seed, ``"interpret"``, site), at a
deployed site its own OS randomness) and returns only sums: the base loss and correct count,
and per feature the loss and correct count summed over its rows and repeats
(:class:`SiteImportance`), never a row. The server adds the sums
(:func:`aggregate_importance`), which weights each site by its test size; with the same
permutations this *equals* the pooled computation in which every site's rows are shuffled
among themselves (``tests/interpret/test_importance.py``).

A categorical column one-hot encoded as ``<name>=<value>`` columns is one feature: its block is
shuffled together (a row keeps a valid one-hot code), and so is a column's ``<name>_missing``
indicator (:func:`feature_groups`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from consortium.client.training import module_device
from consortium.errors import DataError

__all__ = [
    "SiteImportance",
    "aggregate_importance",
    "feature_groups",
    "site_differences",
    "site_permutation_importance",
]


def feature_groups(names: Sequence[str] | None, width: int) -> dict[str, list[int]]:
    """The original features of an encoded table and their columns, in first-seen order:
    ``cp=1 … cp=4`` → ``cp``; ``chol_missing`` goes with ``chol`` (when ``chol`` or a ``chol=``
    block exists); any other column is its own feature. Without names (``None``) column ``j``
    is feature ``x<j>``.

    Raises:
        DataError: ``names`` does not have ``width`` entries.
    """
    if names is None:
        return {f"x{j}": [j] for j in range(width)}
    names = list(names)
    if len(names) != width:
        raise DataError(
            f"the data set names {len(names)} features but its rows have {width} columns; "
            "fix the data set's feature_names"
        )
    bases = {n.split("=", 1)[0] if "=" in n else n for n in names}
    out: dict[str, list[int]] = {}
    for j, n in enumerate(names):
        if "=" in n:
            base = n.split("=", 1)[0]
        elif n.endswith("_missing") and n[: -len("_missing")] in bases:
            base = n[: -len("_missing")]
        else:
            base = n
        out.setdefault(base, []).append(j)
    return out


@dataclass(frozen=True)
class SiteImportance:
    """What a site returns: sums over its test rows, never a row.

    ``n`` rows, ``repeats`` shuffles per feature; ``base_loss`` and ``base_correct`` are the
    unshuffled model's summed cross-entropy and correct count; ``loss[f]`` and ``correct[f]``
    the same summed over the rows and the repeats with feature ``f`` shuffled.
    """

    n: int
    repeats: int
    base_loss: float
    base_correct: int
    loss: dict[str, float] = field(default_factory=dict)
    correct: dict[str, int] = field(default_factory=dict)

    def importance(self) -> dict[str, dict[str, float]]:
        """This site's own importances: ``{"loss": {f: mean loss rise}, "accuracy": {f: mean
        accuracy fall}}``."""
        return _importance([self])


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(len(x), -1)


def site_permutation_importance(
    module: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    groups: Mapping[str, Sequence[int]],
    *,
    repeats: int,
    rng: np.random.Generator,
) -> SiteImportance:
    """One site's permutation sums for ``module`` on its rows ``x`` (``[n, d]``), labels ``y``.

    For each repeat, then each feature in ``groups`` order, one permutation of the ``n`` rows
    is drawn from ``rng`` (``rng.permutation(n)``) and applied to that feature's columns
    together; one forward pass per repeat covers every feature.

    Raises:
        DataError: ``x`` and ``y`` differ in length, or a group names a column outside ``x``.
    """
    n = len(x)
    if len(y) != n:
        raise DataError(f"{n} feature rows but {len(y)} labels; the split is inconsistent")
    flat = _flat(x)
    d = flat.shape[1]
    names = list(groups)
    for name in names:
        if any(not 0 <= j < d for j in groups[name]):
            raise DataError(f"feature {name!r} names columns outside the {d} of the data")
    module.eval()
    device = module_device(module)
    shape = tuple(x.shape[1:])

    def per_row(rows: torch.Tensor, labels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            logits = module(rows.reshape(len(rows), *shape).to(device)).cpu().double()
        loss = F.cross_entropy(logits, labels, reduction="none").numpy()
        return loss, (logits.argmax(dim=1) == labels).numpy()

    yl = y.long()
    base_loss, base_ok = per_row(flat, yl)
    loss = dict.fromkeys(names, 0.0)
    correct = dict.fromkeys(names, 0)
    if n == 0:
        return SiteImportance(0, repeats, 0.0, 0, loss, correct)
    labels = yl.repeat(len(names))
    for _ in range(repeats):
        stack = flat.repeat(len(names), 1)
        for k, name in enumerate(names):
            cols = list(groups[name])
            perm = torch.from_numpy(rng.permutation(n))
            stack[k * n:(k + 1) * n, cols] = flat[perm][:, cols]
        rows_loss, rows_ok = per_row(stack, labels)
        for k, name in enumerate(names):
            loss[name] += float(rows_loss[k * n:(k + 1) * n].sum())
            correct[name] += int(rows_ok[k * n:(k + 1) * n].sum())
    return SiteImportance(n, repeats, float(base_loss.sum()), int(base_ok.sum()), loss, correct)


def _importance(sites: Iterable[SiteImportance]) -> dict[str, dict[str, float]]:
    sites = list(sites)
    n = sum(s.n for s in sites)
    shuffled = sum(s.n * s.repeats for s in sites)
    if n == 0 or shuffled == 0:
        return {"loss": {}, "accuracy": {}}
    base_loss = sum(s.base_loss for s in sites) / n
    base_acc = sum(s.base_correct for s in sites) / n
    names = list(dict.fromkeys(f for s in sites for f in s.loss))
    return {
        "loss": {f: sum(s.loss.get(f, 0.0) for s in sites) / shuffled - base_loss for f in names},
        "accuracy": {f: base_acc - sum(s.correct.get(f, 0) for s in sites) / shuffled
                     for f in names},
    }


def aggregate_importance(sites: Mapping[str, SiteImportance]) -> dict[str, Any]:
    """The server's side: the sites' sums added (each site weighted by its test rows).

    Returns ``{"loss": {feature: mean loss rise}, "accuracy": {feature: mean accuracy fall},
    "ranking": [features by loss rise, largest first], "sites": {site: its own loss
    rises}, "n": rows, "repeats": shuffles per feature}``.

    Raises:
        DataError: the sites shuffled a different number of times.
    """
    repeats = {s.repeats for s in sites.values() if s.n}
    if len(repeats) > 1:
        raise DataError(
            f"sites shuffled {sorted(repeats)} times; every site must use the experiment's "
            "interpret.repeats"
        )
    overall = _importance(sites.values())
    return {
        **overall,
        "ranking": sorted(overall["loss"], key=lambda f: -overall["loss"][f]),
        "sites": {cid: s.importance()["loss"] for cid, s in sites.items() if s.n},
        "n": sum(s.n for s in sites.values()),
        "repeats": repeats.pop() if repeats else 0,
    }


def site_differences(
    per_site: Mapping[str, Mapping[str, float]], *, ratio: float = 3.0, floor: float = 0.1
) -> dict[str, Any]:
    """Where the model relies on a feature differently at different sites.

    Each site's importances (negative values counted as 0) are turned into *shares* of that
    site's total, so that a site where every feature matters more (a harder population) does
    not stand out by scale alone. Per feature: each site's share, ``spread`` (largest minus
    smallest share) and ``ratio`` (largest over smallest; ``None`` when the smallest is 0).
    A feature is ``flagged`` when its shares differ by at least ``floor`` (it matters
    somewhere, and by a material amount) and the largest is at least ``ratio`` times the
    smallest (at least two sites). Per-site importances on small test splits are noisy: read
    a flag as a question for the sites (a column missing at some of them, a different
    population), not as a finding.
    """
    shares: dict[str, dict[str, float]] = {}
    for cid, values in per_site.items():
        total = sum(max(v, 0.0) for v in values.values())
        if total > 0:
            shares[cid] = {f: max(v, 0.0) / total for f, v in values.items()}
    features = list(dict.fromkeys(f for s in shares.values() for f in s))
    out: dict[str, Any] = {"features": {}, "flagged": [], "ratio": ratio, "floor": floor}
    for f in features:
        by_site = {cid: s[f] for cid, s in shares.items() if f in s}
        if len(by_site) < 2:
            continue
        hi, lo = max(by_site.values()), min(by_site.values())
        out["features"][f] = {"shares": by_site, "spread": hi - lo,
                              "ratio": hi / lo if lo > 0 else None}
        if hi - lo >= floor and (lo == 0 or hi / lo >= ratio):
            out["flagged"].append({
                "feature": f, "most": max(by_site, key=by_site.__getitem__),
                "least": min(by_site, key=by_site.__getitem__), "spread": hi - lo,
            })
    return out
