"""``summary.json``'s ``interpret``: what each site computes at home, and what the server adds."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from consortium.interpret.calibration import calibration_summary, site_calibration_counts
from consortium.interpret.coefficients import linear_coefficients
from consortium.interpret.importance import (
    SiteImportance,
    aggregate_importance,
    feature_groups,
    site_differences,
    site_permutation_importance,
)
from consortium.interpret.shap_summary import SiteShap, aggregate_shap, site_shap
from consortium.seeds import derive_seed

if TYPE_CHECKING:
    from consortium.config import InterpretConfig
    from consortium.data.base import FederatedDataset

__all__ = ["enabled", "interpret_model"]


def enabled(cfg: InterpretConfig) -> bool:
    """Whether any part of ``[interpret]`` is on."""
    return cfg.importance != "none" or cfg.shap or cfg.coefficients or cfg.calibration


def interpret_model(
    cfg: InterpretConfig, module: torch.nn.Module, dataset: FederatedDataset, *, seed: int
) -> dict[str, Any]:
    """The final model's interpretation on every site's test split, as ``summary.json``'s
    ``interpret``: ``features`` (each original feature's encoded columns), and where asked
    ``permutation`` (:func:`~consortium.interpret.importance.aggregate_importance` with
    ``differences``), ``shap`` (:func:`~consortium.interpret.shap_summary.aggregate_shap`
    with ``differences``), ``coefficients`` (linear models) and ``calibration``.

    In simulation each site's randomness is seeded from (``seed``, ``"interpret"``, part,
    site), so a run repeats exactly; every site function sees only that site's rows and
    returns sums (the deployable shape).

    Raises:
        MissingExtraError: ``cfg.shap`` without the ``shap`` package.
        DataError: feature names that do not match the rows.
    """
    sites = {cid: c for cid, c in dataset.clients.items() if len(c.test)}
    if not sites:
        return {}
    width = int(np.prod(next(iter(sites.values())).test.x.shape[1:]))
    names = list(dataset.feature_names) if dataset.feature_names else None
    groups = feature_groups(names, width)
    num_classes = int(dataset.num_classes)
    out: dict[str, Any] = {"features": {f: [names[j] if names else f"x{j}" for j in cols]
                                        for f, cols in groups.items()}}
    module.eval()
    if cfg.importance == "permutation":
        perm: dict[str, SiteImportance] = {
            cid: site_permutation_importance(
                module, c.test.x, c.test.y, groups, repeats=cfg.repeats,
                rng=np.random.default_rng(derive_seed(seed, "interpret", "permutation", cid)))
            for cid, c in sites.items()
        }
        out["permutation"] = aggregate_importance(perm)
        out["permutation"]["differences"] = site_differences(
            out["permutation"]["sites"], ratio=cfg.ratio)
    if cfg.shap:
        shaps: dict[str, SiteShap] = {}
        for cid, c in sites.items():
            rng = np.random.default_rng(derive_seed(seed, "interpret", "shap", cid))
            rows = c.test.x[_choose(rng, len(c.test), cfg.sample)]
            background = c.train.x[_choose(rng, len(c.train), cfg.background)]
            shaps[cid] = site_shap(module, rows, background, groups, num_classes=num_classes,
                                   seed=int(rng.integers(2**32)))
        out["shap"] = aggregate_shap(shaps)
        out["shap"]["differences"] = site_differences(out["shap"]["sites"], ratio=cfg.ratio)
    if cfg.coefficients:
        coefficients = linear_coefficients(module, names, groups)
        if coefficients is not None:
            out["coefficients"] = coefficients
    if cfg.calibration:
        out["calibration"] = calibration_summary(
            {cid: site_calibration_counts(module, c.test.x, c.test.y, num_classes=num_classes)
             for cid, c in sites.items()}, num_classes=num_classes)
    return out


def _choose(rng: np.random.Generator, n: int, k: int) -> torch.Tensor:
    """Up to ``k`` of ``n`` row indices, without replacement, in increasing order."""
    pick = np.sort(rng.choice(n, size=min(k, n), replace=False)) if n else np.zeros(0, np.int64)
    return torch.from_numpy(pick.astype(np.int64))
