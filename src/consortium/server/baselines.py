"""Baselines that answer "is federating worth it?": local-only and pooled training."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from consortium.client.evaluation import confusion_matrix, evaluate_model, summarise_clients
from consortium.client.training import LocalTraining, planned_steps, train_locally
from consortium.data.base import FederatedDataset, Split
from consortium.seeds import derive_seed
from consortium.types import Parameters

__all__ = ["BaselineSetup", "local_baseline", "pooled_baseline"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _budget(num_examples: int, settings: LocalTraining, rounds: int, per_round_clients: int) -> int:
    """Steps a baseline trains for: the same number of passes over its data as the federation
    makes in ``rounds`` rounds (or, in fixed-steps mode, the federation's total steps)."""
    if settings.steps > 0:
        return rounds * settings.steps * per_round_clients
    return rounds * planned_steps(num_examples, settings)


def _evaluate_everywhere(
    module: torch.nn.Module, dataset: FederatedDataset, loss_fn: LossFn,
    confusions: dict[str, np.ndarray] | None = None,
) -> tuple[dict[str, float | None], dict[str, dict[str, float]]]:
    per_client = {
        cid: evaluate_model(module, c.test, loss_fn=loss_fn, num_classes=dataset.num_classes)
        for cid, c in dataset.clients.items()
        if len(c.test) > 0
    }
    if confusions is not None:
        confusions.update({
            cid: confusion_matrix(module, dataset.clients[cid].test, num_classes=dataset.num_classes)
            for cid in per_client
        })
    sizes = {cid: len(dataset.clients[cid].test) for cid in per_client}
    metrics = summarise_clients(per_client, sizes)
    if dataset.server_test is not None and len(dataset.server_test) > 0:
        central = evaluate_model(
            module, dataset.server_test, loss_fn=loss_fn, num_classes=dataset.num_classes
        )
        metrics.update({f"central_{k}": v for k, v in central.items()})
    return metrics, per_client


@dataclass(frozen=True)
class BaselineSetup:
    """What both baselines share with the federated run: model, start, optimiser, budget."""

    model_factory: Callable[[], torch.nn.Module]
    init: Parameters
    settings: LocalTraining
    loss_fn: LossFn
    rounds: int
    seed: int
    device: torch.device = torch.device("cpu")
    """Where the baselines train and are evaluated (``executor.device``)."""

    def train(self, data: Split, *, steps: int, seed: int) -> torch.nn.Module:
        module = self.model_factory().to(self.device)
        self.init.load_into(module)
        train_locally(module, data, self.settings, loss_fn=self.loss_fn, seed=seed, steps=steps)
        return module


def local_baseline(
    dataset: FederatedDataset, setup: BaselineSetup, *,
    confusions: dict[str, np.ndarray] | None = None,
) -> tuple[dict[str, float | None], dict[str, dict[str, float]]]:
    """Each site trains alone from the same initial model and is evaluated on its own test split
    (each site's confusion matrix goes into ``confusions`` when given)."""
    per_client: dict[str, dict[str, float]] = {}
    for cid, data in dataset.clients.items():
        # Fixed-steps mode: a site alone does as many steps as it would in the federation.
        steps = _budget(len(data.train), setup.settings, setup.rounds, 1)
        module = setup.train(data.train, steps=steps, seed=derive_seed(setup.seed, "local", cid))
        if len(data.test) > 0:
            per_client[cid] = evaluate_model(
                module, data.test, loss_fn=setup.loss_fn, num_classes=dataset.num_classes
            )
            if confusions is not None:
                confusions[cid] = confusion_matrix(module, data.test, num_classes=dataset.num_classes)
    sizes = {cid: len(dataset.clients[cid].test) for cid in per_client}
    return summarise_clients(per_client, sizes), per_client


def pooled_baseline(
    dataset: FederatedDataset, setup: BaselineSetup, *, per_round_clients: int,
    confusions: dict[str, np.ndarray] | None = None,
) -> tuple[dict[str, float | None], dict[str, dict[str, float]]]:
    """One model on the union of all training data (the upper reference, not a private option),
    evaluated on every site's test split like the federated model (each site's confusion
    matrix goes into ``confusions`` when given)."""
    pooled = dataset.pooled_train()
    steps = _budget(len(pooled), setup.settings, setup.rounds, per_round_clients)
    module = setup.train(pooled, steps=steps, seed=derive_seed(setup.seed, "pooled"))
    return _evaluate_everywhere(module, dataset, setup.loss_fn, confusions)
