"""Mean |SHAP| per feature, computed at each site on a sample it keeps, added at the server.

SHAP values (Lundberg & Lee, "A Unified Approach to Interpreting Model Predictions", NeurIPS
2017) through the ``shap`` library's model-agnostic ``KernelExplainer`` (Kernel SHAP), which
works for any of our torch models. Each site explains up to ``sample`` rows of its own test
split against a background of up to ``background`` rows of its own training split; both stay
at the site. It returns per feature only ``Σ |φ|`` and ``Σ φ`` over its rows and their count
(:class:`SiteShap`); the server's mean |SHAP| is the sum over sites divided by the rows
(each site weighted by its sample).

Players are the original features of :func:`~consortium.interpret.importance.feature_groups`
(a one-hot block and its missing indicator are one player), so the values are the Shapley
values of the features a clinician knows (``cp``, not ``cp=4``). The explained output is the
probability of class 1 for a binary task, and for more classes each class's probability with
|φ| averaged over the classes. ``shap`` is the optional extra ``consortium[interpret]``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from consortium.client.training import module_device
from consortium.errors import MissingExtraError

__all__ = ["SiteShap", "aggregate_shap", "site_shap"]


def _shap() -> Any:
    try:
        import shap
    except ImportError as error:
        raise MissingExtraError("interpret.shap", "interpret", "shap") from error
    return shap


@dataclass(frozen=True)
class SiteShap:
    """What a site returns: per feature ``Σ |φ|`` (``abs_sum``) and ``Σ φ`` (``sum``) over its
    ``n`` explained rows."""

    n: int
    abs_sum: dict[str, float] = field(default_factory=dict)
    sum: dict[str, float] = field(default_factory=dict)

    def mean_abs(self) -> dict[str, float]:
        return {f: v / self.n for f, v in self.abs_sum.items()} if self.n else {}


def site_shap(
    module: torch.nn.Module,
    rows: torch.Tensor,
    background: torch.Tensor,
    groups: Mapping[str, Sequence[int]],
    *,
    num_classes: int,
    seed: int,
) -> SiteShap:
    """Kernel SHAP of ``module`` on one site's ``rows`` against its ``background`` rows, one
    player per feature of ``groups``.

    Kernel SHAP samples coalitions from numpy's global generator; it is seeded with ``seed``
    for the call and restored afterwards.

    Raises:
        MissingExtraError: ``shap`` is not installed.
    """
    names = list(groups)
    if len(rows) == 0 or len(background) == 0 or not names:
        return SiteShap(0, dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0))
    shap = _shap()
    shape = tuple(rows.shape[1:])
    table = torch.cat([rows.reshape(len(rows), -1), background.reshape(len(background), -1)])
    table = table.to(torch.float32)
    device = module_device(module)
    module.eval()
    cols = [torch.as_tensor(list(groups[f]), dtype=torch.long) for f in names]

    def predict(z: np.ndarray) -> np.ndarray:
        # A player's value is the index of the table row that supplies its columns: the
        # explained row itself, or a background row when the coalition leaves it out.
        index = torch.from_numpy(np.rint(np.asarray(z)).astype(np.int64))
        x = table[index[:, 0]].clone()
        for g, c in enumerate(cols):
            x[:, c] = table[index[:, g]][:, c]
        with torch.no_grad():
            prob = torch.softmax(module(x.reshape(len(x), *shape).to(device)).cpu().double(), 1)
        return (prob[:, 1] if num_classes == 2 else prob).numpy()

    n = len(rows)
    explained = np.repeat(np.arange(n, dtype=np.float64)[:, None], len(names), axis=1)
    reference = np.repeat(np.arange(n, len(table), dtype=np.float64)[:, None], len(names), axis=1)
    state = np.random.get_state()
    try:
        np.random.seed(seed % 2**32)
        explainer = shap.KernelExplainer(predict, reference)
        values = np.asarray(explainer.shap_values(explained, silent=True))
    finally:
        np.random.set_state(state)
    if values.ndim == 3:  # several outputs: (rows, players, classes) in shap ≥ 0.45
        if values.shape[0] != n:
            values = np.moveaxis(values, 0, -1)
        magnitude, signed = np.abs(values).mean(axis=2), values.mean(axis=2)
    else:
        magnitude, signed = np.abs(values), values
    return SiteShap(
        n,
        {f: float(magnitude[:, g].sum()) for g, f in enumerate(names)},
        {f: float(signed[:, g].sum()) for g, f in enumerate(names)},
    )


def aggregate_shap(sites: Mapping[str, SiteShap]) -> dict[str, Any]:
    """The server's side: ``{"mean_abs": {feature: Σ_sites Σ|φ| / Σ_sites n}, "mean":
    {feature: mean φ}, "ranking": [...], "sites": {site: its mean |SHAP|}, "n": rows}``."""
    n = sum(s.n for s in sites.values())
    names = list(dict.fromkeys(f for s in sites.values() for f in s.abs_sum))
    mean_abs = {f: sum(s.abs_sum.get(f, 0.0) for s in sites.values()) / n for f in names} if n else {}
    mean = {f: sum(s.sum.get(f, 0.0) for s in sites.values()) / n for f in names} if n else {}
    return {
        "mean_abs": mean_abs,
        "mean": mean,
        "ranking": sorted(mean_abs, key=lambda f: -mean_abs[f]),
        "sites": {cid: s.mean_abs() for cid, s in sites.items() if s.n},
        "n": n,
    }
