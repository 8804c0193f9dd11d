"""The sums behind an analysis through SecAgg+: the server learns only their total across sites.

Each site flattens its phase-2 answer (:class:`~consortium.analytics.site.Answer`) in the order
the schema fixes (:func:`layout`), scales every value to a fixed-point integer at ``2**-40``
(counts stay exact; a sum of squares keeps ~12 decimal places) and writes each integer as
``LIMBS`` signed 16-bit digits, each taken modulo ``2**32``. SecAgg+ (Bell et al. 2020; the
protocol in :mod:`consortium.secagg.protocol`) sums the digit vectors modulo ``2**32``; a
digit's total over fewer than ``2**15`` sites cannot wrap, so the server reads it back as a
signed integer and recombines the digits into the exact total with Python integers. Splitting
into digits is our own because the masks live in 32-bit words while a fixed-point sum of
squares needs about 90 bits; no library offers this encoding for SecAgg.

What the server receives per site is only the masked vector (uniform modulo ``2**32`` to
anyone without the masks); the unmasked total is the only vector it can read.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from consortium.analytics.site import Answer
from consortium.errors import DataError

__all__ = ["LIMBS", "SCALE_BITS", "decode", "encode", "layout", "secure_total"]

SCALE_BITS = 40
LIMBS = 8  # 8 × 16 bits: |value| < 2**(128 − 40 − 1) ≈ 1.5e26
_BASE = 1 << 16
MODULUS_BITS = 32


def layout(answer: Answer) -> list[tuple[str, tuple[int, ...]]]:
    """The keys and shapes of an answer, in the order every site encodes them (sorted keys:
    the schema alone fixes which keys exist)."""
    return [(key, answer.values[key].shape) for key in sorted(answer.values)]


def encode(answer: Answer, keys: Sequence[tuple[str, tuple[int, ...]]]) -> torch.Tensor:
    """A site's answer as SecAgg+ input: int64 in ``[0, 2**32)``, ``LIMBS`` digits per value."""
    if any(w.any() for w in answer.withheld.values()):
        raise DataError(
            f"site {answer.site!r}: a securely aggregated answer withholds nothing itself (the "
            "total is checked); this answer was built for a query without secure aggregation"
        )
    flat = np.concatenate([answer.values[k].ravel() for k, _ in keys]) if keys else np.zeros(0)
    scaled = np.round(np.ldexp(flat, SCALE_BITS))
    if not np.all(np.abs(scaled) < 2.0 ** (16 * LIMBS - 1)):
        raise DataError(
            f"site {answer.site!r}: a sum is too large for secure aggregation's fixed point "
            f"(|value| ≥ 2^{16 * LIMBS - 1 - SCALE_BITS}); check the column's unit"
        )
    sign = np.sign(scaled)
    rest = np.abs(scaled)
    digits = np.empty((LIMBS, flat.size), dtype=np.int64)
    for j in range(LIMBS):  # exact: integer-valued floats divided by a power of two
        q = np.floor(rest / _BASE)
        digits[j] = (rest - q * _BASE).astype(np.int64)
        rest = q
    signed = digits * sign.astype(np.int64)
    return torch.from_numpy(np.mod(signed, 1 << MODULUS_BITS).T.reshape(-1).copy())


def decode(total: torch.Tensor, keys: Sequence[tuple[str, tuple[int, ...]]], sites: int) -> Answer:
    """The summed digit vector back to the total answer (exact integers, then ``2**-40``)."""
    if sites >= 1 << 15:
        raise DataError(f"secure analytics sums at most {2**15 - 1} sites at once, got {sites}")
    words = total.numpy().astype(np.int64).reshape(-1, LIMBS)
    half = 1 << (MODULUS_BITS - 1)
    signed = np.where(words >= half, words - (1 << MODULUS_BITS), words)
    out = Answer("(secure total)")
    values = [
        math.ldexp(sum(int(d) << (16 * j) for j, d in enumerate(row)), -SCALE_BITS)
        for row in signed.tolist()
    ]
    at = 0
    for key, shape in keys:
        size = int(np.prod(shape)) if shape else 1
        out.put(key, np.asarray(values[at:at + size], dtype=np.float64).reshape(shape))
        at += size
    return out


def secure_total(
    answers: Sequence[Answer], *, threshold: float = 0.5, neighbours: int = 0,
    context: bytes = b"consortium/analytics/v1",
) -> Answer:
    """Sum the sites' answers with SecAgg+ played in process (simulation): each site encodes
    its own answer; the server half sees masked vectors and recovers only the total.

    Raises:
        DataError: fewer than two sites (a total of one site is that site's value).
    """
    from consortium.secagg.messages import SecAggConfig
    from consortium.secagg.protocol import graph_degree, run_secagg_round

    n = len(answers)
    if n < 2:
        raise DataError(
            "secure aggregation needs at least 2 sites (the total of one site is its own "
            "value); run the analysis without secure_aggregation.enabled"
        )
    keys = layout(answers[0])
    for a in answers[1:]:
        if layout(a) != keys:
            raise DataError(f"site {a.site!r} answered a different layout than {answers[0].site!r}")
    inputs = {a.site: encode(a, keys) for a in answers}
    k = graph_degree(n, n - 1 if neighbours <= 0 else min(neighbours, n - 1))
    config = SecAggConfig(
        num_clients_expected=n, threshold=max(1, math.ceil(threshold * k)), neighbours=k,
        round=0, context=context, modulus_bits=MODULUS_BITS,
    )
    result = run_secagg_round(inputs, config=config)
    if len(result.contributors) != n:
        missing = sorted(set(inputs) - set(result.contributors))
        raise DataError(f"secure aggregation lost sites {missing}; the total would be partial")
    return decode(result.sum, keys, n)
