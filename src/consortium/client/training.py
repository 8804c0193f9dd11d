"""Local training: any torch module, any loss, epochs or steps, SGD (momentum) or Adam."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from consortium.data.base import Split
from consortium.errors import ClientError

__all__ = ["LocalTraining", "TrainHooks", "TrainStats", "planned_steps", "train_locally"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class LocalTraining:
    """How a client trains: ``steps > 0`` overrides ``epochs``."""

    epochs: int = 1
    steps: int = 0
    batch_size: int = 32
    lr: float = 0.05
    optimizer: str = "sgd"
    momentum: float = 0.0
    weight_decay: float = 0.0


@dataclass(frozen=True)
class TrainHooks:
    """What an algorithm changes in the local loop, as pure functions of the parameters.

    Attributes:
        penalty: added to the batch loss, given the module's parameter list (FedProx).
        correct_grad: rewrites the gradients in place after backward (SCAFFOLD).
    """

    penalty: Callable[[Sequence[torch.Tensor]], torch.Tensor] | None = None
    correct_grad: Callable[[Sequence[torch.Tensor | None]], None] | None = None


@dataclass(frozen=True)
class TrainStats:
    steps: int
    mean_loss: float
    examples: int


def planned_steps(num_examples: int, settings: LocalTraining) -> int:
    """Local steps a client with ``num_examples`` plans for (before any straggler cut)."""
    if settings.steps > 0:
        return settings.steps
    return settings.epochs * math.ceil(num_examples / settings.batch_size)


def steps_for_work(planned: int, work: float) -> int:
    """Steps a client does when asked for a fraction ``work`` of its planned steps (≥ 1)."""
    # Rounding first keeps float noise (0.07 · 100 = 7.000000000000001) from adding a step.
    return max(1, min(planned, math.ceil(round(work * planned, 9))))


def make_optimizer(params: list[torch.nn.Parameter], settings: LocalTraining) -> torch.optim.Optimizer:
    if settings.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay
        )
    if settings.optimizer == "adam":
        return torch.optim.Adam(params, lr=settings.lr, weight_decay=settings.weight_decay)
    raise ClientError(f"unknown local optimizer {settings.optimizer!r}; expected 'sgd' or 'adam'")


def batch_indices(n: int, steps: int, batch_size: int, *, seed: int) -> list[torch.Tensor]:
    """``steps`` mini-batches of indices, a fresh seeded permutation per pass over the data."""
    if n <= 0:
        raise ClientError("cannot train on 0 examples: this client has no training data")
    gen = torch.Generator().manual_seed(seed)
    out: list[torch.Tensor] = []
    while len(out) < steps:
        perm = torch.randperm(n, generator=gen)
        for start in range(0, n, batch_size):
            out.append(perm[start : start + batch_size])
            if len(out) == steps:
                break
    return out


def train_locally(
    module: torch.nn.Module,
    data: Split,
    settings: LocalTraining,
    *,
    loss_fn: LossFn,
    seed: int,
    steps: int,
    hooks: TrainHooks | None = None,
) -> TrainStats:
    """Train ``module`` in place for ``steps`` mini-batch steps on ``data``.

    Raises:
        ClientError: the loss became NaN or infinite (lower the learning rate).
    """
    hooks = hooks or TrainHooks()
    params = [p for p in module.parameters() if p.requires_grad]
    opt = make_optimizer(params, settings)
    module.train()
    total = 0.0
    for step, idx in enumerate(batch_indices(len(data), steps, settings.batch_size, seed=seed)):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(module(data.x[idx]), data.y[idx])
        if hooks.penalty is not None:
            loss = loss + hooks.penalty(params)
        if not torch.isfinite(loss):
            raise ClientError(
                f"the local loss became {loss.item()} after {step} steps; lower "
                "algorithm.lr or check the data for extreme values"
            )
        loss.backward()
        if hooks.correct_grad is not None:
            hooks.correct_grad([p.grad for p in params])  # type: ignore[misc]
        opt.step()
        total += float(loss.detach())
    return TrainStats(steps=steps, mean_loss=total / max(steps, 1), examples=len(data))
