"""Distributed DP: each site adds its own discrete Gaussian noise before secure aggregation.

Kairouz, Liu & Steinke, "The Distributed Discrete Gaussian Mechanism for Federated Learning
with Secure Aggregation", ICML 2021 (arXiv 2102.06387). Each site clips its delta to L2 norm
``C``, rounds it to a grid of step ``γ``, adds ``N_Z(0, σ²)`` per coordinate from its *own*
randomness and hands the integers to secure aggregation, which sums them modulo 2**32; the
server only ever unmasks a noised sum. Against the server this holds as long as the sites
whose noise the guarantee counts on added it.

The grid is ``γ = C / (1024·√d)`` (as :func:`~consortium.privacy.randomness.snap_grid`) with
deterministic rounding, so one site moves the integer sum by at most ``Δ = C/γ + √d`` in L2
(grid units). With ``n`` sites each adding scale ``σ``, the total noise has variance about
``n·σ²``; ``σ`` is chosen so that ``n_min·σ² = (z·Δ)²``.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from consortium.aggregation.base import Aggregate, ClientContext, RoundContext, StageState
from consortium.errors import ConfigError, PipelineError
from consortium.seeds import derive_seed
from consortium.types import Layout, Update

__all__ = [
    "INTEGER_SUM",
    "DistributedDP",
    "DistributedLedger",
    "calibrate_distributed",
    "distributed_dp",
    "distributed_epsilon",
    "grid",
    "rho",
    "sensitivity",
    "site_sigma",
    "tau",
]

INTEGER_SUM = "secagg.integer_sum"
"""The extra in which secure aggregation's integer mode hands the exact decoded sum (int64)."""

_GRID_FRACTION = 1024
_MODULUS_BITS = 32
# Standard deviations of the summed noise kept inside the modulus: the chance that one
# coordinate wraps is below 2·exp(-10²/2) ≈ 4e-22.
_WRAP_STDDEVS = 10.0

TRUST = (
    "distributed DP: each site adds its own noise before secure aggregation; holds against "
    "the server and the other sites provided at least the counted sites added their noise "
    "(a site that withholds its noise weakens everyone's guarantee)",
    "the sample is not secret under secure aggregation (every participant learns the round's "
    "cohort), so epsilon is not amplified by sampling",
    "each round is accounted with the number of sites the server actually unmasked "
    "(secagg_clients): fewer contributors mean less noise and a larger epsilon, reported as such",
)


def grid(clip: float, d: int) -> float:
    """The grid step ``γ = C / (1024·√d)`` a site rounds its clipped delta to."""
    return clip / (_GRID_FRACTION * math.sqrt(d))


def sensitivity(d: int) -> float:
    """``Δ = C/γ + √d = 1025·√d``: how far one site moves the integer sum in L2 (grid units),
    deterministic rounding included (each coordinate moves by at most ½, counted as 1)."""
    return (_GRID_FRACTION + 1) * math.sqrt(d)


def site_sigma(noise_multiplier: float, sites: int, d: int) -> float:
    """The scale of each site's discrete Gaussian (grid units): ``z·Δ / √n_min``, so that
    ``n_min`` sites' noise together has variance ``(z·Δ)²``."""
    return noise_multiplier * sensitivity(d) / math.sqrt(sites)


def tau(sigma: float, n: int) -> float:
    """``τ = 10·Σ_{k=1}^{n−1} exp(−2π²σ²·k/(k+1))`` (Kairouz et al. 2021, Theorem 1): how far
    the sum of ``n`` discrete Gaussians of scale ``σ`` is from a discrete Gaussian."""
    return 10.0 * sum(math.exp(-2 * math.pi**2 * sigma**2 * k / (k + 1)) for k in range(1, n))


