"""Secure aggregation in the pipeline: a client stage that quantises, an aggregator that sums
through the SecAgg+ protocol (Bell et al. 2020) and sees only the sum."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from consortium.aggregation.base import Aggregate, ClientContext, RoundContext, StageState
from consortium.errors import PipelineError
from consortium.seeds import derive_seed
from consortium.types import Layout, Update

__all__ = ["SecureAggregation", "SecureSum", "secure_aggregation"]

MODULUS_BITS = 32


@dataclass(frozen=True)
class SecureAggregation:
    """Client half of secure aggregation: encode ``[w·Δ, extras, w] / weight_bound`` and
    quantise it (clip range ``clip``, ``bits`` bits, stochastic rounding) for the ring.

    FedAvg's weighted mean survives: the server recovers ``Σ w·Δ`` and ``Σ w`` from the sum and
    divides. Extras (sums by contract) travel in the same vector, so central DP's clipping
    count is summed securely too. Values beyond ``clip · weight_bound`` are clipped; the
    ``secagg_clipped`` metric counts them.
    """

    clip: float = 1.0
    bits: int = 16
    weight_bound: float = 1000.0
    name: str = "secure_aggregation"
    needs: frozenset[str] = frozenset()
    gives: frozenset[str] = frozenset({"sum_only", "quantized"})

    def init(self, layout: Layout) -> StageState:
        return {}

    def client(self, update: Update, payload: Mapping[str, Any], ctx: ClientContext) -> Update:
        from consortium.secagg.quantize import quantize

        names = sorted(update.extras)
        parts = [update.delta.double() * update.weight]
        parts += [update.extras[n].double().reshape(-1) for n in names]
        parts.append(torch.tensor([update.weight], dtype=torch.float64))
        x = torch.cat(parts) / self.weight_bound
        gen = torch.Generator().manual_seed(derive_seed(ctx.seed, "secagg-quantise") % 2**63)
        q = quantize(x, clip=self.clip, bits=self.bits, generator=gen)
        clipped = float((x.abs() > self.clip).sum())
        # Only shapes of the extras travel in the clear; their values are inside ``q``.
        shapes = {n: torch.zeros(update.extras[n].numel()) for n in names}
        return Update(
            update.client_id, q.to(torch.float64), 0.0,
            metrics={**update.metrics, "secagg_clipped": clipped}, extras=shapes,
        )


@dataclass(frozen=True)
class SecureSum:
    """Sums the quantised vectors with the SecAgg+ protocol and decodes the weighted mean.

    In simulation every protocol phase runs in this process with the real cryptography
    (``run_secagg_round``); the server-side arithmetic only ever touches masked vectors and the
    unmasked sum. ``threshold`` is the fraction of a client's ``neighbours`` needed to recover
    its secrets (``neighbours = 0``: every other client, i.e. full SecAgg).
    """

    clip: float = 1.0
    bits: int = 16
    weight_bound: float = 1000.0
    threshold: float = 0.5
    neighbours: int = 0
    name: str = "secure_sum"
    needs: frozenset[str] = frozenset({"quantized"})

    def aggregate(self, updates: list[Update], *, ctx: RoundContext) -> Aggregate:
        from consortium.secagg.protocol import SecAggConfig, run_secagg_round
        from consortium.secagg.quantize import dequantize_sum

        n = len(updates)
        if n < 2:
            raise PipelineError(
                f"secure aggregation needs at least 2 clients in a round, got {n}; raise "
                "sampling.clients_per_round"
            )
        k = n - 1 if self.neighbours <= 0 else min(self.neighbours, n - 1)
        config = SecAggConfig(
            num_clients_expected=n, threshold=max(1, math.ceil(self.threshold * k)), neighbours=k,
            round=ctx.round, context=b"consortium", modulus_bits=MODULUS_BITS,
        )
        inputs = {u.client_id: u.delta.to(torch.int64) for u in updates}
        seed = derive_seed(ctx.seed, "secagg-graph").to_bytes(8, "big")
        result = run_secagg_round(inputs, config=config, graph_seed=seed)
        total = dequantize_sum(
            result.sum, count=len(result.contributors), clip=self.clip, bits=self.bits,
            modulus=2**MODULUS_BITS,
        ) * self.weight_bound
        d = ctx.layout.size
        weight = float(total[-1])
        extras, offset = {}, d
        for name in sorted(updates[0].extras):
            size = updates[0].extras[name].numel()
            extras[name] = total[offset : offset + size].to(torch.float32)
            offset += size
        if weight <= 0:
            raise PipelineError("the securely summed weight is not positive; raise weight_bound")
        return Aggregate(
            (total[:d] / weight).to(torch.float32), weight, len(result.contributors), extras,
            info={"secagg_clients": len(result.contributors)},
        )


def secure_aggregation(
    *, clip: float = 1.0, bits: int = 16, weight_bound: float = 1000.0, threshold: float = 0.5,
    neighbours: int = 0,
) -> tuple[SecureAggregation, SecureSum]:
    """The stage and the aggregator of secure aggregation, to put in a pipeline together."""
    if not clip > 0 or not weight_bound > 0:
        raise PipelineError("secure aggregation needs clip > 0 and weight_bound > 0")
    if not 0 < threshold <= 1:
        raise PipelineError(f"secure aggregation threshold = {threshold} must be in (0, 1]")
    if not 2 <= bits <= 24:
        raise PipelineError(f"secure aggregation bits = {bits} must be in [2, 24]")
    return (
        SecureAggregation(clip, bits, weight_bound),
        SecureSum(clip, bits, weight_bound, threshold, neighbours),
    )
