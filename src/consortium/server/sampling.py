"""Samplers: who takes part in a round."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from consortium.errors import ConfigError
from consortium.seeds import derive_seed

__all__ = ["Sampler", "UniformSampler"]


@runtime_checkable
class Sampler(Protocol):
    """Chooses the round's participants from the available clients, reproducibly."""

    def sample(self, round: int, client_ids: Sequence[str], *, seed: int) -> list[str]: ...


@dataclass(frozen=True)
class UniformSampler:
    """Uniform sampling without replacement of ``count`` clients, or ``fraction`` of them.

    ``count = 0`` and ``fraction = 0`` mean every client. A fraction is rounded up, so at
    least one client takes part. Participants keep the order of ``client_ids``.
    """

    count: int = 0
    fraction: float = 0.0

    def __post_init__(self) -> None:
        if self.count < 0:
            raise ConfigError(f"sampling.clients_per_round = {self.count} must be >= 0")
        if not 0 <= self.fraction <= 1:
            raise ConfigError(f"sampling.fraction = {self.fraction} must be in (0, 1]")
        if self.count and self.fraction:
            raise ConfigError("set sampling.clients_per_round or sampling.fraction, not both")

    def size(self, population: int) -> int:
        if self.count:
            if self.count > population:
                raise ConfigError(
                    f"sampling.clients_per_round = {self.count} but the data set has only "
                    f"{population} clients; lower it to at most {population}"
                )
            return self.count
        if self.fraction:
            return max(1, math.ceil(self.fraction * population))
        return population

    def sample(self, round: int, client_ids: Sequence[str], *, seed: int) -> list[str]:
        k = self.size(len(client_ids))
        if k == len(client_ids):
            return list(client_ids)
        rng = np.random.default_rng(derive_seed(seed, "sample", round))
        chosen = np.sort(rng.choice(len(client_ids), size=k, replace=False))
        return [client_ids[i] for i in chosen]
