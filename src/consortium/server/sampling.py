"""Samplers: who takes part in a round."""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from consortium.errors import ConfigError
from consortium.seeds import derive_seed

__all__ = ["PoissonSampler", "Sampler", "SecretSampler", "UniformSampler", "new_sampling_secret"]


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


def new_sampling_secret() -> str:
    """A fresh 256-bit secret from the operating system's CSPRNG, as 64 hex digits."""
    return secrets.token_hex(32)


@dataclass(frozen=True)
class SecretSampler:
    """``inner``'s draws, seeded from the server's own ``secret`` instead of the run seed.

    A deployment's run seed travels to every site in the experiment's configuration, so a
    sample drawn from it is known to all of them, and amplification by sampling — which
    assumes the adversary cannot tell who took part (Balle et al. 2018) — no longer holds.
    The round loop still passes the run seed; this sampler ignores it. Each round's draw is
    seeded from ``(secret, round)``, so a run resumed with the same secret samples the same
    cohorts. The secret never appears in the ``repr``.

    Args:
        inner: the sampler the configuration asks for (Poisson or uniform).
        secret: hex digits (:func:`new_sampling_secret`), kept by the server alone.

    Raises:
        ConfigError: a secret that is not at least 128 bits of hex.
    """

    inner: Sampler
    secret: str = field(repr=False)
    secret_from_sites = True
    """The sites cannot reproduce the sample (what the privacy ledger's trust rests on)."""

    def __post_init__(self) -> None:
        hex_digits = isinstance(self.secret, str) and all(
            c in "0123456789abcdefABCDEF" for c in self.secret
        )
        if not hex_digits or len(self.secret) < 32:
            found = "non-hex characters" if not hex_digits else f"{len(self.secret)} digits"
            raise ConfigError(
                f"the sampling secret must be at least 32 hex digits (128 bits); found {found}. "
                "Draw one with new_sampling_secret()"
            )

    def size(self, population: int) -> int:
        size = getattr(self.inner, "size", None)
        return int(size(population)) if size is not None else population

    def expected_size(self, population: int) -> float:
        return self.inner.expected_size(population)

    def sample(self, round: int, client_ids: Sequence[str], *, seed: int) -> list[str]:
        return self.inner.sample(round, client_ids, seed=int(self.secret, 16))
