"""Privacy accounting with Google's ``dp-accounting`` (RDP and PLD), and noise calibration.

Every epsilon consortium reports comes from here, and everything here delegates to
``dp_accounting``: no home-made formula. One *round* of central DP is one sampled Gaussian
mechanism: ``PoissonSampledDpEvent(q, GaussianDpEvent(z))`` for Poisson sampling, or
``SampledWithoutReplacementDpEvent(N, k, GaussianDpEvent(z))`` for a fixed cohort of k of N.
Without amplification by sampling (:func:`epsilon_without_sampling`, for anyone who knows who
took part) the round is the bare ``GaussianDpEvent(z)`` under the same neighbouring relation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from consortium.errors import ConfigError, MissingExtraError

__all__ = ["ACCOUNTANTS", "RoundMechanism", "calibrate_noise", "epsilon", "epsilon_without_sampling"]

ACCOUNTANTS = ("rdp", "pld")
Sampling = Literal["poisson", "fixed"]


def _dp():  # type: ignore[no-untyped-def]
    try:
        import dp_accounting
    except ImportError as exc:  # pragma: no cover - a core dependency
        raise MissingExtraError("privacy accounting", "privacy", "dp-accounting") from exc
    # RDP orders that do not converge are dropped by dp-accounting with an absl warning per
    # order; the epsilon is still a valid bound, so keep the terminal quiet.
    logging.getLogger("absl").setLevel(logging.ERROR)
    return dp_accounting


@dataclass(frozen=True)
class RoundMechanism:
    """One round's release: Gaussian noise ``z`` on a sum of clipped contributions, with the
    cohort drawn by Poisson sampling (rate ``q``) or as a fixed ``k`` of ``population``.

    Neighbouring data sets: add/remove one client for Poisson sampling; replace one client
    for fixed-size sampling (the relation under which ``dp-accounting`` accounts sampling
    without replacement).
    """

    noise_multiplier: float
    sampling: Sampling = "poisson"
    rate: float = 1.0
    population: int = 0
    sample_size: int = 0

    def __post_init__(self) -> None:
        if not self.noise_multiplier > 0:
            raise ConfigError(
                f"privacy.noise_multiplier = {self.noise_multiplier} must be > 0 for a DP guarantee"
            )
        if self.sampling == "poisson":
            if not 0 < self.rate <= 1:
                raise ConfigError(f"the Poisson sampling rate must be in (0, 1], found {self.rate}")
        elif self.sampling == "fixed":
            if not 0 < self.sample_size <= self.population:
                raise ConfigError(
                    f"fixed-size sampling needs 0 < clients per round <= population, found "
                    f"{self.sample_size} of {self.population}"
                )
        else:
            raise ConfigError(f"privacy.sampling = {self.sampling!r}; expected 'poisson' or 'fixed'")

    def event(self):  # type: ignore[no-untyped-def]
        dp = _dp()
        gaussian = dp.GaussianDpEvent(self.noise_multiplier)
        if self.sampling == "poisson":
            return dp.PoissonSampledDpEvent(self.rate, gaussian)
        return dp.SampledWithoutReplacementDpEvent(self.population, self.sample_size, gaussian)

    def unsampled_event(self):  # type: ignore[no-untyped-def]
        """The round as seen by someone who knows the cohort: the Gaussian alone, which the
        client's update either went into (no amplification) or did not (nothing spent)."""
        return _dp().GaussianDpEvent(self.noise_multiplier)

    def relation(self):  # type: ignore[no-untyped-def]
        rel = _dp().NeighboringRelation
        return rel.ADD_OR_REMOVE_ONE if self.sampling == "poisson" else rel.REPLACE_ONE


# The bare Gaussian's privacy loss spans hundreds of nats after many rounds, and the PLD grid
# spans it at this interval: dp-accounting's default 1e-4 took 17 s for 1,000 rounds, 1e-2
# takes 0.1 s and moved epsilon by < 1e-7 relative (the estimate stays an upper bound).
_UNSAMPLED_PLD_INTERVAL = 1e-2


