"""Local (sample-level) DP: DP-SGD steps inside a client (Abadi et al. 2016).

Each step draws a Poisson batch (every example independently with probability
``q = batch_size / n``), computes per-example gradients with :mod:`torch.func`, clips each to
L2 norm ``clip``, adds ``N(0, (noise_multiplier·clip)²)`` to their sum and divides by the
*expected* batch size ``q·n``. That is exactly the mechanism the accountant composes:
``PoissonSampledDpEvent(q, GaussianDpEvent(noise_multiplier))`` per step.

With the model on a GPU (``executor.device``) the per-example gradients and clipping run
there; the clipped sum comes back to the CPU, where the batches and the noise are drawn as
without a GPU, and the noisy gradient goes back to the model.

At a deployed site the batches and the noise come from the site's own CSPRNG, never from the
task's seed, which the server chooses: with the seed, a server could subtract the noise exactly.

Abadi, Chu, Goodfellow, McMahan, Mironov, Talwar, Zhang. "Deep Learning with Differential
Privacy", CCS 2016.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch.func import functional_call, grad, vmap

from consortium.data.base import Split
from consortium.seeds import derive_seed

if TYPE_CHECKING:
    from consortium.privacy.randomness import Randomness

__all__ = ["poisson_batches", "private_step"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def poisson_batches(
    n: int, steps: int, rate: float, *, seed: int, randomness: Randomness | None = None
) -> list[torch.Tensor]:
    """``steps`` batches, each example in each batch independently with probability ``rate``.

    With ``randomness`` (a site's CSPRNG) the draws are the site's own; otherwise they follow
    from ``seed`` (simulation: repeatable, and known to whoever knows the seed).
    """
    if randomness is not None:
        return [torch.nonzero(randomness.bernoulli(n, rate)).flatten() for _ in range(steps)]
    gen = torch.Generator().manual_seed(derive_seed(seed, "dp-batches") % 2**63)
    return [torch.nonzero(torch.rand(n, generator=gen) < rate).flatten() for _ in range(steps)]


def private_step(
    module: torch.nn.Module,
    data: Split,
    idx: torch.Tensor,
    *,
    loss_fn: LossFn,
    clip: float,
    noise_multiplier: float,
    expected_batch: float,
    seed: int,
    step: int,
    randomness: Randomness | None = None,
) -> float | None:
    """Write the DP-SGD gradient into ``p.grad`` of the trainable parameters.

    Returns the batch's mean loss (``None`` for an empty batch, which still gets its noise).
    With ``randomness`` (a deployed site's CSPRNG) the noise is the snapped Gaussian
    (:meth:`~consortium.privacy.randomness.SystemRandomness.snapped_gaussian`): the same
    noise multiplier for the accountant, and no floating-point noise for Mironov's (2012)
    attack; otherwise a float Gaussian from ``seed`` (simulation).
    """
    named = {n: p for n, p in module.named_parameters() if p.requires_grad}
    sizes = [p.numel() for p in named.values()]
    d = sum(sizes)
    total = torch.zeros(d, dtype=torch.float64)
    loss_value: float | None = None
    if len(idx) > 0:
        x, y = data.x[idx], data.y[idx]
        device = next(iter(named.values())).device
        if device.type != "cpu":  # executor.device: the batch goes to the model
            x, y = x.to(device), y.to(device)
        detached = {n: p.detach() for n, p in named.items()}

        def one(params: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
            return loss_fn(functional_call(module, params, (xi.unsqueeze(0),)), yi.unsqueeze(0))

        per = vmap(grad(one), in_dims=(None, 0, 0))(detached, x, y)
        flat = torch.cat([per[n].reshape(len(idx), -1) for n in named], dim=1).double()
        norms = torch.linalg.vector_norm(flat, dim=1)
        factor = torch.clamp(clip / torch.clamp(norms, min=1e-12), max=1.0)
        # the clipped sum comes back to the CPU, where the noise is drawn (never a GPU RNG)
        total = (flat * factor.unsqueeze(1)).sum(0).cpu()
        with torch.no_grad():
            loss_value = float(loss_fn(module(x), y))
    if randomness is not None:
        noisy = randomness.snapped_gaussian(
            total.reshape(-1), sensitivity=clip, noise_multiplier=noise_multiplier
        )
    else:
        gen = torch.Generator().manual_seed(derive_seed(seed, "dp-noise", step) % 2**63)
        noisy = total + torch.randn(d, generator=gen, dtype=torch.float64) * (noise_multiplier * clip)
    gradient = (noisy / expected_batch).to(torch.float32)
    offset = 0
    for p, size in zip(named.values(), sizes):
        p.grad = gradient[offset : offset + size].view_as(p).to(p.device).clone()
        offset += size
    return loss_value
