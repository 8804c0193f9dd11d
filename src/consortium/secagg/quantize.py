"""Quantisation of float updates to integers for masking, and recovery of their float sum.

Secure aggregation adds masked integers modulo ``2^b`` (Bonawitz et al. 2017; Bell et al. 2020,
SecAgg+), so each client maps its update to ``{0, ..., 2^bits - 1}`` first: clip every coordinate
to ``[-clip, clip]``, shift and scale by ``step = 2 * clip / (2^bits - 1)``, and round
stochastically (up with probability equal to the fractional part), which makes the integer an
unbiased estimate of the scaled value.

Error bound. For ``count`` clients, every coordinate of the dequantised sum differs from the sum
of the *clipped* inputs by strictly less than ``count * step`` (each client's rounding moves it by
less than one step), and its expectation over the rounding equals that sum exactly (unbiased).
Clipping itself is not part of the bound: choose ``clip`` so that it rarely binds.
"""

from __future__ import annotations

import torch

__all__ = [
    "MAX_BITS",
    "dequantize_sum",
    "quantization_error_bound",
    "quantization_step",
    "quantize",
]

# float64 represents integers up to 2**53 exactly; 52 bits keep the scaled values exact.
MAX_BITS = 52


def quantization_step(*, clip: float, bits: int) -> float:
    """The width of one quantisation level: ``2 * clip / (2**bits - 1)``.

    Raises:
        ValueError: ``clip`` not positive and finite, or ``bits`` not in ``[1, 52]``.
    """
    _check_clip_bits(clip, bits)
    return 2.0 * clip / ((1 << bits) - 1)


def quantization_error_bound(*, count: int, clip: float, bits: int) -> float:
    """The per-coordinate bound ``count * step`` on ``|dequantize_sum(...) - sum of clipped inputs|``.

    The error is strictly below this bound and has mean zero over the stochastic rounding.

    Raises:
        ValueError: ``count < 1``, or ``clip`` / ``bits`` out of range.
    """
    _check_count(count)
    return count * quantization_step(clip=clip, bits=bits)


def quantize(
    x: torch.Tensor, *, clip: float, bits: int, generator: torch.Generator | None = None,
    uniform: torch.Tensor | None = None,
) -> torch.Tensor:
    """Clip ``x`` to ``[-clip, clip]`` and round it stochastically to int64 levels in ``[0, 2**bits)``.

    Level ``k`` stands for ``-clip + k * step``. The rounding is unbiased:
    ``E[-clip + quantize(x) * step] == clamp(x, -clip, clip)``. ``generator`` supplies the rounding
    noise; it need not be secret (the masks hide the values), but deriving it from (run seed,
    round, client) keeps runs repeatable. A deployed site passes ``uniform`` instead: one draw
    in (0, 1) per value from its own CSPRNG, so the rounding is no function of a seed the
    server sent (rounding that the server could predict would leak, once the sum is known,
    which way each value was rounded).

    Raises:
        ValueError: ``x`` is not floating point or holds NaN, ``clip`` not positive and finite, or
            ``bits`` not in ``[1, 52]``.
    """
    _check_clip_bits(clip, bits)
    if not x.is_floating_point():
        raise ValueError(f"expected a floating-point tensor, found {x.dtype}; call .float() first")
    if torch.isnan(x).any():
        raise ValueError(
            "expected finite values, found NaN in the update; fix the training step that produced it"
        )
    levels = (1 << bits) - 1
    step = quantization_step(clip=clip, bits=bits)
    scaled = (x.to(torch.float64).clamp(-clip, clip) + clip) / step
    # Rounding can push the top value a hair above `levels`; keep it in range.
    scaled = scaled.clamp(0.0, float(levels))
    low = torch.floor(scaled)
    if uniform is not None:
        if uniform.numel() != scaled.numel():
            raise ValueError(f"expected {scaled.numel()} uniform draws, found {uniform.numel()}")
        noise = uniform.to(torch.float64).reshape(scaled.shape)
    elif generator is not None:
        noise = torch.rand(scaled.shape, generator=generator, dtype=torch.float64, device=scaled.device)
    else:
        raise ValueError("expected a generator (simulation) or uniform draws (a site's CSPRNG)")
    rounded = low + (noise < (scaled - low)).to(torch.float64)
    return rounded.to(torch.int64).clamp(0, levels)


def dequantize_sum(
    total: torch.Tensor, *, count: int, clip: float, bits: int, modulus: int
) -> torch.Tensor:
    """The float64 sum of ``count`` quantised vectors, from their sum modulo ``modulus``.

    Requires ``count * (2**bits - 1) < modulus``: then the true integer sum is below the modulus,
    so reducing modulo ``modulus`` loses nothing and ``sum = -count * clip + total * step``.

    Raises:
        ValueError: the requirement above fails (fewer bits or a larger modulus fix it),
            ``total`` is not an integer tensor, or an argument is out of range.
    """
    _check_clip_bits(clip, bits)
    _check_count(count)
    if isinstance(modulus, bool) or not isinstance(modulus, int) or not 2 <= modulus <= 2**62:
        raise ValueError(
            f"expected modulus as an int in [2, 2**62] (2**32 is usual), found {modulus!r}"
        )
    levels = (1 << bits) - 1
    if count * levels >= modulus:
        # The largest b with 2**b - 1 <= (modulus - 1) // count.
        max_bits = ((modulus - 1) // count + 1).bit_length() - 1
        fix = (
            f"use at most {max_bits} bits for {count} clients, or a larger modulus"
            if max_bits >= 1
            else "use a larger modulus"
        )
        raise ValueError(
            f"expected count * (2**bits - 1) < modulus so the sum cannot wrap, found "
            f"{count} * {levels} = {count * levels} >= {modulus}; {fix}"
        )
    if total.is_floating_point() or total.is_complex() or total.dtype == torch.bool:
        raise ValueError(f"expected an integer tensor (the masked sum), found {total.dtype}")
    step = quantization_step(clip=clip, bits=bits)
    unwrapped = total.to(torch.int64) % modulus
    return unwrapped.to(torch.float64) * step - count * clip


def _check_clip_bits(clip: float, bits: int) -> None:
    if (
        isinstance(clip, bool)
        or not isinstance(clip, (int, float))
        or not 0.0 < clip < float("inf")
    ):
        raise ValueError(f"expected clip as a positive finite number, found {clip!r}")
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise ValueError(
            f"expected bits as an int between 1 and {MAX_BITS}, found {bits!r}; 16 is a common choice"
        )


def _check_count(count: int) -> None:
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(
            f"expected count as an int >= 1 (the number of summed clients), found {count!r}"
        )
