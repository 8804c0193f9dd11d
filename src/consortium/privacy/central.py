"""Central (user-level) differential privacy: DP-FedAvg with fixed or adaptive clipping."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from consortium.aggregation.base import (
    Aggregate,
    ClientContext,
    ExtraSpec,
    RoundContext,
    StageState,
)
from consortium.errors import ConfigError
from consortium.seeds import derive_seed
from consortium.types import Layout, Update

__all__ = ["CentralDP", "central_dp", "update_noise_multiplier"]

_UNCLIPPED = "dp.unclipped"


def update_noise_multiplier(noise_multiplier: float, count_stddev: float) -> float:
    """Noise multiplier left for the updates when the clipping count also takes noise.

    Andrew, Thakkar, McMahan, Ramaswamy, "Differentially Private Learning with Adaptive
    Clipping", NeurIPS 2021, §3: releasing the count with noise ``σ_b`` and the updates with
    ``z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2)`` costs the same privacy as one Gaussian mechanism with
    multiplier ``z``.
    """
    rest = noise_multiplier**-2 - (2 * count_stddev) ** -2
    if rest <= 0:
        raise ConfigError(
            f"adaptive clipping: the count noise σ_b = {count_stddev:g} is too small for noise "
            f"multiplier {noise_multiplier:g} (need σ_b > z/2 = {noise_multiplier / 2:g}); "
            "set privacy.count_stddev above that, or raise privacy.noise_multiplier"
        )
    return rest**-0.5


@dataclass(frozen=True)
class CentralDP:
    """DP-FedAvg (McMahan, Ramage, Talwar, Zhang, ICLR 2018).

    Client half: clip the delta to L2 norm ``C``, send it with weight 1, and a centred bit
    ``b − ½`` where ``b`` says whether the delta was already within ``C``. Server half: add ``N(0, (z_Δ·C)²)`` to the
    *sum* of the clipped deltas and divide by the *expected* number of clients (never the
    realised count, which Poisson sampling makes private). With ``adaptive``, ``C`` follows
    the ``target_quantile`` of the update norms (Andrew et al. 2021):
    ``C ← C·exp(−clip_lr·(b̄ − target_quantile))``, where ``b̄`` is the noisy fraction of
    *unclipped* updates (noise ``count_stddev``, default ``max(expected clients / 20, z)``).

    The whole round is one Gaussian mechanism with multiplier ``noise_multiplier``; that is
    what the accountant composes. Noise is drawn from a generator seeded by (run seed,
    round), so a run can be repeated and resumed exactly (simulation). With ``noise_source =
    "os"`` (what ``consortium server`` uses) the noise comes from a CSPRNG keyed by the
    operating system and is the snapped Gaussian of
    :meth:`~consortium.privacy.randomness.SystemRandomness.snapped_gaussian`: nobody who knows
    the run seed can subtract it, and no floating-point noise is released (Mironov 2012); the
    accountant's noise multiplier is unchanged. Either way the server adds it: against the
    server itself central DP protects nothing (see the README's "Threat model").
    """

    noise_multiplier: float
    clip: float
    adaptive: bool = False
    target_quantile: float = 0.5
    clip_lr: float = 0.2
    count_stddev: float = 0.0
    noise_source: str = "seeded"
    name: str = "central_dp"
    needs: frozenset[str] = frozenset()
    gives: frozenset[str] = frozenset({"clipped", "central_dp"})
    needs_linear_aggregator: bool = True  # the noise is calibrated to a sum of clipped updates

    def init(self, layout: Layout) -> StageState:
        return {"clip": float(self.clip)}

    def broadcast(self, state: StageState) -> dict[str, Any]:
        return {"clip": float(state["clip"]), "noise_multiplier": self.noise_multiplier}

    def expected_extras(
        self, before: Mapping[str, ExtraSpec], layout: Layout
    ) -> dict[str, ExtraSpec]:
        """Adds the centred clipping bit, ``±½``: one site's bit outside ``[-½, ½]`` would
        move the noisy count, and so the next clip norm, beyond the sensitivity it is
        calibrated to (a bit of -1e6 overflowed ``exp`` in the review)."""
        return {**before, _UNCLIPPED: ExtraSpec((1,), low=-0.5, high=0.5)}

    def client(self, update: Update, payload: Mapping[str, Any], ctx: ClientContext) -> Update:
        clip = float(payload["clip"])
        norm = float(torch.linalg.vector_norm(update.delta))
        scale = min(1.0, clip / norm) if norm > 0 else 1.0
        extras = dict(update.extras)
        # centred bit b − ½: adding or removing a client moves the sum by at most ½, the
        # sensitivity under which the count costs (2σ_b)⁻² of the budget (Andrew et al. §3)
        extras[_UNCLIPPED] = torch.tensor([0.5 if norm <= clip else -0.5])
        return dataclasses.replace(
            update, delta=update.delta * scale, weight=1.0, extras=extras,
            metrics={**update.metrics, "update_norm": norm},
        )

    def receive(self, update: Update, state: StageState, ctx: RoundContext) -> Update:
        """The server's half of the client's promises, which a malicious site can skip.

        The noise is calibrated to a sum of updates of norm ≤ ``C`` with weight 1 and bits
        of ±½; a site that sends more moves the sum, or the next clip norm, further than the
        accountant assumes. So every update is re-clipped here (see
        :func:`~consortium.aggregation.clipping.enforce_norm`), its weight set to 1, and its
        bit checked against the delta that arrived: an honest site sends +½ with a delta
        shorter than ``C`` and −½ with one of norm ``C`` (both are possible only within float
        rounding of ``C``); any other bit (−1e6, NaN, a lie) is replaced by the one the delta
        implies. An honest update is passed through as the same object. Behind secure
        aggregation the server sees no values (an empty delta): nothing to check here, the
        secure-aggregation range bounds the site instead.
        """
        if update.delta.numel() == 0:
            return update
        from consortium.aggregation.clipping import SLACK, enforce_norm

        clip = float(state["clip"])
        delta, norm = enforce_norm(update.delta, clip)
        bit = update.extras.get(_UNCLIPPED)
        sent = float(bit.reshape(-1)[0]) if bit is not None and bit.numel() == 1 else math.nan
        allowed = {0.5} if norm < clip * (1 - SLACK) else {-0.5} if norm > clip * (1 + SLACK) else (
            {0.5, -0.5})
        if delta is update.delta and update.weight == 1.0 and sent in allowed:
            return update
        extras = dict(update.extras)
        if sent not in allowed:
            extras[_UNCLIPPED] = torch.tensor([0.5 if 0.5 in allowed else -0.5])
        return dataclasses.replace(update, delta=delta, weight=1.0, extras=extras)

    def count_noise(self, expected_clients: float) -> float:
        """``σ_b``: as set, or Andrew et al.'s ``m/20`` — but at least ``z``, so that small
        federations keep a valid split (at ``σ_b = z`` the updates get ``z_Δ ≈ 1.15 z``)."""
        return self.count_stddev or max(expected_clients / 20.0, self.noise_multiplier)

    def server(
        self, aggregate: Aggregate, state: StageState, ctx: RoundContext
    ) -> tuple[Aggregate, StageState]:
        clip = float(state["clip"])
        expected = ctx.expected
        sigma_b = self.count_noise(expected)
        z = update_noise_multiplier(self.noise_multiplier, sigma_b) if self.adaptive else (
            self.noise_multiplier
        )
        total = aggregate.delta.double() * aggregate.weight  # weights are 1: the sum
        rng = None
        if self.noise_source == "os":
            from consortium.privacy.randomness import SystemRandomness

            rng = SystemRandomness()
            noisy = rng.snapped_gaussian(total, sensitivity=clip, noise_multiplier=z)
        else:
            gen = torch.Generator().manual_seed(derive_seed(ctx.seed, "central_dp") % 2**63)
            noisy = total + torch.randn(total.shape, generator=gen, dtype=torch.float64) * (z * clip)
        delta = (noisy / expected).to(torch.float32)
        extras = {k: v for k, v in aggregate.extras.items() if k != _UNCLIPPED}
        info = {
            **aggregate.info, "dp_clip": clip, "dp_noise_multiplier": self.noise_multiplier,
            "dp_noise_stddev": z * clip / expected,
        }
        new_state = dict(state)
        if self.adaptive:
            centred = float(aggregate.extras[_UNCLIPPED][0])  # Σ (b_i − ½)
            if rng is not None:  # sensitivity ½ (one site's centred bit)
                noisy_count = float(rng.snapped_gaussian(
                    torch.tensor([centred], dtype=torch.float64), sensitivity=0.5,
                    noise_multiplier=sigma_b / 0.5,
                )[0])
            else:
                noisy_count = centred + float(
                    torch.randn((), generator=gen, dtype=torch.float64)) * sigma_b
            fraction = noisy_count / expected + 0.5
            new_state["clip"] = clip * math.exp(-self.clip_lr * (fraction - self.target_quantile))
            info["dp_unclipped_fraction"] = fraction
        out = Aggregate(delta, aggregate.weight, aggregate.count, extras, info)
        return out, new_state


def central_dp(
    noise_multiplier: float,
    clip: float,
    *,
    adaptive: bool = False,
    target_quantile: float = 0.5,
    clip_lr: float = 0.2,
    count_stddev: float = 0.0,
    noise_source: str = "seeded",
) -> CentralDP:
    """Central DP-FedAvg as one pipeline stage (see :class:`CentralDP`).

    Raises:
        ConfigError: a non-positive noise multiplier or clip norm, or a quantile outside (0, 1).
    """
    if not noise_multiplier > 0:
        raise ConfigError(f"privacy.noise_multiplier = {noise_multiplier} must be > 0")
    if not clip > 0:
        raise ConfigError(f"privacy.clip = {clip} must be > 0")
    if not 0 < target_quantile < 1:
        raise ConfigError(f"privacy.target_quantile = {target_quantile} must be in (0, 1)")
    if not clip_lr > 0:
        raise ConfigError(f"privacy.clip_lr = {clip_lr} must be > 0")
    if count_stddev < 0:
        raise ConfigError(f"privacy.count_stddev = {count_stddev} must be >= 0 (0 = clients/20)")
    if noise_source not in ("seeded", "os"):
        raise ConfigError(f'privacy.noise_source = {noise_source!r}: expected "seeded" or "os"')
    return CentralDP(
        noise_multiplier, clip, adaptive, target_quantile, clip_lr, count_stddev, noise_source
    )
