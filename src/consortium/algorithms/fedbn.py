"""FedBN: every batch-norm layer stays at its client; the rest is averaged as in FedAvg.

Li, Jiang, Zhang, Kamp, Dou. "FedBN: Federated Learning on Non-IID Features via Local Batch
Normalization", ICLR 2021. Clients whose features differ (scanners, hospitals, image styles)
share every weight but their batch-norm layers — the affine weight and bias and the running
statistics — which each keeps and trains locally, so each client normalises its own feature
distribution. FedBN is the personal-parameter seam (:mod:`consortium.algorithms.personal`)
with every batch-norm module personal: a client starts each round from the global model with
its own batch-norm coordinates, keeps them after local training and sends exact zeros there;
the server never moves the global copy's batch-norm coordinates. Evaluation of a client's
own model (``personalized_*`` metrics) uses its own batch-norm layers.

A batch-norm layer is recognised in the flat layout by its running statistics held as
parameters (``<layer>.running_mean`` and ``<layer>.running_var``, as the zoo's ``mlp_bn`` and
``cnn_bn`` hold them: :mod:`consortium.models.zoo`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from consortium.algorithms.base import TrainContext, train_with
from consortium.algorithms.personal import PersonalLayers, _Personal
from consortium.client.training import LocalTerms, LocalTraining
from consortium.errors import ConfigError
from consortium.types import Layout, Update

__all__ = ["BatchNormLayers", "FedBN", "batch_norm_layers"]


def batch_norm_layers(names: Sequence[str]) -> list[str]:
    """The batch-norm layers among a model's parameter ``names``: the modules that hold both
    ``running_mean`` and ``running_var`` as parameters, in the model's order.

    Raises:
        ConfigError: there are none (FedBN needs batch normalisation), or they hold every
            parameter (nothing would be shared).
    """
    owners = {_owner(n) for n in names}
    layers = [
        owner for owner in dict.fromkeys(_owner(n) for n in names)
        if f"{_prefix(owner)}running_mean" in names and f"{_prefix(owner)}running_var" in names
    ]
    if not layers:
        raise ConfigError(
            "fedbn keeps each client's batch-norm layers, but the model has none (no layer holds "
            'running_mean and running_var as parameters); use model.name = "mlp_bn" or '
            '"cnn_bn", or a factory built with consortium.models.zoo.FederatedBatchNorm1d/2d'
        )
    if len(layers) == len(owners):
        raise ConfigError(
            "fedbn would keep every parameter at the clients (the model has only batch-norm "
            "layers), so nothing would be shared; use a model with other layers"
        )
    return layers


def _owner(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def _prefix(owner: str) -> str:
    return f"{owner}." if owner else ""


@functools.lru_cache(maxsize=32)
def _cached_mask(specs: tuple[tuple[str, int], ...]) -> torch.Tensor:
    names = [n for n, _ in specs]
    layers = set(batch_norm_layers(names))
    return torch.cat([torch.full((k,), _owner(n) in layers, dtype=torch.bool) for n, k in specs])


@dataclass(frozen=True)
class BatchNormLayers(PersonalLayers):
    """The personal parameters of FedBN: every parameter of every batch-norm layer (affine
    weight and bias, running mean and variance), found in the layout by
    :func:`batch_norm_layers`."""

    def mask(self, layout: Layout) -> torch.Tensor:
        """Bool vector of ``layout.size``, ``True`` at the batch-norm coordinates (cached and
        shared: do not modify it in place).

        Raises:
            ConfigError: as :func:`batch_norm_layers`.
        """
        return _cached_mask(tuple((s.name, s.numel) for s in layout.specs))


@dataclass(frozen=True)
class FedBN(_Personal):
    """FedBN (Li et al., ICLR 2021): FedAvg with every batch-norm layer local to its client.

    Local training is FedAvg's (local SGD from the global model, here with the client's own
    batch-norm layers); the update is the delta of the shared coordinates, sample-weighted
    by the server's mean; the batch-norm weight, bias and running statistics stay in the
    client's state (``"personal"``), checkpointed with the run. Under central DP only the
    shared coordinates are sent, clipped and noised (the batch-norm coordinates are exact
    zeros, and the server's step never moves them). Local DP-SGD is refused for batch-norm
    models (:func:`~consortium.models.zoo.check_local_dp`).
    """

    personal: PersonalLayers = field(default_factory=BatchNormLayers)
    name: str = "fedbn"

    def check_settings(self, settings: LocalTraining) -> None:
        """Raise :class:`ConfigError` under local DP-SGD (per-example gradients are
        meaningless with batch statistics)."""
        if settings.local_dp:
            raise ConfigError(
                "fedbn trains batch-norm models, which local DP-SGD (privacy.mode = \"local\") "
                "cannot protect (an example's gradient depends on the rest of its batch); use "
                'privacy.mode = "central"'
            )

    def local_terms(self, ctx: TrainContext) -> LocalTerms:
        return LocalTerms(start=self.personal.start(ctx.global_params, ctx.client_state))

    def train(self, ctx: TrainContext) -> Update:
        return train_with(self, ctx)
