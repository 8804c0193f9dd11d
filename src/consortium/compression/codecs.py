"""Encoders: a dense float32 delta in, an :class:`~consortium.compression.encoded.Encoded` out.

Each is the client side of one published compressor; :func:`~consortium.compression.encoded.decode`
is the other side. The stochastic ones take ``uniform(n)`` (``n`` draws in ``[0, 1)``): in a
simulation from the client's seed, at a deployed site from its own CSPRNG.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from consortium.compression.encoded import Encoded, pack_codes, random_indices

__all__ = [
    "encode_cast",
    "encode_int",
    "encode_qsgd",
    "encode_randk",
    "encode_sign",
    "encode_topk",
    "keep_count",
]

Uniform = Callable[[int], torch.Tensor]


def encode_cast(v: torch.Tensor, kind: str) -> Encoded:
    """Half precision: ``"fp16"`` (IEEE binary16) or ``"bf16"`` (bfloat16), round to nearest.

    fp16 overflows beyond ±65504 (to inf, which the decoder refuses); bf16 keeps float32's range
    with 8 bits of mantissa.
    """
    dtype = torch.float16 if kind == "fp16" else torch.bfloat16
    return Encoded(kind, v.numel(), values=v.to(dtype))


def keep_count(size: int, fraction: float) -> int:
    """``k = max(1, round(fraction · d))`` coordinates kept by top-k / random-k."""
    return max(1, min(size, round(fraction * size)))


FP16_MAX = float(torch.finfo(torch.float16).max)


def encode_topk(
    v: torch.Tensor, fraction: float, *, values: str = "float32", indices: str = "int32"
) -> Encoded:
    """Top-k sparsification: the ``k`` coordinates of largest magnitude, indices sorted.

    Biased (it keeps only the largest), so it needs error feedback to converge at small ``k``
    (Stich, Cordonnier & Jaggi, "Sparsified SGD with memory", NeurIPS 2018).

    Args:
        v: the dense vector.
        fraction: ``k = keep_count(d, fraction)``.
        values: ``"float32"``, or ``"fp16"`` (IEEE binary16, round to nearest, clamped to
            ±65504 so that nothing overflows to inf; error feedback keeps the rounding).
        indices: ``"int32"`` (4 bytes each, kind ``topk``) or ``"rice"``: the gaps
            Golomb–Rice coded (:mod:`~consortium.compression.rice`, kind ``sparse``, header
            ``(k,)``; the parameter ``b = round(log2(d/k · ln 2))`` follows from ``d`` and
            ``k`` on both sides), about ``b + 1.5`` bits an index.
    """
    d = v.numel()
    k = keep_count(d, fraction)
    idx = torch.topk(v.abs(), k, sorted=False).indices.sort().values
    kept = v[idx].clone()
    if values == "fp16":
        kept = kept.clamp(-FP16_MAX, FP16_MAX).to(torch.float16)
    if indices == "rice":
        from consortium.compression.rice import encode_gaps, rice_parameter

        b = rice_parameter(d, k)
        codes = torch.from_numpy(encode_gaps(idx.numpy(), b))
        return Encoded("sparse", d, (k,), values=kept, codes=codes)
    return Encoded("topk", d, (k,), indices=idx.to(torch.int32), values=kept)


def encode_randk(v: torch.Tensor, fraction: float, seed: int) -> Encoded:
    """Random-k sparsification (Stich et al. 2018): ``k`` uniformly chosen coordinates, kept
    unscaled (a contraction, meant for error feedback). The indices are drawn from ``seed``,
    which travels in the header (8 bytes) instead of the ``4k`` bytes of the indices."""
    d = v.numel()
    k = keep_count(d, fraction)
    idx = random_indices(d, k, seed)
    return Encoded("randk", d, (k, int(seed)), values=v[idx].clone())


def _chunked(v: torch.Tensor, chunk: int) -> torch.Tensor:
    d = v.numel()
    n = -(-d // chunk)
    out = torch.zeros(n * chunk)
    out[:d] = v
    return out.reshape(n, chunk)


def encode_qsgd(v: torch.Tensor, *, bits: int, chunk: int, uniform: Uniform) -> Encoded:
    """QSGD (Alistarh, Grubic, Li, Tomioka & Vojnovic, "QSGD: Communication-efficient SGD via
    gradient quantization and encoding", NeurIPS 2017), with ``s = 2^bits − 1`` levels per
    bucket of ``chunk`` coordinates: ``Q(vᵢ) = ‖v‖ · sign(vᵢ) · ξᵢ / s`` where ``ξᵢ`` rounds
    ``s·|vᵢ|/‖v‖`` up or down at random so that ``E[Q(v)] = v``. Sent: one float32 norm per
    bucket and ``bits + 1`` bits per coordinate (level and sign), bit-packed. (The paper's
    Elias coding of the levels is left out: fixed-width codes keep the size exact in advance.)
    """
    d = v.numel()
    s = (1 << bits) - 1
    m = _chunked(v, chunk)
    norms = torch.linalg.vector_norm(m, dim=1)
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    r = (m.abs() / safe[:, None] * s).clamp(0, s)
    low = r.floor()
    u = _chunked(uniform(d), chunk)  # one draw a coordinate, none for the padding
    level = (low + (u < r - low).to(torch.float32)).clamp(0, s).to(torch.int64)
    negative = (m < 0).to(torch.int64)
    codes = (level << 1 | negative).reshape(-1)[:d]
    return Encoded("qsgd", d, (bits, chunk), codes=pack_codes(codes, bits + 1),
                   scales=norms.to(torch.float32))


def encode_int(v: torch.Tensor, *, bits: int, chunk: int, uniform: Uniform) -> Encoded:
    """Uniform ``bits``-bit quantisation with stochastic rounding (unbiased; e.g. Gupta et al.,
    "Deep learning with limited numerical precision", ICML 2015): per bucket of ``chunk``
    coordinates a step ``δ = max|v| / L`` with ``L = 2^(bits−1) − 1``, then ``q = ⌊v/δ⌋`` or
    ``⌊v/δ⌋ + 1`` with probability the fractional part, ``q ∈ [−L, L]`` sent as ``q + L`` in
    ``bits`` bits. ``bits = 2`` is ternary (−δ, 0, δ)."""
    d = v.numel()
    top = (1 << (bits - 1)) - 1
    m = _chunked(v, chunk)
    step = m.abs().amax(dim=1) / top
    safe = torch.where(step > 0, step, torch.ones_like(step))
    x = (m / safe[:, None]).clamp(-top, top)
    low = x.floor()
    u = _chunked(uniform(d), chunk)  # one draw a coordinate, none for the padding
    q = (low + (u < x - low).to(torch.float32)).clamp(-top, top).to(torch.int64)
    codes = (q + top).reshape(-1)[:d]
    return Encoded("int", d, (bits, chunk), codes=pack_codes(codes, bits),
                   scales=step.to(torch.float32))


def encode_sign(v: torch.Tensor) -> Encoded:
    """signSGD's compressor (Bernstein, Zhao, Azizzadenesheli & Anandkumar, "signSGD with
    majority vote is communication efficient and fault tolerant", ICLR 2019): one bit per
    coordinate, 1 for ``vᵢ ≥ 0`` (+1) and 0 for ``vᵢ < 0`` (−1)."""
    return Encoded("sign", v.numel(), codes=pack_codes((v >= 0).to(torch.int64), 1))
