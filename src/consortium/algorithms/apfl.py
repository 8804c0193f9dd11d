"""APFL: each client mixes a personal model with the global one by a weight it learns."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch.func import functional_call

from consortium.algorithms.base import LocalResult, PlainServer, TrainContext
from consortium.algorithms.fedavg import plain_update
from consortium.client.training import LocalTerms, LocalTraining, batch_indices, module_device
from consortium.errors import ClientError, ConfigError
from consortium.types import Layout, Parameters, Update

__all__ = ["APFL", "flat_gradient", "training_mask"]

V_KEY = "apfl.v"
"""Client state: the personal model ``v_k`` (a whole flat model)."""
ALPHA_KEY = "apfl.alpha"
"""Client state: the mixing weight ``α_k`` (one value)."""


def flat_gradient(
    module: torch.nn.Module, layout: Layout, flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> tuple[float, torch.Tensor]:
    """The loss of ``module`` with its parameters read from the flat vector ``flat`` on one
    batch, and its gradient as a flat vector."""
    p = flat.detach().requires_grad_(True)
    params, offset = {}, 0
    for spec in layout.specs:
        params[spec.name] = p[offset : offset + spec.numel].view(spec.shape)
        offset += spec.numel
    loss = loss_fn(functional_call(module, params, (x,)), y)
    (grad,) = torch.autograd.grad(loss, p)
    return float(loss.detach()), grad


def training_mask(module: torch.nn.Module, layout: Layout) -> torch.Tensor:
    """``1.0`` at the coordinates of parameters that train, ``0.0`` at frozen ones."""
    trains = {name: q.requires_grad for name, q in module.named_parameters()}
    return torch.cat([torch.full((s.numel,), float(trains[s.name])) for s in layout.specs])


@dataclass(frozen=True)
class APFL(PlainServer):
    """Adaptive Personalized Federated Learning.

    Deng, Kamani, Mahdavi. "Adaptive Personalized Federated Learning", arXiv:2003.13461,
    2020, Algorithm 1 with the adaptive α of §3.3. Client ``k`` keeps a personal model
    ``v_k`` and a weight ``α_k``; its personalised model is ``v̄_k = α_k v_k + (1 − α_k) w``.
    In a round it starts its copy ``w_k`` from the received ``w`` and, at each local step on a
    mini-batch ``ξ`` (the same batch for all three):

    - ``w_k ← w_k − η ∇f_k(w_k; ξ)`` (FedAvg's local step; ``w_k − w`` is the update sent),
    - ``v_k ← v_k − η α_k ∇f_k(v̄_k; ξ)`` with ``v̄_k = α_k v_k + (1 − α_k) w_k``,
    - ``α_k ← clip_[0,1](α_k − η ⟨v_k − w_k, ∇f_k(v̄_k; ξ)⟩)`` (old ``v_k``, ``w_k``).

    The executor trains ``w_k`` (batched in the vectorised executor); ``make_update`` replays
    ``w_k``'s steps on the same batches to drive ``v_k`` and ``α_k`` (one extra pass of
    ``w_k``'s gradient per step, client by client in every executor), so both executors
    keep the same personal models. ``v_k`` starts from the first ``w`` received, ``α_k`` from
    ``alpha``. Memory: one full model and one number per client that has trained. Plain
    local SGD only (weight decay allowed), without local DP (``v_k`` and ``α_k`` would need
    their own private steps). Personalised evaluation evaluates ``v̄_k`` with the global ``w``.

    Attributes:
        alpha: the initial ``α_k`` (``personalization.apfl_alpha``, in ``[0, 1]``).
    """

    alpha: float = 0.25
    name: str = "apfl"

    def __post_init__(self) -> None:
        if not 0 <= self.alpha <= 1:
            raise ConfigError(
                f"personalization.apfl_alpha = {self.alpha!r} is not allowed; expected a number "
                "in [0, 1] (the initial weight of the personal model in the mixture)"
            )

    def check_settings(self, settings: LocalTraining) -> None:
        """Raise :class:`ConfigError` unless local training is plain SGD without local DP."""
        if settings.optimizer != "sgd" or settings.momentum != 0 or settings.local_dp:
            raise ConfigError(
                "apfl trains its personal model and mixing weight by plain SGD beside the "
                f"global model (Deng et al. 2020); found optimizer {settings.optimizer!r}, "
                f"momentum {settings.momentum}, local DP {settings.local_dp}. Set "
                'algorithm.optimizer = "sgd", algorithm.momentum = 0 and no privacy.mode = "local"'
            )

    def local_terms(self, ctx: TrainContext) -> LocalTerms:
        return LocalTerms()

    def make_update(self, ctx: TrainContext, result: LocalResult) -> Update:
        """FedAvg's update; first steps ``v_k`` and ``α_k`` along ``w_k``'s local steps."""
        self.train_personal(ctx, result.steps)
        return plain_update(ctx, result)

    def train_personal(self, ctx: TrainContext, steps: int) -> tuple[torch.Tensor, float]:
        """Run ``steps`` APFL steps (see the class); stores and returns ``(v_k, α_k)``."""
        layout = ctx.global_params.layout
        w = ctx.global_params.vector.clone()
        v = ctx.client_state.get(V_KEY)
        v = w.clone() if v is None else v.clone()
        a = ctx.client_state.get(ALPHA_KEY)
        alpha = self.alpha if a is None else float(a[0])
        lr, wd = ctx.settings.lr, ctx.settings.weight_decay
        module, data = ctx.module, ctx.data
        trains = training_mask(module, layout)  # frozen parameters get no step, as in torch.optim
        device = module_device(module)  # executor.device; the state comes back to the CPU
        if device.type != "cpu":
            w, v, trains = w.to(device), v.to(device), trains.to(device)
        module.train()
        for step, idx in enumerate(batch_indices(len(data), steps, ctx.settings.batch_size,
                                                 seed=ctx.seed)):
            x, y = data.x[idx], data.y[idx]
            if device.type != "cpu":
                x, y = x.to(device), y.to(device)
            _, g_w = flat_gradient(module, layout, w, x, y, ctx.loss_fn)
            mix = alpha * v + (1 - alpha) * w
            loss, g_mix = flat_gradient(module, layout, mix, x, y, ctx.loss_fn)
            g_w, g_mix = g_w * trains, g_mix * trains
            if not torch.isfinite(g_mix).all():
                raise ClientError(
                    f"apfl's personal loss became {loss} after {step} steps; lower algorithm.lr"
                )
            new_alpha = min(1.0, max(0.0, alpha - lr * float(torch.dot(v - w, g_mix))))
            v = v - lr * (alpha * g_mix + wd * trains * v)
            w = w - lr * (g_w + wd * trains * w)
            alpha = new_alpha
        v = v.cpu()
        ctx.client_state[V_KEY] = v
        ctx.client_state[ALPHA_KEY] = torch.tensor([alpha])
        return v, alpha

    def check_model(self, module: torch.nn.Module) -> None:
        """Refuse a batch-norm model (:class:`ConfigError`): APFL differentiates the mixed
        model ``α v + (1 − α) w`` as one flat vector, and batch norm's running statistics
        (which a forward pass in training mode updates in place) cannot be part of it."""
        from consortium.models.zoo import statistics_names

        if statistics_names(module):
            raise ConfigError(
                "apfl cannot train a model with batch normalisation (its running statistics "
                "are not mixed or differentiated with the personal model); use a model "
                'without it (model.name = "mlp" or "cnn") or algorithm.name = "fedbn"'
            )

    def own_parameters(self, params: Parameters, state: Mapping[str, torch.Tensor]) -> Parameters:
        """A client's personalised model (evaluation): ``α_k v_k + (1 − α_k) w``; the global
        model before the client trained."""
        v, a = state.get(V_KEY), state.get(ALPHA_KEY)
        if v is None or a is None:
            return params
        alpha = float(a[0])
        return params.replace(alpha * v + (1 - alpha) * params.vector)
