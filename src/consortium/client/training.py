"""Local training: any torch module, any loss, epochs or steps, SGD (momentum) or Adam."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from consortium.data.base import Split
from consortium.errors import ClientError

__all__ = [
    "LocalTerms",
    "LocalTraining",
    "Phase",
    "TrainStats",
    "batch_matrix",
    "local_steps",
    "module_device",
    "phase_schedule",
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


@dataclass(frozen=True, eq=False)
class Phase:
    """A stretch of local training in which only some coordinates train.

    FedRep (Collins et al. 2021) trains the head with the body fixed, then the body with the
    head fixed: two phases. During a phase the other coordinates get no step, no weight
    decay and no momentum (as a parameter the optimiser does not hold); each phase starts its
    coordinates' momentum afresh.

    Attributes:
        train: bool vector over the flat layout, ``True`` where this phase trains; it must
            cover whole tensors (a parameter trains entirely or not at all).
        epochs: the phase's length: ``epochs`` passes over the client's data, or with fixed
            local steps (``algorithm.local_steps = S``) ``epochs · S`` steps; ``None`` is the
            settings' own local work (``local_epochs`` epochs, or ``S`` steps).
    """

    train: torch.Tensor
    epochs: int | None = None


@dataclass(frozen=True)
class LocalTerms:
    """What an algorithm changes in local training, as flat vectors over the model's layout.

    Each local gradient becomes ``g ← g + prox_mu·(w − anchor) + offset``: FedProx's proximal
    term is ``prox_mu`` with the global model as ``anchor``; SCAFFOLD's drift correction is
    ``offset = c − c_i``. ``start`` is where local training starts instead of the global model
    (a personalised algorithm's global model with the client's own head); ``phases`` split
    local training into stretches that train different coordinates (FedRep's head, then
    body), run back to back on one stream of batches. Being plain tensors (not closures), the
    same terms drive the sequential loop and the vectorised executor.
    """

    prox_mu: float = 0.0
    anchor: torch.Tensor | None = None
    offset: torch.Tensor | None = None
    start: torch.Tensor | None = None
    phases: tuple[Phase, ...] = ()

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


def phase_schedule(num_examples: int, settings: LocalTraining, phases: Sequence[Phase],
                   steps: int | None = None) -> list[int]:
    """Steps of each phase (see :class:`Phase`); with ``steps`` (a straggler's cut), the
    phases in order take what is left of ``steps``."""
    planned = [
        planned_steps(num_examples, settings) if p.epochs is None
        else p.epochs * (settings.steps if settings.steps > 0
                         else math.ceil(num_examples / settings.batch_size))
        for p in phases
    ]
    if steps is None:
        return planned
    out = []
    for n in planned:
        out.append(min(n, steps))
        steps -= out[-1]
    return out


def local_steps(num_examples: int, settings: LocalTraining, work: float = 1.0,
                terms: LocalTerms | None = None) -> int:
    """Local steps a client with ``num_examples`` does this round: its planned steps (the sum
    of the phases' when ``terms`` has phases) cut to the fraction ``work``."""
    if terms is not None and terms.phases:
        planned = sum(phase_schedule(num_examples, settings, terms.phases))
    else:
        planned = planned_steps(num_examples, settings)
    return steps_for_work(planned, work)


class PlainSGD:
    """``torch.optim.SGD``'s single-tensor update (no dampening, no Nesterov), step for step
    and bit for bit (tests/client/test_training.py compares both on momentum and weight
    decay), without ``torch.optim.Optimizer``: its first constructor in a process imports
    ``torch._dynamo`` (about a second here), which every run that trains one model at a time
    paid (the pooled baseline, the sequential executor's first client)."""

    def __init__(self, params: Sequence[torch.nn.Parameter], *, lr: float, momentum: float,
                 weight_decay: float) -> None:
        self.params = list(params)
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.buffers: list[torch.Tensor | None] = [None] * len(self.params)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for i, p in enumerate(self.params):
            grad = p.grad
            if grad is None:  # torch.optim skips a parameter without a gradient
                continue
            if self.weight_decay != 0:
                grad = grad.add(p, alpha=self.weight_decay)
            if self.momentum != 0:
                buf = self.buffers[i]
                if buf is None:
                    buf = self.buffers[i] = torch.clone(grad).detach()
                else:
                    buf.mul_(self.momentum).add_(grad, alpha=1.0)
                grad = buf
            p.add_(grad, alpha=-self.lr)


Optimizer = PlainSGD | torch.optim.Optimizer


def make_optimizer(params: list[torch.nn.Parameter], settings: LocalTraining) -> Optimizer:
    if settings.optimizer == "sgd":
        return PlainSGD(params, lr=settings.lr, momentum=settings.momentum,
                        weight_decay=settings.weight_decay)
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


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of ``module``'s parameters (``executor.device``; CPU without parameters)."""
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def terms_on(terms: LocalTerms, device: torch.device) -> LocalTerms:
    """``terms`` with the vectors local training adds to gradients (``anchor``, ``offset``)
    on ``device``; the CPU originals are untouched."""
    return dataclasses.replace(
        terms,
        anchor=terms.anchor.to(device) if terms.anchor is not None else None,
        offset=terms.offset.to(device) if terms.offset is not None else None,
    )


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
    ``terms.phases`` (FedRep) train their coordinates in turn on one stream of batches.

    Raises:
        ClientError: the loss became NaN or infinite (lower the learning rate); phases with
            local DP, or a phase that splits a tensor.
    """
    all_params = list(module.parameters())  # the order of Parameters' flat layout
    params = [p for p in all_params if p.requires_grad]
    module.train()
    device = module_device(module)
    if terms is not None and device.type != "cpu":  # the model's device (executor.device)
        terms = terms_on(terms, device)
    if terms is not None and terms.phases:
        return _train_phases(module, data, settings, all_params, loss_fn=loss_fn, seed=seed,
                             steps=steps, terms=terms)
    opt = make_optimizer(params, settings)
    if settings.local_dp:
        return _train_private(module, data, settings, opt, all_params, loss_fn=loss_fn,
                              seed=seed, steps=steps, terms=terms, randomness=randomness)
    batches = batch_indices(len(data), steps, settings.batch_size, seed=seed)
    total = _sgd_steps(module, data, batches, opt, all_params, loss_fn=loss_fn, terms=terms)
    return TrainStats(steps=steps, mean_loss=total / max(steps, 1), examples=len(data))


def _sgd_steps(
    module: torch.nn.Module,
    data: Split,
    batches: Sequence[torch.Tensor],
    opt: Optimizer,
    all_params: list[torch.nn.Parameter],
    *,
    loss_fn: LossFn,
    terms: LocalTerms | None,
    first: int = 0,
) -> float:
    """One optimiser step per batch; returns the summed loss (``first``: the steps before)."""
    total = 0.0
    device = module_device(module)
    for step, idx in enumerate(batches, start=first):
        opt.zero_grad(set_to_none=True)
        x, y = data.x[idx], data.y[idx]
        if device.type != "cpu":  # seeded CPU indices, the batch moved (executor.device)
            x, y = x.to(device), y.to(device)
        loss = loss_fn(module(x), y)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise ClientError(
                f"the local loss became {value} after {step} steps; lower "
                "algorithm.lr or check the data for extreme values"
            )
        loss.backward()
        if terms is not None and terms.active:
            apply_terms(all_params, terms)
        opt.step()
        total += value
    return total


def _train_phases(
    module: torch.nn.Module,
    data: Split,
    settings: LocalTraining,
    all_params: list[torch.nn.Parameter],
    *,
    loss_fn: LossFn,
    seed: int,
    steps: int,
    terms: LocalTerms,
) -> TrainStats:
    """Each phase trains its own parameters (the others are switched off for the phase, so
    they get no gradient, step, weight decay or momentum), with a fresh optimiser, on its
    stretch of one batch stream."""
    if settings.local_dp:
        raise ClientError(
            "local training in phases (FedRep) is not available with local DP-SGD (its "
            "per-example clipping spans every trainable parameter); use fedper, or central DP"
        )
    schedule = phase_schedule(len(data), settings, terms.phases, steps)
    batches = batch_indices(len(data), steps, settings.batch_size, seed=seed)
    trains = [p.requires_grad for p in all_params]
    total, done = 0.0, 0
    try:
        for phase, n in zip(terms.phases, schedule):
            chosen = _phase_params(all_params, trains, phase.train)
            for p, train in zip(all_params, trains):
                p.requires_grad_(train and any(p is q for q in chosen))
            if n and chosen:
                opt = make_optimizer(chosen, settings)
                total += _sgd_steps(module, data, batches[done : done + n], opt, all_params,
                                    loss_fn=loss_fn, terms=terms, first=done)
            done += n
    finally:
        for p, train in zip(all_params, trains):
            p.requires_grad_(train)
    return TrainStats(steps=steps, mean_loss=total / max(steps, 1), examples=len(data))


def _phase_params(
    all_params: list[torch.nn.Parameter], trains: list[bool], mask: torch.Tensor
) -> list[torch.nn.Parameter]:
    """The trainable parameters a phase's ``mask`` covers; a tensor it covers only in part
    is an error (a phase trains whole parameters)."""
    chosen, offset = [], 0
    for p, train in zip(all_params, trains):
        part = mask[offset : offset + p.numel()]
        offset += p.numel()
        if bool(part.all()):
            if train:
                chosen.append(p)
        elif bool(part.any()):
            raise ClientError(
                "a training phase covers part of a parameter tensor; a phase must train whole "
                "parameters (build its mask from parameter names)"
            )
    return chosen


def _train_private(
    module: torch.nn.Module,
    data: Split,
    settings: LocalTraining,
    opt: Optimizer,
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
