"""q-FFL (q-FedAvg): fair resource allocation, weighting clients up by their loss to the power q."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from consortium.aggregation.base import Aggregate, ExtraSpec, RoundContext, StageState
from consortium.algorithms.base import LocalResult, PlainServer, TrainContext
from consortium.client.training import LocalTerms, LocalTraining, module_device
from consortium.data.base import Split
from consortium.errors import ConfigError
from consortium.types import Layout, Update

__all__ = ["QFedAvg", "training_loss"]

_H = "qffl.h"
_LOSS = "qffl.loss"


@torch.no_grad()
def training_loss(module: torch.nn.Module, data: Split, loss_fn, *, chunk: int = 8192) -> float:  # type: ignore[no-untyped-def]
    """The mean of ``loss_fn`` over ``data`` (every example, in eval mode, no gradient)."""
    module.eval()
    total, n = 0.0, len(data)
    for i in range(0, n, chunk):
        x, y = data.x[i : i + chunk], data.y[i : i + chunk]
        device = module_device(module)  # executor.device
        total += float(loss_fn(module(x.to(device)), y.to(device))) * len(y)
    return total / max(n, 1)


@dataclass(frozen=True)
class QFedAvg(PlainServer):
    """q-FedAvg, the solver of q-FFL's objective ``min_w Σ_k p_k F_k(w)^{q+1} / (q+1)``.

    Li, Sanjabi, Beirami, Smith. "Fair Resource Allocation in Federated Learning", ICLR 2020,
    Algorithm 2. Client ``k`` receives ``w``, computes ``F_k(w)`` (its mean loss on all its
    training data), runs the local epochs to ``w̄_k`` and forms, with the Lipschitz estimate
    ``L = 1/lr`` (the paper's choice),

    - ``Δ_k = L·(w − w̄_k)``,
    - ``h_k = q·F_k^{q−1}·‖Δ_k‖² + L·F_k^q``;

    the server steps ``w ← w − Σ_k F_k^q Δ_k / Σ_k h_k``. In our seam the client sends the
    delta ``−F_k^q Δ_k`` with weight 1 (the paper's sums are over clients, not examples) and
    the extras ``qffl.h = h_k`` and ``qffl.loss = F_k``; ``server_step`` turns the mean of the
    deltas back into their sum and divides by ``Σ h_k``. With ``q = 0`` this is FedAvg with
    every client weighted equally (``h_k = L``, the step is the mean of ``w̄_k − w``).

    A site's ``h_k`` divides the whole step, so a deployed federation that does not trust its
    sites should pair q-FFL with a robust stage; the extras are declared non-negative.

    Attributes:
        q: the fairness exponent (``algorithm.q``, ``>= 0``; 0 is uniform FedAvg, larger
            values weight high-loss clients up).
    """

    q: float = 1.0
    name: str = "qffl"

    def __post_init__(self) -> None:
        if not self.q >= 0:
            raise ConfigError(f"algorithm.q = {self.q!r} is not allowed; expected a number >= 0")

    def expected_extras(
        self, layout: Layout, settings: LocalTraining, max_weight: float
    ) -> dict[str, ExtraSpec]:
        """``h_k`` and ``F_k``: one non-negative value each."""
        return {_H: ExtraSpec((1,), low=0.0), _LOSS: ExtraSpec((1,), low=0.0)}

    def local_terms(self, ctx: TrainContext) -> LocalTerms:
        return LocalTerms()

    def make_update(self, ctx: TrainContext, result: LocalResult) -> Update:
        ctx.global_params.load_into(ctx.module)
        loss = training_loss(ctx.module, ctx.data, ctx.loss_fn)
        lipschitz = 1.0 / ctx.settings.lr
        step = -lipschitz * result.delta  # Δ_k = L(w − w̄_k)
        f_q = loss**self.q
        h = lipschitz * f_q
        if self.q > 0:
            # F^{q−1} with F = 0 and q < 1 is infinite; a client at zero loss adds nothing
            h += self.q * max(loss, 1e-12) ** (self.q - 1) * float(step.double().square().sum())
        return Update(
            ctx.client_id, -f_q * step, 1.0,
            metrics={"train_loss": result.mean_loss, "steps": float(result.steps)},
            extras={_H: torch.tensor([h]), _LOSS: torch.tensor([loss])},
        )

    def server_step(
        self, aggregate: Aggregate, state: StageState, ctx: RoundContext
    ) -> tuple[torch.Tensor, StageState]:
        h = float(aggregate.extras[_H][0]) if _H in aggregate.extras else 0.0
        if not (aggregate.weight > 0 and h > 0):  # no client: nothing to step by
            return torch.zeros_like(aggregate.delta), state
        return aggregate.delta * (aggregate.weight / h), state
