"""Local training: any torch module, any loss, epochs or steps, SGD (momentum) or Adam."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from consortium.data.base import Split
from consortium.errors import ClientError

__all__ = [
    "LocalTerms",
    "LocalTraining",
    "TrainStats",
    "batch_matrix",
    "planned_steps",
    "train_locally",
]

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
    dp_clip: float = 0.0
    """Local DP-SGD: per-example clip norm (0 = off)."""
    dp_noise: float = 0.0
    """Local DP-SGD: noise multiplier on the clipped per-example gradient sum."""

    @property
    def local_dp(self) -> bool:
        return self.dp_clip > 0


@dataclass(frozen=True)
class LocalTerms:
    """What an algorithm adds to each local gradient, as flat vectors over the model's layout:
    ``g ← g + prox_mu·(w − anchor) + offset``.

    FedProx's proximal term is ``prox_mu`` with the global model as ``anchor``; SCAFFOLD's
    drift correction is ``offset = c − c_i``. Being plain tensors (not closures), the same
    terms drive the sequential loop and the vectorised executor.
    """

    prox_mu: float = 0.0
    anchor: torch.Tensor | None = None
    offset: torch.Tensor | None = None

    @property
    def active(self) -> bool:
        return self.prox_mu != 0.0 or self.offset is not None


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


def batch_matrix(n: int, steps: int, batch_size: int, *, seed: int) -> torch.Tensor:
    """Row ``s`` holds the example indices of step ``s`` (``-1`` pads a short last batch).

    A fresh seeded permutation per pass over the data. Every executor draws batches from this
    one function, which is what makes them train identically.
    """
    if n <= 0:
        raise ClientError("cannot train on 0 examples: this client has no training data")
    gen = torch.Generator().manual_seed(seed)
    per_epoch = math.ceil(n / batch_size)
    epochs = math.ceil(steps / per_epoch)
    padded = per_epoch * batch_size
    out = torch.full((epochs, padded), -1, dtype=torch.int64)
    for e in range(epochs):
        out[e, :n] = torch.randperm(n, generator=gen)
    return out.view(epochs * per_epoch, batch_size)[:steps]


def batch_indices(n: int, steps: int, batch_size: int, *, seed: int) -> list[torch.Tensor]:
    """The batches of :func:`batch_matrix` as a list of index tensors (no padding)."""
    return [row[row >= 0] for row in batch_matrix(n, steps, batch_size, seed=seed)]


def apply_terms(params: list[torch.nn.Parameter], terms: LocalTerms) -> None:
    """Add ``terms`` to the gradients of ``params`` (all of the module's parameters, in order)."""
    offset = 0
    for p in params:
        n = p.numel()
        if p.grad is not None:
            if terms.prox_mu and terms.anchor is not None:
                anchor = terms.anchor[offset : offset + n].view_as(p)
                p.grad.add_(p.detach() - anchor, alpha=terms.prox_mu)
            if terms.offset is not None:
                p.grad.add_(terms.offset[offset : offset + n].view_as(p))
        offset += n


def train_locally(
    module: torch.nn.Module,
    data: Split,
    settings: LocalTraining,
    *,
    loss_fn: LossFn,
    seed: int,
    steps: int,
    terms: LocalTerms | None = None,
    randomness: Any = None,
) -> TrainStats:
    """Train ``module`` in place for ``steps`` mini-batch steps on ``data``.

    ``randomness``: the site's own CSPRNG (:mod:`consortium.privacy.randomness`); under local
    DP it draws the Poisson batches and the noise, which is then snapped to a grid (no
    floating-point noise leaves the site). ``None`` draws both from ``seed`` (simulation).

    Raises:
        ClientError: the loss became NaN or infinite (lower the learning rate).
    """
    all_params = list(module.parameters())  # the order of Parameters' flat layout
    params = [p for p in all_params if p.requires_grad]
    opt = make_optimizer(params, settings)
    module.train()
    if settings.local_dp:
        return _train_private(module, data, settings, opt, all_params, loss_fn=loss_fn,
                              seed=seed, steps=steps, terms=terms, randomness=randomness)
    total = 0.0
    for step, idx in enumerate(batch_indices(len(data), steps, settings.batch_size, seed=seed)):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(module(data.x[idx]), data.y[idx])
        if not torch.isfinite(loss):
            raise ClientError(
                f"the local loss became {loss.item()} after {step} steps; lower "
                "algorithm.lr or check the data for extreme values"
            )
        loss.backward()
        if terms is not None and terms.active:
            apply_terms(all_params, terms)
        opt.step()
        total += float(loss.detach())
    return TrainStats(steps=steps, mean_loss=total / max(steps, 1), examples=len(data))


def _train_private(
    module: torch.nn.Module,
    data: Split,
    settings: LocalTraining,
    opt: torch.optim.Optimizer,
    all_params: list[torch.nn.Parameter],
    *,
    loss_fn: LossFn,
    seed: int,
    steps: int,
    terms: LocalTerms | None,
    randomness: Any = None,
) -> TrainStats:
    """DP-SGD steps (see :mod:`consortium.client.dp_sgd`); the optimiser then applies
    momentum and weight decay to the private gradient, as Opacus does."""
    from consortium.client.dp_sgd import poisson_batches, private_step

    n = len(data)
    rate = min(1.0, settings.batch_size / n)
    losses = []
    for step, idx in enumerate(poisson_batches(n, steps, rate, seed=seed, randomness=randomness)):
        opt.zero_grad(set_to_none=True)
        loss = private_step(
            module, data, idx, loss_fn=loss_fn, clip=settings.dp_clip,
            noise_multiplier=settings.dp_noise, expected_batch=rate * n, seed=seed, step=step,
            randomness=randomness,
        )
        if loss is not None:
            if not math.isfinite(loss):
                raise ClientError(f"the local loss became {loss} after {step} steps; lower algorithm.lr")
            losses.append(loss)
        if terms is not None and terms.active:
            apply_terms(all_params, terms)
        opt.step()
    mean = sum(losses) / len(losses) if losses else float("nan")
    return TrainStats(steps=steps, mean_loss=mean, examples=n)
