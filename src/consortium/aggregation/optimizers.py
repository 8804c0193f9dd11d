"""Server optimisers: how the aggregated delta moves the global model (Reddi et al. 2021).

The clients' mean delta ``Δ`` is a pseudo-gradient with the sign of a descent step
(``Δ = local − global``). Each optimiser is a small factory whose result has
``init(layout) -> state`` and ``step(params, Δ, state) -> (params, state)``, optax style.

References:
    Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar, McMahan. "Adaptive Federated
    Optimization", ICLR 2021, Algorithm 2 (FedAdagrad, FedYogi, FedAdam); defaults
    β₁ = 0.9, β₂ = 0.99, τ = 10⁻³, and ``v₋₁ = τ²``.
    Hsu, Qi, Brown. "Measuring the Effects of Non-Identical Data Distribution for Federated
    Visual Classification", 2019 (FedAvgM, server momentum).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from consortium.aggregation.base import StageState
from consortium.errors import ConfigError
from consortium.types import Layout

__all__ = ["SERVER_OPTIMIZERS", "adagrad", "adam", "avgm", "server_optimizer", "sgd", "yogi"]


def _check(name: str, value: float, low: float, high: float | None = None) -> None:
    ok = value > low if high is None else low <= value < high
    if not ok:
        allowed = f"> {low}" if high is None else f"in [{low}, {high})"
        raise ConfigError(f"server optimiser: {name} = {value!r} is not allowed; expected {allowed}")


@dataclass(frozen=True)
class ServerSGD:
    """``x ← x + η Δ``; with η = 1 this is FedAvg (McMahan et al. 2017)."""

    lr: float = 1.0
    name: str = "sgd"

    def init(self, layout: Layout) -> StageState:
        return {}

    def step(
        self, params: torch.Tensor, delta: torch.Tensor, state: StageState
    ) -> tuple[torch.Tensor, StageState]:
        return params + self.lr * delta, state


@dataclass(frozen=True)
class ServerMomentum:
    """FedAvgM (Hsu et al. 2019): ``m ← β m + Δ``, ``x ← x + η m``."""

    lr: float = 1.0
    momentum: float = 0.9
    name: str = "avgm"

    def init(self, layout: Layout) -> StageState:
        return {"m": torch.zeros(layout.size)}

    def step(
        self, params: torch.Tensor, delta: torch.Tensor, state: StageState
    ) -> tuple[torch.Tensor, StageState]:
        m = self.momentum * state["m"] + delta
        return params + self.lr * m, {"m": m}


@dataclass(frozen=True)
class ServerAdaptive:
    """FedAdagrad / FedYogi / FedAdam (Reddi et al. 2021, Algorithm 2).

    ``m ← β₁ m + (1−β₁) Δ``; second moment ``v`` by the chosen rule; ``x ← x + η m / (√v + τ)``.
    No bias correction, as in the paper.
    """

    rule: str
    lr: float = 1e-2
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    @property
    def name(self) -> str:
        return self.rule

    def init(self, layout: Layout) -> StageState:
        return {
            "m": torch.zeros(layout.size),
            "v": torch.full((layout.size,), self.tau**2),
        }

    def step(
        self, params: torch.Tensor, delta: torch.Tensor, state: StageState
    ) -> tuple[torch.Tensor, StageState]:
        m = self.beta1 * state["m"] + (1 - self.beta1) * delta
        sq = delta * delta
        v = state["v"]
        if self.rule == "adagrad":
            v = v + sq
        elif self.rule == "yogi":
            v = v - (1 - self.beta2) * sq * torch.sign(v - sq)
        else:  # adam
            v = self.beta2 * v + (1 - self.beta2) * sq
        return params + self.lr * m / (torch.sqrt(v) + self.tau), {"m": m, "v": v}


def sgd(lr: float = 1.0) -> ServerSGD:
    """Plain server step ``x ← x + lr·Δ`` (FedAvg when lr = 1)."""
    _check("lr", lr, 0.0)
    return ServerSGD(lr=lr)


def avgm(lr: float = 1.0, *, momentum: float = 0.9) -> ServerMomentum:
    """Server momentum, FedAvgM (Hsu et al. 2019)."""
    _check("lr", lr, 0.0)
    _check("momentum", momentum, 0.0, 1.0)
    return ServerMomentum(lr=lr, momentum=momentum)


def _adaptive(rule: str, lr: float, beta1: float, beta2: float, tau: float) -> ServerAdaptive:
    _check("lr", lr, 0.0)
    _check("beta1", beta1, 0.0, 1.0)
    _check("beta2", beta2, 0.0, 1.0)
    _check("tau", tau, 0.0)
    return ServerAdaptive(rule=rule, lr=lr, beta1=beta1, beta2=beta2, tau=tau)


def adam(lr: float = 1e-2, *, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> ServerAdaptive:
    """FedAdam (Reddi et al. 2021)."""
    return _adaptive("adam", lr, beta1, beta2, tau)


def yogi(lr: float = 1e-2, *, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> ServerAdaptive:
    """FedYogi (Reddi et al. 2021): ``v ← v − (1−β₂) Δ² sign(v − Δ²)``."""
    return _adaptive("yogi", lr, beta1, beta2, tau)


def adagrad(lr: float = 1e-2, *, beta1: float = 0.9, tau: float = 1e-3) -> ServerAdaptive:
    """FedAdagrad (Reddi et al. 2021): ``v ← v + Δ²``."""
    return _adaptive("adagrad", lr, beta1, 0.0, tau)


SERVER_OPTIMIZERS = {
    "sgd": "x ← x + lr·Δ (FedAvg with lr = 1)",
    "avgm": "server momentum, FedAvgM (Hsu et al. 2019)",
    "adam": "FedAdam (Reddi et al. 2021)",
    "yogi": "FedYogi (Reddi et al. 2021)",
    "adagrad": "FedAdagrad (Reddi et al. 2021)",
}

_DEFAULT_LR = {"sgd": 1.0, "avgm": 1.0, "adam": 1e-2, "yogi": 1e-2, "adagrad": 1e-2}


def server_optimizer(
    name: str, *, lr: float = 0.0, momentum: float = 0.9, beta1: float = 0.9, beta2: float = 0.99,
    tau: float = 1e-3,
):
    """Build a server optimiser by name; ``lr = 0`` picks the optimiser's default."""
    if name not in _DEFAULT_LR:
        raise ConfigError(
            f"server.optimizer = {name!r} is not known; expected one of {', '.join(_DEFAULT_LR)}"
        )
    lr = lr or _DEFAULT_LR[name]
    if name == "sgd":
        return sgd(lr)
    if name == "avgm":
        return avgm(lr, momentum=momentum)
    if name == "adagrad":
        return adagrad(lr, beta1=beta1, tau=tau)
    return _adaptive(name, lr, beta1, beta2, tau)