def rho(sigma: float, n: int, d: int, l2_sensitivity: float | None = None) -> float:
    """The zCDP ``ρ`` of one release of ``Σᵢ (xᵢ + Yᵢ)`` with ``Yᵢ ~ N_Z(0, σ²)^d`` from ``n``
    sites and L2 sensitivity ``Δ`` (default :func:`sensitivity`).

    Kairouz, Liu & Steinke 2021, Theorem 1 with Proposition 14 (Eq. 17): the mechanism's
    Rényi divergence of order ``α ≥ 1`` is at most
    ``min(α·Δ²/(2nσ²) + τ·d, (α/2)·(Δ/(√n·σ) + τ·√d)²)``. Both are at most ``α·ρ`` with
    ``ρ = min(Δ²/(2nσ²) + τ·d, ½·(Δ/(√n·σ) + τ·√d)²)`` (the first because ``τ·d ≤ α·τ·d``),
    i.e. ``ρ``-zCDP, which is the RDP curve of a Gaussian mechanism with noise multiplier
    ``1/√(2ρ)``. The L1 term of Proposition 14 is left out (it only lowers ``ρ``).

    Raises:
        ValueError: ``n < 1``, ``d < 1`` or ``σ`` not positive.
    """
    if n < 1 or d < 1 or not sigma > 0:
        raise ValueError(f"expected n >= 1, d >= 1 and sigma > 0, found {n}, {d}, {sigma}")
    delta2 = sensitivity(d) if l2_sensitivity is None else l2_sensitivity
    t = tau(sigma, n)
    scale = delta2 / (math.sqrt(n) * sigma)
    return min(scale**2 / 2 + t * d, 0.5 * (scale + t * math.sqrt(d)) ** 2)


def distributed_epsilon(rhos: Mapping[float, int] | list[float], delta: float) -> float:
    """Epsilon at ``delta`` of rounds of ``ρ``-zCDP: ``GaussianDpEvent(1/√(2ρ))`` per round,
    composed with dp-accounting's ``RdpAccountant`` (add/remove one site, no sampling).
    ``rhos`` maps a round's ``ρ`` to how many rounds had it (or lists them)."""
    counts = Counter(rhos) if isinstance(rhos, list) else Counter(dict(rhos))
    if not counts:
        return 0.0
    return _epsilon_cached(tuple(sorted(counts.items())), float(delta))


@lru_cache(maxsize=1024)
def _epsilon_cached(rounds: tuple[tuple[float, int], ...], delta: float) -> float:
    from consortium.privacy.accountant import _dp

    dp = _dp()
    acc = dp.rdp.RdpAccountant()
    for r, count in rounds:
        if count > 0:
            acc.compose(dp.GaussianDpEvent(1.0 / math.sqrt(2.0 * r)), count)
    return float(acc.get_epsilon(delta))


@lru_cache(maxsize=64)
def calibrate_distributed(
    target_epsilon: float, delta: float, rounds: int, sites: int, d: int
) -> float:
    """The smallest noise multiplier ``z`` (to a relative 1e-4) whose distributed-DP epsilon
    after ``rounds`` rounds of ``sites`` contributors is at most ``target_epsilon``.

    Raises:
        ConfigError: the target is met with ``z`` below 0.3 or needs more than 1e4.
    """
    def eps(z: float) -> float:
        return distributed_epsilon({rho(site_sigma(z, sites, d), sites, d): rounds}, delta)

    lo, hi = 0.3, 1e4
    if eps(lo) <= target_epsilon:
        raise ConfigError(
            f"target epsilon {target_epsilon} is reached with a noise multiplier below {lo}; "
            "set privacy.noise_multiplier directly instead of calibrating"
        )
    if eps(hi) > target_epsilon:
        raise ConfigError(f"target epsilon {target_epsilon} needs a noise multiplier above {hi}")
    while hi / lo > 1 + 1e-4:
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if eps(mid) <= target_epsilon else (mid, hi)
    return hi


def check_no_wrap(sites: int, sigma: float, d: int) -> None:
    """Refuse settings whose integer sum could wrap modulo 2**32: ``sites`` clipped, rounded
    inputs (``|xᵢ/γ| ≤ 1024·√d + ½`` per coordinate) plus ten standard deviations of the summed
    noise must stay below 2**31 (the sum is decoded centred).

    Raises:
        ConfigError: they do not.
    """
    bound = sites * (_GRID_FRACTION * math.sqrt(d) + 0.5) + _WRAP_STDDEVS * sigma * math.sqrt(sites)
    if bound >= 2 ** (_MODULUS_BITS - 1):
        raise ConfigError(
            f"distributed DP: {sites} sites with noise scale {sigma:.4g} (grid units) on a "
            f"{d}-parameter model could reach {bound:.4g} >= 2**31 in one coordinate and wrap "
            "modulo 2**32; lower privacy.noise_multiplier (or raise target_epsilon), or use fewer "
            "clients per round"
        )


