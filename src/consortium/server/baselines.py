"""Baselines that answer "is federating worth it?": local-only and pooled training."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from consortium.client.evaluation import evaluate_model, summarise_clients
from consortium.client.training import LocalTraining, planned_steps, train_locally
from consortium.data.base import FederatedDataset
from consortium.seeds import derive_seed
from consortium.types import Parameters

__all__ = ["local_baseline", "pooled_baseline"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _budget(num_examples: int, settings: LocalTraining, rounds: int, per_round_clients: int) -> int:
    """Steps a baseline trains for: the same number of passes over its data as the federation
    makes in ``rounds`` rounds (or, in fixed-steps mode, the federation's total steps)."""
    if settings.steps > 0:
        return rounds * settings.steps * per_round_clients
    return rounds * planned_steps(num_examples, settings)


def _evaluate_everywhere(
    module: torch.nn.Module, dataset: FederatedDataset, loss_fn: LossFn
) -> tuple[dict[str, float | None], dict[str, dict[str, float]]]:
    per_client = {
        cid: evaluate_model(module, c.test, loss_fn=loss_fn, num_classes=dataset.num_classes)
        for cid, c in dataset.clients.items()
        if len(c.test) > 0
    }
    sizes = {cid: len(dataset.clients[cid].test) for cid in per_client}
    metrics = summarise_clients(per_client, sizes)
    if dataset.server_test is not None and len(dataset.server_test) > 0:
        central = evaluate_model(
            module, dataset.server_test, loss_fn=loss_fn, num_classes=dataset.num_classes
        )
        metrics.update({f"central_{k}": v for k, v in central.items()})
    return metrics, per_client


def local_baseline(
    dataset: FederatedDataset,
    *,
    model_factory: Callable[[], torch.nn.Module],
    init: Parameters,
    settings: LocalTraining,
    loss_fn: LossFn,
    rounds: int,
    seed: int,
) -> tuple[dict[str, float | None], dict[str, dict[str, float]]]:
    """Each site trains alone from the same initial model and is evaluated on its own test split."""
    per_client: dict[str, dict[str, float]] = {}
    for cid, data in dataset.clients.items():
        module = model_factory()
        init.load_into(module)
        # Fixed-steps mode: a site alone does as many steps as it would in the federation.
        steps = _budget(len(data.train), settings, rounds, 1)
        train_locally(
            module, data.train, settings, loss_fn=loss_fn, seed=derive_seed(seed, "local", cid),
            steps=steps,
        )
        if len(data.test) > 0:
            per_client[cid] = evaluate_model(
                module, data.test, loss_fn=loss_fn, num_classes=dataset.num_classes
            )
    sizes = {cid: len(dataset.clients[cid].test) for cid in per_client}
    return summarise_clients(per_client, sizes), per_client


def pooled_baseline(
    dataset: FederatedDataset,
    *,
    model_factory: Callable[[], torch.nn.Module],
    init: Parameters,
    settings: LocalTraining,
    loss_fn: LossFn,
    rounds: int,
    seed: int,
    per_round_clients: int,
) -> tuple[dict[str, float | None], dict[str, dict[str, float]]]:
    """One model on the union of all training data (the upper reference, not a private option),
    evaluated on every site's test split like the federated model."""
    pooled = dataset.pooled_train()
    module = model_factory()
    init.load_into(module)
    steps = _budget(len(pooled), settings, rounds, per_round_clients)
    train_locally(
        module, pooled, replace(settings), loss_fn=loss_fn, seed=derive_seed(seed, "pooled"),
        steps=steps,
    )
    return _evaluate_everywhere(module, dataset, loss_fn)
