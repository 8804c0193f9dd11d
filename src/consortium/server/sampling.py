"""Samplers: who takes part in a round."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from consortium.errors import ConfigError
from consortium.seeds import derive_seed

__all__ = ["PoissonSampler", "Sampler", "UniformSampler"]


@runtime_checkable
class Sampler(Protocol):
    """Chooses the round's participants from the available clients, reproducibly."""

    def sample(self, round: int, client_ids: Sequence[str], *, seed: int) -> list[str]: ...

    def expected_size(self, population: int) -> float:
        """The expected number of participants (what DP noise is scaled by)."""
        ...


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

    def expected_size(self, population: int) -> float:
        return float(self.size(population))

    def sample(self, round: int, client_ids: Sequence[str], *, seed: int) -> list[str]:
        k = self.size(len(client_ids))
        if k == len(client_ids):
            return list(client_ids)
        rng = np.random.default_rng(derive_seed(seed, "sample", round))
        chosen = np.sort(rng.choice(len(client_ids), size=k, replace=False))
        return [client_ids[i] for i in chosen]


@dataclass(frozen=True)
class PoissonSampler:
    """Each client takes part independently with probability ``rate`` (so a round may be
    empty). The sampling that privacy amplification by subsampling assumes (Abadi et al.
    2016; McMahan et al. 2018), and what the Poisson accountants compose.
    """

    rate: float

    def __post_init__(self) -> None:
        if not 0 < self.rate <= 1:
            raise ConfigError(
                f"Poisson sampling rate = {self.rate} must be in (0, 1]; set sampling.fraction"
            )

    def size(self, population: int) -> int:
        return max(1, round(self.rate * population))

    def expected_size(self, population: int) -> float:
        return self.rate * population

    def sample(self, round: int, client_ids: Sequence[str], *, seed: int) -> list[str]:
        rng = np.random.default_rng(derive_seed(seed, "poisson", round))
        keep = rng.random(len(client_ids)) < self.rate
        return [cid for cid, k in zip(client_ids, keep) if k]