@dataclass(frozen=True)
class DistributedDP:
    """The distributed discrete Gaussian mechanism as a stage (Kairouz et al. 2021).

    Client half: clip the delta to ``clip``, round ``Δ/γ`` to integers, add ``N_Z(0, σ²)`` per
    coordinate with ``σ = site_sigma(z, expected_sites, d)``, and send the integers (as an
    exact float64 delta) with weight 1 to secure aggregation's integer mode. The noise comes
    from the site's own CSPRNG (``ctx.site.randomness``) when it has one, else from a
    :class:`~consortium.privacy.randomness.SeededRandomness` keyed by the client's seed
    (simulation: reproducible). ``z`` is ``noise_multiplier`` or, when that is 0, calibrated
    from ``target_epsilon`` over ``rounds`` (the same at the server and every site, since
    they read the same approved config). Server half: the exact integer sum times ``γ``,
    divided by ``expected_sites`` (DP-FedAvg's fixed denominator).
    """

    noise_multiplier: float
    clip: float
    expected_sites: int
    target_epsilon: float = 0.0
    delta: float = 1e-5
    rounds: int = 1
    name: str = "distributed_dp"
    needs: frozenset[str] = frozenset()
    gives: frozenset[str] = frozenset({"clipped", "distributed_dp"})
    needs_linear_aggregator: bool = True

    def multiplier(self, d: int) -> float:
        """``z``: as set, or calibrated for a ``d``-parameter model."""
        if self.noise_multiplier > 0:
            return self.noise_multiplier
        return calibrate_distributed(
            self.target_epsilon, self.delta, self.rounds, self.expected_sites, d
        )

    def sigma(self, d: int) -> float:
        """Each site's noise scale in grid units."""
        return site_sigma(self.multiplier(d), self.expected_sites, d)

    def own_noise_multiplier(self, d: int) -> float:
        """The noise multiplier of this site's own noise alone (``z / sqrt(expected_sites)``):
        what a site can count on without trusting any other site to add theirs."""
        return self.sigma(d) / sensitivity(d)

    def init(self, layout: Layout) -> StageState:
        return {}

    def client(self, update: Update, payload: Mapping[str, Any], ctx: ClientContext) -> Update:
        d = update.delta.numel()
        delta = update.delta.double()
        norm = float(torch.linalg.vector_norm(delta))
        scale = min(1.0, self.clip / norm) if norm > 0 else 1.0
        ints = torch.round(delta * (scale / grid(self.clip, d))).to(torch.int64)
        randomness = getattr(ctx.site, "randomness", None) if ctx.site is not None else None
        if randomness is None:  # simulation: reproducible from (run seed, round, client)
            from consortium.privacy.randomness import SeededRandomness

            randomness = SeededRandomness(derive_seed(ctx.seed, "distributed-dp"))
        noisy = ints + randomness.discrete_gaussian(d, self.sigma(d)).to(torch.int64)
        return dataclasses.replace(
            update, delta=noisy.to(torch.float64), weight=1.0,
            metrics={**update.metrics, "update_norm": norm},
        )

    def server(
        self, aggregate: Aggregate, state: StageState, ctx: RoundContext
    ) -> tuple[Aggregate, StageState]:
        total = aggregate.extras.get(INTEGER_SUM)
        if total is None:
            raise PipelineError(
                "distributed DP needs secure aggregation's exact integer sum; put the "
                "secure_aggregation(integer=True) stage after it"
            )
        d = ctx.layout.size
        gamma = grid(self.clip, d)
        summed = total.to(torch.float64) * gamma
        extras = {k: v for k, v in aggregate.extras.items() if k != INTEGER_SUM}
        z = self.multiplier(d)
        info = {
            **aggregate.info, "dp_clip": self.clip, "dp_noise_multiplier": z,
            "dp_grid": gamma, "dp_site_sigma": self.sigma(d),
        }
        out = Aggregate(
            (summed / self.expected_sites).to(torch.float32), aggregate.weight, aggregate.count,
            extras, info,
        )
        return out, state


