"""From the ``[privacy]`` section to the objects that carry it out: stage, sampler, mechanism,
and whether the participation sample is secret (what the reported epsilon rests on)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from consortium.config import ExperimentConfig
from consortium.errors import ConfigError
from consortium.privacy.accountant import RoundMechanism, calibrate_noise
from consortium.privacy.central import CentralDP, central_dp
from consortium.privacy.ledger import SIMULATED_SAMPLE, SampleTrust
from consortium.server.sampling import PoissonSampler, Sampler, UniformSampler

__all__ = [
    "DistributedPlan", "PrivacyPlan", "plan_central_dp", "plan_distributed_dp", "plan_sampler",
    "sample_trust",
]

_PRIVATE_ALGORITHMS = ("fedavg", "fedprox", "fedper", "fedrep", "fedbn")  # send the delta only


@dataclass(frozen=True)
class PrivacyPlan:
    stage: CentralDP
    sampler: Sampler
    mechanism: RoundMechanism


def _cohort(cfg: ExperimentConfig, population: int) -> tuple[int, float]:
    """Clients per round ``k`` and the sampling rate ``q`` that ``[sampling]`` asks for."""
    s = cfg.sampling
    k = s.clients_per_round or (math.ceil(s.fraction * population) if s.fraction else population)
    if k > population:
        raise ConfigError(
            f"sampling.clients_per_round = {k} but the data set has only {population} clients"
        )
    return k, s.fraction or k / population


def plan_sampler(cfg: ExperimentConfig, population: int) -> Sampler:
    """The sampler the experiment asks for: with central DP, the one its accountant composes
    (``privacy.sampling``); otherwise ``[sampling]``'s uniform draw.

    Raises:
        ConfigError: more clients per round than the population.
    """
    if cfg.privacy.mode == "distributed":
        return UniformSampler(count=_cohort(cfg, population)[0])
    if cfg.privacy.mode != "central":
        return UniformSampler(cfg.sampling.clients_per_round, cfg.sampling.fraction)
    k, rate = _cohort(cfg, population)
    return PoissonSampler(rate) if cfg.privacy.sampling == "poisson" else UniformSampler(count=k)


def sample_trust(cfg: ExperimentConfig, sampler: Sampler) -> SampleTrust:
    """Whether the sites cannot know who took part in a round, and why.

    Secret when the sampler draws from the server's own secret
    (:class:`~consortium.server.sampling.SecretSampler`), or in plain simulation, where the
    process is every party and the sample is modelled as the server's. Not secret when secure
    aggregation is on (its first phase sends every participant the round's cohort), or when
    the noise is real (``noise_source = "os"``, a deployment) but the sample still comes from
    the run seed that every site receives.
    """
    if cfg.secure_aggregation.enabled:
        return SampleTrust(
            False, "the sample is not secret: secure aggregation sends every participant the "
            "round's list of participants"
        )
    if getattr(sampler, "secret_from_sites", False):
        return SampleTrust(
            True, "the sample is drawn from the server's own 256-bit secret, kept in its "
            "checkpoint and never sent to the sites"
        )
    if cfg.privacy.noise_source == "os":
        return SampleTrust(
            False, "the sample is not secret: it is drawn from the run seed, which every site "
            "receives in the experiment's configuration"
        )
    return SIMULATED_SAMPLE


def plan_central_dp(cfg: ExperimentConfig, population: int) -> PrivacyPlan:
    """The DP-FedAvg stage, a sampler that matches the accountant, and the round mechanism.

    The cohort size comes from ``[sampling]``: with ``privacy.sampling = "poisson"`` each
    client joins with probability ``q = fraction`` (or ``clients_per_round / N``); with
    ``"fixed"`` exactly that many are drawn and the accountant treats it as sampling without
    replacement. With ``target_epsilon`` the noise multiplier is calibrated for ``rounds``.

    Raises:
        ConfigError: an algorithm whose extra messages DP-FedAvg does not protect, or an
            impossible sampling/accountant combination.
    """
    p = cfg.privacy
    _check_private_algorithm(cfg)
    k, rate = _cohort(cfg, population)
    sampler = plan_sampler(cfg, population)
    if p.sampling == "poisson":
        def mechanism(z: float) -> RoundMechanism:
            return RoundMechanism(z, "poisson", rate=rate)
    else:
        def mechanism(z: float) -> RoundMechanism:
            return RoundMechanism(z, "fixed", population=population, sample_size=k)

    z = p.noise_multiplier
    if p.target_epsilon > 0:
        m = mechanism(1.0)
        # under secure aggregation the participants learn the cohort: the reported epsilon is
        # the one without amplification, so that is the one to calibrate
        z = calibrate_noise(
            p.target_epsilon, p.delta, cfg.rounds, accountant=p.accountant, sampling=m.sampling,
            rate=m.rate, population=m.population, sample_size=m.sample_size,
            amplified=not cfg.secure_aggregation.enabled,
        )
    stage = central_dp(
        z, p.clip, adaptive=p.adaptive, target_quantile=p.target_quantile, clip_lr=p.clip_lr,
        count_stddev=p.count_stddev, noise_source=p.noise_source,
    )
    return PrivacyPlan(stage, sampler, mechanism(z))


@dataclass(frozen=True)
class DistributedPlan:
    stage: Any  # DistributedDP (imported lazily: keeps this module light)
    sampler: Sampler


def _check_private_algorithm(cfg: ExperimentConfig) -> None:
    if cfg.algorithm.name not in _PRIVATE_ALGORITHMS:
        raise ConfigError(
            f"DP protects the model update only; {cfg.algorithm.name!r} also sends "
            f"control variates or step counts in the clear. Use algorithm.name = "
            f"{' or '.join(repr(a) for a in _PRIVATE_ALGORITHMS)} with privacy.mode = "
            f"\"{cfg.privacy.mode}\""
        )


def distributed_stage(cfg: ExperimentConfig) -> Any:
    """The distributed-DP stage an experiment asks for: what the server and every site build
    from the same config (a site's noise scale comes from the config it approved)."""
    from consortium.privacy.distributed import distributed_dp

    p = cfg.privacy
    return distributed_dp(
        p.clip, expected_sites=cfg.sampling.clients_per_round,
        noise_multiplier=p.noise_multiplier, target_epsilon=p.target_epsilon, delta=p.delta,
        rounds=cfg.rounds,
    )


def plan_distributed_dp(cfg: ExperimentConfig, population: int, d: int) -> DistributedPlan:
    """Distributed DP (Kairouz et al. 2021) for a ``d``-parameter model: the stage and a
    fixed-size sampler of ``sampling.clients_per_round`` sites (the count the noise is split
    over).

    Raises:
        ConfigError: an algorithm with extra messages, more sites per round than the
            population, or a noise scale whose integer sum could wrap modulo 2**32.
    """
    from consortium.privacy.distributed import check_no_wrap

    _check_private_algorithm(cfg)
    k, _ = _cohort(cfg, population)
    stage = distributed_stage(cfg)
    check_no_wrap(k, stage.sigma(d), d)
    return DistributedPlan(stage, UniformSampler(count=k))
