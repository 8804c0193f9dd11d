"""Encoders and the strict decoder: hand-computed encodings, exact byte counts, refusals."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from consortium.compression.codecs import (
    encode_cast,
    encode_int,
    encode_qsgd,
    encode_randk,
    encode_sign,
    encode_topk,
)
from consortium.compression.encoded import (
    Encoded,
    MalformedUpdate,
    decode,
    pack_codes,
    random_indices,
    unpack_codes,
)
from consortium.compression.lowrank import decode_lowrank, encode_lowrank, lowrank_length


def fixed(*draws: float):
    return lambda n: torch.tensor(draws[:n], dtype=torch.float32)


def test_pack_codes_is_lsb_first_and_round_trips() -> None:
    assert pack_codes(torch.tensor([2, 0, 1, 2]), 2).tolist() == [2 | 0 << 2 | 1 << 4 | 2 << 6]
    assert pack_codes(torch.tensor([1, 0, 1]), 1).tolist() == [0b101]
    codes = torch.randint(0, 32, (101,), generator=torch.Generator().manual_seed(0))
    packed = pack_codes(codes, 5)
    assert packed.numel() == (101 * 5 + 7) // 8
    assert torch.equal(unpack_codes(packed, 101, 5), codes)


def test_fp16_round_trip_is_the_cast_and_counts_two_bytes_a_value() -> None:
    v = torch.tensor([1.0, -0.333333, 1e-3])
    enc = encode_cast(v, "fp16")
    assert torch.equal(decode(enc, size=3), v.to(torch.float16).to(torch.float32))
    assert enc.nbytes == len("fp16") + 8 + 3 * 2
    bf = encode_cast(v, "bf16")
    assert torch.equal(decode(bf, size=3), v.to(torch.bfloat16).to(torch.float32))


def test_topk_by_hand() -> None:
    enc = encode_topk(torch.tensor([0.1, -3.0, 2.0, 0.5]), 0.5)
    assert enc.header == (2,)
    assert enc.indices is not None and enc.indices.dtype == torch.int32
    assert enc.indices.tolist() == [1, 2] and enc.values is not None
    assert enc.values.tolist() == [-3.0, 2.0]
    # "topk" + d and k as 8-byte integers + 2 int32 indices + 2 float32 values
    assert enc.nbytes == 4 + 16 + 8 + 8
    assert decode(enc, size=4).tolist() == [0.0, -3.0, 2.0, 0.0]


def test_randk_sends_the_seed_not_the_indices() -> None:
    v = torch.arange(10, dtype=torch.float32)
    enc = encode_randk(v, 0.3, seed=42)
    idx = random_indices(10, 3, 42)
    assert enc.indices is None and enc.header == (3, 42)
    assert enc.nbytes == 5 + 8 * 3 + 3 * 4
    out = decode(enc, size=10)
    assert torch.equal(out[idx], v[idx]) and int((out != 0).sum()) <= 3


def test_int2_by_hand() -> None:
    # step = max|v| / 1 = 2; v/step = [1, -1, 0, 1] exactly, so the rounding is deterministic
    enc = encode_int(torch.tensor([2.0, -2.0, 0.0, 2.0]), bits=2, chunk=4, uniform=fixed(0.5, 0.5, 0.5, 0.5))
    assert enc.codes is not None and enc.codes.tolist() == [2 | 0 << 2 | 1 << 4 | 2 << 6]
    assert enc.scales is not None and enc.scales.tolist() == [2.0]
    assert enc.nbytes == 3 + 8 * 3 + 1 + 4
    assert decode(enc, size=4).tolist() == [2.0, -2.0, 0.0, 2.0]


def test_int8_stochastic_rounding_by_hand() -> None:
    # step = 127/127 = 1; 0.25 rounds up when u < 0.25
    v = torch.tensor([127.0, 0.25, 0.25])
    up = decode(encode_int(v, bits=8, chunk=8, uniform=fixed(0.0, 0.1, 0.9)), size=3)
    assert up.tolist() == [127.0, 1.0, 0.0]


def test_qsgd_by_hand() -> None:
    # one level (s = 1): |v|/‖v‖ = [0.6, 0.8]; u = 0.5 < 0.6 rounds up, u = 0.9 > 0.8 down
    enc = encode_qsgd(torch.tensor([3.0, -4.0]), bits=1, chunk=2, uniform=fixed(0.5, 0.9))
    assert enc.codes is not None and enc.codes.tolist() == [(1 << 1 | 0) | (0 << 1 | 1) << 2]
    assert enc.scales is not None and enc.scales.tolist() == [5.0]
    assert decode(enc, size=2).tolist() == [5.0, 0.0]
    assert enc.nbytes == 4 + 8 * 3 + 1 + 4


def test_sign_by_hand() -> None:
    enc = encode_sign(torch.tensor([1.0, -1.0, 0.0, -2.0, 3.0]))
    assert enc.codes is not None and enc.codes.tolist() == [0b10101]
    assert enc.nbytes == 4 + 8 + 1
    assert decode(enc, size=5).tolist() == [1.0, -1.0, 1.0, -1.0, 1.0]


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_int_quantisation_is_unbiased(bits: int) -> None:
    assert_unbiased(lambda v, gen: encode_int(v, bits=bits, chunk=16, uniform=lambda n: torch.rand(n, generator=gen)))


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_qsgd_is_unbiased(bits: int) -> None:
    assert_unbiased(lambda v, gen: encode_qsgd(v, bits=bits, chunk=16, uniform=lambda n: torch.rand(n, generator=gen)))


def assert_unbiased(encode) -> None:  # type: ignore[no-untyped-def]
    v = torch.randn(40, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(2)
    draws = torch.stack([decode(encode(v, gen), size=40) for _ in range(3000)])
    mean, std = draws.mean(0), draws.std(0)
    # every coordinate's sample mean within 5 standard errors of v (deterministic: seeded)
    assert bool(((mean - v).abs() <= 5 * std / 3000**0.5 + 1e-6).all())
    assert float(std.max()) > 0  # it is stochastic, so the check above is not vacuous


def test_lowrank_recovers_a_rank_r_matrix_and_sends_the_factors() -> None:
    shapes = [[6, 5], [5]]
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(6, 2, generator=gen) @ torch.randn(2, 5, generator=gen)
    v = torch.cat([m.reshape(-1), torch.arange(5.0)])
    values, q = encode_lowrank(v, shapes, 2, torch.randn(10, generator=gen))
    assert values.numel() == lowrank_length(shapes, 2) == (6 + 5) * 2 + 5
    assert q.numel() == 10
    assert torch.allclose(decode_lowrank(values, shapes, 2), v, atol=1e-4)
    enc = Encoded("lowrank", 35, (2,), values=values)
    assert torch.allclose(decode(enc, size=35, shapes=shapes), v, atol=1e-4)


# -- refusals -----------------------------------------------------------------------------------


def _topk() -> Encoded:
    return encode_topk(torch.tensor([0.0, 5.0, 0.0, -4.0, 1.0]), 0.4)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"indices": torch.tensor([1, 5], dtype=torch.int32)}, "outside"),
        ({"indices": torch.tensor([-1, 3], dtype=torch.int32)}, "outside"),
        ({"indices": torch.tensor([3, 3], dtype=torch.int32)}, "repeat"),
        ({"indices": torch.tensor([3, 1], dtype=torch.int32)}, "repeat or are not in increasing"),
        ({"indices": torch.tensor([1, 2, 3], dtype=torch.int32)}, "header says 2"),
        ({"values": torch.tensor([1.0])}, "header says 2"),
        ({"values": torch.tensor([1.0, float("nan")])}, "finite"),
        ({"indices": torch.tensor([1, 3], dtype=torch.int64)}, "expected torch.int32"),
        ({"header": (7,)}, "outside [1, 5]"),
        ({"header": (2, 1)}, "header has 2"),
        ({"size": 6}, "the model has 5"),
        ({"scales": torch.ones(1)}, "carries no scales"),
        ({"kind": "zip"}, "unknown kind"),
    ],
)
def test_decoder_refuses_malformed_topk(change: dict, reason: str) -> None:
    bad = dataclasses.replace(_topk(), **change)
    with pytest.raises(MalformedUpdate, match=re.escape(reason)):
        decode(bad, size=5)


def test_decoder_refuses_bad_codes_and_scales() -> None:
    enc = encode_int(torch.tensor([1.0, -1.0, 0.5]), bits=4, chunk=4, uniform=fixed(0.5, 0.5, 0.5))
    # int4 codes are q + 7 in [0, 14]: 15 is out of range
    with pytest.raises(MalformedUpdate, match="exceed the largest valid code 14"):
        decode(dataclasses.replace(enc, codes=pack_codes(torch.tensor([15, 0, 0]), 4)), size=3)
    with pytest.raises(MalformedUpdate, match="padding bits"):
        decode(dataclasses.replace(enc, codes=torch.tensor([0, 0xF0], dtype=torch.uint8)), size=3)
    with pytest.raises(MalformedUpdate, match="header says 2"):
        decode(dataclasses.replace(enc, codes=torch.tensor([0], dtype=torch.uint8)), size=3)
    with pytest.raises(MalformedUpdate, match="finite"):
        decode(dataclasses.replace(enc, scales=torch.tensor([float("inf")])), size=3)
    with pytest.raises(MalformedUpdate, match="negative"):
        decode(dataclasses.replace(enc, scales=torch.tensor([-1.0])), size=3)
    with pytest.raises(MalformedUpdate, match="bits = 9"):
        decode(dataclasses.replace(enc, header=(9, 4)), size=3)
    with pytest.raises(MalformedUpdate, match="finite"):
        decode(encode_cast(torch.tensor([1e6]), "fp16"), size=1)  # overflows binary16