def distributed_dp(
    clip: float, *, expected_sites: int, noise_multiplier: float = 0.0,
    target_epsilon: float = 0.0, delta: float = 1e-5, rounds: int = 1,
) -> DistributedDP:
    """Distributed DP as one pipeline stage (see :class:`DistributedDP`).

    Raises:
        ConfigError: a non-positive clip or site count, or not exactly one of
            ``noise_multiplier`` and ``target_epsilon``.
    """
    if not clip > 0:
        raise ConfigError(f"privacy.clip = {clip} must be > 0")
    if expected_sites < 1:
        raise ConfigError(f"distributed DP needs at least one site per round, found {expected_sites}")
    if not (noise_multiplier > 0) ^ (target_epsilon > 0):
        raise ConfigError(
            "distributed DP needs exactly one of privacy.noise_multiplier or "
            "privacy.target_epsilon"
        )
    return DistributedDP(noise_multiplier, clip, expected_sites, target_epsilon, delta, rounds)


class DistributedLedger:
    """A callback that accounts each round of distributed DP and writes ``privacy.json``.

    A round's ``ρ`` is :func:`rho` with the sites' scale ``σ`` and the number of sites the
    server actually unmasked (the round record's ``secagg_clients``), which is at most the
    expected cohort: dropouts or a smaller cohort cost more, and the ledger says so. Rounds
    compose as ``GaussianDpEvent(1/√(2ρ))`` under dp-accounting's RDP accountant, without
    amplification by sampling (the cohort is not secret under secure aggregation).
    """

    def __init__(
        self, stage: DistributedDP, d: int, *, delta: float, path: str | Path | None = None
    ) -> None:
        self.stage = stage
        self.d = d
        self.sigma = stage.sigma(d)
        self.delta = delta
        self.path = Path(path) if path is not None else None
        self.entries: list[dict[str, Any]] = []

    def round_rho(self, contributors: int) -> float:
        return rho(self.sigma, contributors, self.d)

    def epsilon(self) -> float:
        return distributed_epsilon([e["rho"] for e in self.entries if e["rho"] > 0], self.delta)

    def resume(self, round: int) -> None:
        import json

        if self.path is not None and self.path.exists():
            data = json.loads(self.path.read_text(encoding="utf-8"))
            self.entries = [e for e in data.get("releases", []) if e["round"] <= round]
            self._write()

    def before_record(self, record: dict[str, Any], state: Any) -> None:
        n = int(record.get("secagg_clients") or 0)
        self.entries.append({
            "round": int(record["round"]),
            "mechanism": "distributed discrete gaussian",
            "noise_multiplier": self.stage.multiplier(self.d),
            "site_sigma": self.sigma,
            "grid": grid(self.stage.clip, self.d),
            "contributors": n,
            "expected_sites": self.stage.expected_sites,
            "rho": self.round_rho(n) if n > 0 else 0.0,
            "sites": list(getattr(state, "participants", [])),
        })
        record["epsilon"] = self.entries[-1]["epsilon"] = self.epsilon()
        self._write()

    def summary(self) -> dict[str, Any]:
        return {
            **self._totals(),
            "mechanism": "distributed discrete gaussian",
            "noise_multiplier": self.stage.multiplier(self.d),
            "site_sigma": self.sigma,
            "expected_sites": self.stage.expected_sites,
        }

    def _totals(self) -> dict[str, Any]:
        eps = self.epsilon()
        return {
            "epsilon": eps, "delta": self.delta, "accountant": "rdp", "sample_secret": False,
            "epsilon_without_sampling": eps, "trust": list(TRUST),
        }

    def _write(self) -> None:
        from consortium.privacy.ledger import write_ledger

        write_ledger(self.path, "rdp", self.delta, "add/remove one site", self.entries,
                     self._totals())
