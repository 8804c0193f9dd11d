"""Evaluation metrics: loss, accuracy, balanced accuracy and AUC (binary tasks)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from consortium.client.training import module_device
from consortium.data.base import Split

__all__ = [
    "auc_binary", "client_spread", "confusion_from_outputs", "confusion_matrix", "evaluate_model", "model_outputs",
    "summarise_clients",
]


def auc_binary(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve by the Mann–Whitney rank statistic (ties get half credit).

    Returns NaN when only one class is present (AUC is undefined there).
    """
    scores = scores.double()
    pos = labels == 1
    n_pos = int(pos.sum())
    n_neg = int(labels.numel() - n_pos)
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = torch.argsort(scores)
    sorted_scores = scores[order]
    ranks = torch.empty_like(scores)
    # average ranks over ties
    i = 0
    n = scores.numel()
    while i < n:
        j = i
        while j + 1 < n and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    rank_sum = float(ranks[pos].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


@torch.no_grad()
def model_outputs(module: torch.nn.Module, x: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    """``module``'s outputs on ``x`` in chunks of ``batch_size``, on the CPU: each chunk goes to
    the model's device (``executor.device``) and its outputs come back."""
    device = module_device(module)
    if device.type == "cpu":
        return torch.cat([module(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
    return torch.cat([
        module(x[i : i + batch_size].to(device)).cpu() for i in range(0, len(x), batch_size)
    ])


@torch.no_grad()
def evaluate_model(
    module: torch.nn.Module,
    data: Split,
    *,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    num_classes: int,
    batch_size: int = 4096,
) -> dict[str, float]:
    """Loss, accuracy, balanced accuracy (mean per-class recall) and, for 2 classes, AUC."""
    module.eval()
    n = len(data)
    if n == 0:
        return {}
    outputs = model_outputs(module, data.x, batch_size)
    y = data.y
    loss = float(loss_fn(outputs, y))
    pred = outputs.argmax(dim=1)
    correct = pred == y
    recalls = [float(correct[y == c].double().mean()) for c in range(num_classes) if (y == c).any()]
    metrics = {
        "loss": loss,
        "accuracy": float(correct.double().mean()),
        "balanced_accuracy": sum(recalls) / len(recalls),
    }
    if num_classes == 2 and outputs.ndim == 2 and outputs.shape[1] == 2:
        score = outputs[:, 1] - outputs[:, 0]  # the log-odds of class 1
        metrics["auc"] = auc_binary(score, y)
    return metrics


@torch.no_grad()
def confusion_matrix(
    module: torch.nn.Module, data: Split, *, num_classes: int, batch_size: int = 4096
) -> np.ndarray:
    """``[num_classes, num_classes]`` counts of the test examples by true label (rows) and
    predicted class (columns), predicted as :func:`evaluate_model` predicts: what a bootstrap
    over test examples of accuracy and balanced accuracy needs
    (:func:`~consortium.intervals.bootstrap_ci`)."""
    module.eval()
    n = len(data)
    if n == 0:
        return np.zeros((num_classes, num_classes), dtype=np.int64)
    return confusion_from_outputs(model_outputs(module, data.x, batch_size), data.y,
                                  num_classes=num_classes)


def confusion_from_outputs(outputs: torch.Tensor, y: torch.Tensor, *, num_classes: int) -> np.ndarray:
    """:func:`confusion_matrix`'s counts from a model's outputs already computed."""
    cells = y.long() * num_classes + outputs.argmax(dim=1)
    counts = torch.bincount(cells, minlength=num_classes * num_classes)
    return counts.numpy().astype(np.int64).reshape(num_classes, num_classes)


def _quantile(values: Sequence[float], q: float) -> float:
    return float(torch.quantile(torch.tensor(values, dtype=torch.float64), q))


def summarise_clients(
    per_client: Mapping[str, Mapping[str, float]], sizes: Mapping[str, int]
) -> dict[str, float | None]:
    """Weighted mean over clients (by test examples) plus min, 10th percentile and median.

    Metrics undefined at a client (NaN AUC on a one-class test split) are left out of that
    metric's mean; a metric undefined everywhere is ``None``.
    """
    names = sorted({k for m in per_client.values() for k in m})
    out: dict[str, float | None] = {}
    for name in names:
        vals = [
            (float(m[name]), sizes[c])
            for c, m in per_client.items()
            if name in m and not math.isnan(m[name])
        ]
        if not vals:
            out[name] = None
            continue
        weight = sum(w for _, w in vals)
        out[name] = sum(v * w for v, w in vals) / weight if weight else None
        if name != "loss":
            xs = [v for v, _ in vals]
            out[f"{name}_min"] = min(xs)
            out[f"{name}_p10"] = _quantile(xs, 0.1)
            out[f"{name}_median"] = _quantile(xs, 0.5)
    return out


def client_spread(values: Sequence[float]) -> dict[str, float]:
    """How a metric is spread across clients, each client counting once: ``mean``, ``worst``
    (the minimum), ``p10`` (10th percentile, linear interpolation), ``std`` (population
    standard deviation), ``jain``, Jain's fairness index ``(Σx)² / (n·Σx²)`` (Jain, Chiu,
    Hawe, "A Quantitative Measure of Fairness and Discrimination for Resource Allocation in
    Shared Computer Systems", DEC-TR-301, 1984): 1 when every client has the same value,
    ``1/n`` when one client has everything; and ``worst10_mean``, the mean of the worst 10 %
    of clients (the lowest ``ceil(n/10)`` values), q-FFL's "worst 10 %" (Li, Sanjabi, Beirami,
    Smith, "Fair Resource Allocation in Federated Learning", ICLR 2020, Table 1) — not the 10th
    percentile. NaN values are left out; no values give ``{}``.
    """
    xs = [float(v) for v in values if not math.isnan(v)]
    if not xs:
        return {}
    t = torch.tensor(xs, dtype=torch.float64)
    squares = float((t * t).sum())
    return {
        "mean": float(t.mean()),
        "worst": float(t.min()),
        "p10": _quantile(xs, 0.1),
        "std": float(t.std(correction=0)),
        "jain": float(t.sum()) ** 2 / (len(xs) * squares) if squares > 0 else 1.0,
        "worst10_mean": float(t.sort().values[: math.ceil(len(xs) / 10)].mean()),
    }