def _accountant(kind: str, mechanism: RoundMechanism, *, grid: float | None = None):  # type: ignore[no-untyped-def]
    dp = _dp()
    if kind == "rdp":
        return dp.rdp.RdpAccountant(neighboring_relation=mechanism.relation())
    if kind == "pld":
        if mechanism.sampling != "poisson":
            raise ConfigError(
                "the PLD accountant supports Poisson sampling only; set privacy.sampling = "
                '"poisson" or privacy.accountant = "rdp"'
            )
        if grid is not None:
            return dp.pld.PLDAccountant(
                neighboring_relation=mechanism.relation(), value_discretization_interval=grid
            )
        return dp.pld.PLDAccountant(neighboring_relation=mechanism.relation())
    raise ConfigError(f"privacy.accountant = {kind!r} is not known; expected one of {ACCOUNTANTS}")


@lru_cache(maxsize=4096)
def epsilon(mechanism: RoundMechanism, rounds: int, delta: float, accountant: str = "rdp") -> float:
    """Epsilon at ``delta`` after ``rounds`` releases of ``mechanism`` (0 rounds → 0)."""
    if not 0 < delta < 1:
        raise ConfigError(f"privacy.delta = {delta} must be in (0, 1)")
    if rounds <= 0:
        return 0.0
    acc = _accountant(accountant, mechanism)
    acc.compose(mechanism.event(), rounds)
    return float(acc.get_epsilon(delta))


@lru_cache(maxsize=4096)
def epsilon_without_sampling(
    mechanism: RoundMechanism, rounds: int, delta: float, accountant: str = "rdp"
) -> float:
    """Epsilon at ``delta`` after ``rounds`` releases of ``mechanism`` in which the client's
    update went in every time: amplification by sampling dropped (0 rounds → 0).

    The guarantee against anyone who knows who took part (the server; whoever reads a list
    of participants): sampling amplifies only a sample the adversary cannot see (Balle et al.
    2018, "Privacy Amplification by Subsampling"). With ``rounds`` = every round of the run it
    holds whatever the sample was; with the rounds one client actually took part in, it is
    that client's loss given the (data-independent) sample.
    """
    if not 0 < delta < 1:
        raise ConfigError(f"privacy.delta = {delta} must be in (0, 1)")
    if rounds <= 0:
        return 0.0
    acc = _accountant(accountant, mechanism, grid=_UNSAMPLED_PLD_INTERVAL)
    acc.compose(mechanism.unsampled_event(), rounds)
    return float(acc.get_epsilon(delta))


def calibrate_noise(
    target_epsilon: float,
    delta: float,
    rounds: int,
    *,
    accountant: str = "rdp",
    sampling: Sampling = "poisson",
    rate: float = 1.0,
    population: int = 0,
    sample_size: int = 0,
    amplified: bool = True,
) -> float:
    """The smallest noise multiplier whose epsilon after ``rounds`` is at most the target
    (``dp_accounting.calibrate_dp_mechanism``, bisection to a relative tolerance of 1e-4).

    ``amplified = False`` calibrates the figure without amplification by sampling (what a run
    whose sample is not secret reports, see :func:`epsilon_without_sampling`)."""
    if not target_epsilon > 0:
        raise ConfigError(f"privacy.target_epsilon = {target_epsilon} must be > 0")
    if rounds < 1:
        raise ConfigError(f"calibration needs rounds >= 1, found {rounds}")
    dp = _dp()

    def mechanism(z: float) -> RoundMechanism:
        return RoundMechanism(z, sampling, rate, population, sample_size)

    probe = mechanism(1.0)
    _accountant(accountant, probe)  # fail early on impossible combinations

    def event(z: float):  # type: ignore[no-untyped-def]
        m = mechanism(z)
        return dp.SelfComposedDpEvent(m.event() if amplified else m.unsampled_event(), rounds)

    measure = epsilon if amplified else epsilon_without_sampling
    lowest = 0.3  # below this the PLD grid explodes, and no FL deployment uses less noise
    if measure(mechanism(lowest), rounds, delta, accountant) <= target_epsilon:
        raise ConfigError(
            f"target epsilon {target_epsilon} is reached with a noise multiplier below {lowest}; "
            "set privacy.noise_multiplier directly instead of calibrating"
        )
    z = dp.calibrate_dp_mechanism(
        lambda: _accountant(accountant, probe),
        event,
        target_epsilon,
        delta,
        bracket_interval=dp.LowerEndpointAndGuess(lowest, 1.0),
        tol=1e-4,
    )
    return float(z)
