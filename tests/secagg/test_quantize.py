"""Quantisation: exact integer path, the stated error bound, unbiased rounding, clipping, guards."""

from __future__ import annotations

import pytest
import torch

from consortium.secagg.masks import apply_mask, expand_mask
from consortium.secagg.quantize import (
    dequantize_sum,
    quantization_error_bound,
    quantization_step,
    quantize,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_step_and_bound_by_hand() -> None:
    assert quantization_step(clip=1.5, bits=2) == 1.0
    assert quantization_step(clip=1.0, bits=8) == pytest.approx(2 / 255)
    assert quantization_error_bound(count=10, clip=1.5, bits=2) == 10.0


def test_values_on_levels_are_exact() -> None:
    # clip 1.5, 2 bits: step 1, levels -1.5, -0.5, 0.5, 1.5.
    x = torch.tensor([-1.5, -0.5, 0.5, 1.5])
    q = quantize(x, clip=1.5, bits=2, generator=_gen())
    assert q.dtype == torch.int64
    assert q.tolist() == [0, 1, 2, 3]


def test_integer_path_is_exact_through_masks_and_wraparound() -> None:
    clip, bits, modulus_bits, count = 1.5, 2, 32, 3
    xs = [
        torch.tensor([-1.5, 0.5, 1.5]),
        torch.tensor([1.5, 1.5, -0.5]),
        torch.tensor([0.5, -1.5, 1.5]),
    ]
    qs = [quantize(x, clip=clip, bits=bits, generator=_gen(i)) for i, x in enumerate(xs)]
    # One mask added by client 0 and removed by client 1: the masked sum wraps mod 2**32.
    mask = expand_mask(bytes(range(32)), 3, modulus_bits=modulus_bits)
    masked = [apply_mask(qs[0], mask, sign=1), apply_mask(qs[1], mask, sign=-1), qs[2]]
    total = sum(masked, torch.zeros(3, dtype=torch.int64)) % 2**modulus_bits
    result = dequantize_sum(total, count=count, clip=clip, bits=bits, modulus=2**modulus_bits)
    assert result.dtype == torch.float64
    assert result.tolist() == [0.5, 0.5, 2.5]  # the float sums, exactly


def test_error_within_bound_for_many_clients() -> None:
    clip, bits, count = 1.0, 8, 20
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(5000, generator=g) * 0.6 for _ in range(count)]
    qs = [quantize(x, clip=clip, bits=bits, generator=_gen(100 + i)) for i, x in enumerate(xs)]
    total = torch.stack(qs).sum(dim=0) % 2**32
    result = dequantize_sum(total, count=count, clip=clip, bits=bits, modulus=2**32)
    target = torch.stack([x.double().clamp(-clip, clip) for x in xs]).sum(dim=0)
    error = (result - target).abs()
    bound = quantization_error_bound(count=count, clip=clip, bits=bits)
    assert error.max().item() < bound
    # The rounding is really there: errors are a sizeable fraction of one step.
    assert error.max().item() > quantization_step(clip=clip, bits=bits)


def test_single_client_error_is_below_one_step() -> None:
    x = torch.linspace(-0.99, 0.99, 10001)
    q = quantize(x, clip=1.0, bits=4, generator=_gen(3))
    step = quantization_step(clip=1.0, bits=4)
    recovered = -1.0 + q.double() * step
    assert (recovered - x.double()).abs().max().item() < step


def test_rounding_is_unbiased() -> None:
    clip, bits, draws = 1.0, 4, 400
    step = quantization_step(clip=clip, bits=bits)
    x = torch.linspace(-0.97, 0.97, 1000, dtype=torch.float64)
    q = quantize(x.expand(draws, -1), clip=clip, bits=bits, generator=_gen(7))
    mean_error = (-clip + q.double() * step).mean(dim=0) - x
    # Each draw's error has sd <= step / 2, so the mean over 400 draws has sd <= step / 40;
    # 6 sd is never reached by chance, while round-to-nearest would be off by up to step / 2.
    assert mean_error.abs().max().item() < 6 * step / 40
    nearest_error = (-clip + torch.round((x + clip) / step) * step) - x
    assert nearest_error.abs().max().item() > 6 * step / 40


def test_draws_depend_on_generator_and_repeat_under_seed() -> None:
    x = torch.rand(1000, generator=_gen(9)) * 2 - 1
    a = quantize(x, clip=1.0, bits=6, generator=_gen(1))
    b = quantize(x, clip=1.0, bits=6, generator=_gen(1))
    c = quantize(x, clip=1.0, bits=6, generator=_gen(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_clipping() -> None:
    x = torch.tensor([-5.0, -1.0, 1.0, 7.0, float("inf"), float("-inf")])
    q = quantize(x, clip=1.0, bits=8, generator=_gen())
    assert q.tolist() == [0, 0, 255, 255, 255, 0]
    assert int(q.min()) >= 0 and int(q.max()) < 2**8


def test_modulus_guard() -> None:
    # 2 clients * (2**32 - 1) does not fit below 2**32.
    with pytest.raises(ValueError, match="at most 31 bits"):
        dequantize_sum(torch.zeros(3, dtype=torch.int64), count=2, clip=1.0, bits=32, modulus=2**32)
    # 1000 clients: 2**22 - 1 levels fit (1000 * 4194303 < 2**32), 2**23 - 1 do not.
    dequantize_sum(torch.zeros(3, dtype=torch.int64), count=1000, clip=1.0, bits=22, modulus=2**32)
    with pytest.raises(ValueError, match="at most 22 bits"):
        dequantize_sum(
            torch.zeros(3, dtype=torch.int64), count=1000, clip=1.0, bits=23, modulus=2**32
        )
    with pytest.raises(ValueError, match="larger modulus"):
        dequantize_sum(torch.zeros(3, dtype=torch.int64), count=300, clip=1.0, bits=1, modulus=256)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"clip": 0.0, "bits": 8}, "positive finite"),
        ({"clip": float("inf"), "bits": 8}, "positive finite"),
        ({"clip": 1.0, "bits": 0}, "between 1 and 52"),
        ({"clip": 1.0, "bits": 53}, "between 1 and 52"),
    ],
)
def test_invalid_arguments(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        quantize(torch.zeros(2), generator=_gen(), **kwargs)  # type: ignore[arg-type]


def test_nan_and_integer_inputs_rejected() -> None:
    with pytest.raises(ValueError, match="NaN"):
        quantize(torch.tensor([0.0, float("nan")]), clip=1.0, bits=8, generator=_gen())
    with pytest.raises(ValueError, match="floating-point"):
        quantize(torch.tensor([1, 2]), clip=1.0, bits=8, generator=_gen())
    with pytest.raises(ValueError, match="integer tensor"):
        dequantize_sum(torch.zeros(2), count=1, clip=1.0, bits=8, modulus=2**32)
