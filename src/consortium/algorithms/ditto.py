"""Ditto: a global model trained as FedAvg, and a personal model per client kept near it."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from consortium.algorithms.base import LocalResult, PlainServer, TrainContext
from consortium.algorithms.fedavg import plain_update
from consortium.client.training import (
    LocalTerms,
    planned_steps,
    steps_for_work,
    train_locally,
)
from consortium.errors import ConfigError
from consortium.seeds import derive_seed
from consortium.types import Parameters, Update

__all__ = ["Ditto"]

STATE_KEY = "ditto.v"
"""The client-state entry holding a client's personal model ``v_k`` (a whole flat model)."""


@dataclass(frozen=True)
class Ditto(PlainServer):
    """Ditto: global FedAvg plus a personal model per client, regularised toward the global one.

    Li, Hu, Beirami, Smith. "Ditto: Fair and Robust Federated Learning Through
    Personalization", ICML 2021, Algorithm 1. A sampled client ``k`` receives ``w``; it runs
    the local epochs from ``w`` and sends the delta, exactly as FedAvg (the global model is
    FedAvg's). It also runs ``personal_steps`` SGD steps on its personal model ``v_k``
    (starting from the first ``w`` it receives) on ``F_k(v) + λ/2·‖v − w‖²``, and keeps ``v_k``
    in its client state. Personalised evaluation evaluates ``v_k``.

    Memory: one full model per client that has trained (``layout.size`` floats each), in the
    client state (and its checkpoint). The personal steps run in the client's own process
    after the global model's local training, one client at a time in every executor (the
    vectorised executor batches the global part only); they use fresh batches (a seed derived
    from the task's) and no local DP noise, because ``v_k`` never leaves the site — only its
    evaluation metrics do.

    Attributes:
        lam: ``λ`` (``personalization.ditto_lambda``, ``>= 0``): 0 is local training from the
            first global model received; large values pull ``v_k`` onto ``w``.
        personal_steps: the personal model's local SGD steps each round; 0 is the same work
            as the global model's (``algorithm.local_epochs`` or ``local_steps``).
    """

    lam: float = 0.1
    personal_steps: int = 0
    name: str = "ditto"

    def __post_init__(self) -> None:
        if not self.lam >= 0:
            raise ConfigError(
                f"personalization.ditto_lambda = {self.lam!r} is not allowed; expected a number >= 0"
            )
        if self.personal_steps < 0:
            raise ConfigError(
                f"personalization.personal_steps = {self.personal_steps} is not allowed; expected "
                "0 (the global model's local work) or a number of steps >= 1"
            )

    def local_terms(self, ctx: TrainContext) -> LocalTerms:
        return LocalTerms()

    def make_update(self, ctx: TrainContext, result: LocalResult) -> Update:
        """FedAvg's update; first trains and stores the personal model ``v_k``."""
        self.train_personal(ctx)
        return plain_update(ctx, result)

    def train_personal(self, ctx: TrainContext) -> torch.Tensor:
        """``personal_steps`` steps on ``F_k(v) + λ/2·‖v − w‖²`` from the stored ``v_k`` (the
        received ``w`` the first time); stores and returns the new ``v_k``."""
        w = ctx.global_params
        start = ctx.client_state.get(STATE_KEY)
        w.replace(start if start is not None else w.vector).load_into(ctx.module)
        n = len(ctx.data)
        planned = self.personal_steps or planned_steps(n, ctx.settings)
        settings = dataclasses.replace(ctx.settings, dp_clip=0.0, dp_noise=0.0)
        terms = LocalTerms(prox_mu=self.lam, anchor=w.vector) if self.lam else None
        if n > 0:
            train_locally(ctx.module, ctx.data, settings, loss_fn=ctx.loss_fn,
                          seed=derive_seed(ctx.seed, "ditto"), steps=steps_for_work(planned, ctx.work),
                          terms=terms)
        v = Parameters.from_module(ctx.module).vector.cpu().clone()  # state stays on the CPU
        ctx.client_state[STATE_KEY] = v
        return v

    def own_parameters(self, params: Parameters, state: Mapping[str, torch.Tensor]) -> Parameters:
        """A client's own model (evaluation): ``v_k``, or the global model before it trained."""
        v = state.get(STATE_KEY)
        return params if v is None else params.replace(v)
