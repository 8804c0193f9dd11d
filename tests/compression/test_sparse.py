"""Compact top-k (fp16 values, Golomb–Rice coded gaps): by hand, round trips, hostile streams."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import consortium
from consortium.aggregation.base import ClientContext
from consortium.compression import Compress, MalformedUpdate, compress, compression_stage, decode
from consortium.compression.codecs import encode_topk, keep_count
from consortium.compression.encoded import Encoded
from consortium.compression.rice import (
    decode_gaps,
    encode_gaps,
    max_unary_bytes,
    rice_parameter,
)
from consortium.config import ExperimentConfig
from consortium.errors import ConfigError
from consortium.types import Layout, Update
from tests.conftest import make_toy


def _hand() -> Encoded:
    # d = 20, the top 4 at 2, 3, 10, 19
    v = torch.zeros(20)
    v[[2, 3, 10, 19]] = torch.tensor([5.0, -6.0, 7.0, -8.0])
    return encode_topk(v, 0.2, values="fp16", indices="rice")


def test_rice_parameter_follows_the_geometric_optimum() -> None:
    assert rice_parameter(20, 4) == 2  # log2(5 · ln 2) = 1.79
    assert rice_parameter(1000, 10) == 6  # log2(100 · ln 2) = 6.11
    assert rice_parameter(10, 10) == 0  # every coordinate: gaps of 1, unary only
    assert rice_parameter(6090, 183) == 5


def test_hand_computed_stream() -> None:
    enc = _hand()
    assert enc.kind == "sparse" and enc.header == (4,) and enc.indices is None  # b = 2 derived
    # gaps − 1 = [2, 0, 6, 8]: remainders (mod 4) 2, 0, 2, 0 → 0b00100010; quotients 0, 0, 1, 2
    # in unary (q zeros then a one): 1 | 1 | 01 | 001 → bits 0, 1, 3, 6 → 0b01001011, a zero pad
    assert enc.codes is not None and enc.codes.tolist() == [0b00100010, 0b01001011]
    assert enc.values is not None and enc.values.dtype == torch.float16
    assert enc.values.tolist() == [5.0, -6.0, 7.0, -8.0]
    # "sparse" + d and k as 8-byte integers + 4 fp16 values + 2 bytes of codes
    assert enc.nbytes == 6 + 16 + 8 + 2
    expected = torch.zeros(20)
    expected[[2, 3, 10, 19]] = torch.tensor([5.0, -6.0, 7.0, -8.0])
    assert torch.equal(decode(enc, size=20), expected)


@pytest.mark.parametrize(("d", "fraction"), [(1, 1.0), (7, 1.0), (100, 0.5), (1000, 0.01),
                                             (6090, 0.03), (50_000, 0.001), (333, 0.3)])
@pytest.mark.parametrize("values", ["float32", "fp16"])
def test_round_trip_equals_plain_topk(d: int, fraction: float, values: str) -> None:
    v = torch.randn(d, generator=torch.Generator().manual_seed(d))
    plain = encode_topk(v, fraction)
    compact = encode_topk(v, fraction, values=values, indices="rice")
    want = decode(plain, size=d)
    if values == "fp16":
        want = want.to(torch.float16).to(torch.float32)
    assert torch.equal(decode(compact, size=d), want)
    k = keep_count(d, fraction)
    assert compact.codes is not None
    assert compact.codes.numel() <= (k * (rice_parameter(d, k) + 1) + (d - k) // 2 ** rice_parameter(d, k) + 7) // 8 + 1


def test_gaps_cost_about_b_plus_two_bits() -> None:
    d, k = 100_000, 3000
    idx = np.sort(np.random.default_rng(0).choice(d, k, replace=False))
    b = rice_parameter(d, k)
    bits = 8 * encode_gaps(idx, b).size / k
    assert b + 1 < bits < b + 2.2  # random positions: geometric gaps, ~1.5 unary bits each
    assert np.array_equal(decode_gaps(encode_gaps(idx, b), d=d, k=k, b=b), idx)


def test_fp16_values_are_clamped_not_infinite() -> None:
    v = torch.tensor([1e6, -2.0, 0.0, -1e9])
    enc = encode_topk(v, 0.5, values="fp16", indices="rice")
    assert decode(enc, size=4).tolist() == [65504.0, 0.0, 0.0, -65504.0]


def _with_codes(enc: Encoded, codes: list[int]) -> Encoded:
    return dataclasses.replace(enc, codes=torch.tensor(codes, dtype=torch.uint8))


@pytest.mark.parametrize(
    ("codes", "message"),
    [
        ([0b00100010, 0b00001011], "holds 3 quotients, expected k = 4"),  # a lost end
        ([0b00100010, 0b11001011], "holds 5 quotients"),  # a padding bit set
        ([0b00100010, 0b10001011], "index 23 is not below d = 20"),  # last gap too long
        ([0b00100010], "take 1 bytes of remainders and 1 to 1"),  # too short
        ([0b00100010, 0b01001011, 0], "the stream has 3 bytes"),  # longer than d allows
    ],
)
def test_malformed_streams_are_refused(codes: list[int], message: str) -> None:
    with pytest.raises(MalformedUpdate, match=message):
        decode(_with_codes(_hand(), codes), size=20)


def test_trailing_bytes_and_remainder_padding_are_refused() -> None:
    v = torch.zeros(1000)
    v[[5, 200, 700]] = 1.0
    enc = encode_topk(v, 0.003, values="fp16", indices="rice")
    (k,) = enc.header
    assert (k, rice_parameter(1000, k)) == (3, 8) and enc.codes is not None
    assert max_unary_bytes(1000, 3, 8) == 1  # 3 ends + at most 3 quotient zeros
    codes = enc.codes.tolist()
    assert torch.equal(decode(enc, size=1000), v)
    v2 = torch.zeros(4000)
    v2[[0, 1, 3999]] = 1.0
    wide = encode_topk(v2, 3 / 4000, indices="rice")
    assert wide.header == (3,) and rice_parameter(4000, 3) == 10 and wide.codes is not None
    # 3 · 10 = 30 bits of remainders: the top 2 bits of the 4th byte are padding
    bad = wide.codes.tolist()
    bad[3] |= 0x80
    with pytest.raises(MalformedUpdate, match="padding bits after the remainders"):
        decode(_with_codes(wide, bad), size=4000)
    # the Rice parameter does not travel: a second header integer is refused
    with pytest.raises(MalformedUpdate, match="header has 2 integers, expected 1"):
        decode(dataclasses.replace(enc, header=(3, 3)), size=1000)
    assert codes[-1] != 0


def test_a_trailing_zero_byte_within_the_cap_is_refused() -> None:
    d = 100
    v = torch.zeros(d)
    v[[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]] = 1.0  # all gaps 1: one unary byte, cap is larger
    enc = encode_topk(v, 0.1, indices="rice")
    (k,) = enc.header
    assert max_unary_bytes(d, k, rice_parameter(d, k)) >= 3 and enc.codes is not None
    with pytest.raises(MalformedUpdate, match="trailing bytes after its last quotient"):
        decode(_with_codes(enc, [*enc.codes.tolist(), 0]), size=d)


def test_header_values_and_fields_are_checked() -> None:
    enc = _hand()
    with pytest.raises(MalformedUpdate, match="header has 2 integers"):
        decode(dataclasses.replace(enc, header=(4, 2)), size=20)
    with pytest.raises(MalformedUpdate, match="k = 0 outside"):
        decode(dataclasses.replace(enc, header=(0,)), size=20)
    with pytest.raises(MalformedUpdate, match="k = 21 outside"):
        decode(dataclasses.replace(enc, header=(21,)), size=20)
    with pytest.raises(MalformedUpdate, match="values hold"):
        decode(dataclasses.replace(enc, header=(5,)), size=20)
    with pytest.raises(MalformedUpdate, match="not all finite"):
        decode(dataclasses.replace(enc, values=torch.tensor([1.0, float("inf"), 0, 0],
                                                            dtype=torch.float16)), size=20)
    with pytest.raises(MalformedUpdate, match="carries no indices"):
        decode(dataclasses.replace(enc, indices=torch.arange(4, dtype=torch.int32)), size=20)
    with pytest.raises(MalformedUpdate, match="expected flat uint8"):
        decode(dataclasses.replace(enc, codes=enc.codes.to(torch.int32)), size=20)  # type: ignore[union-attr]
    with pytest.raises(MalformedUpdate, match="model has 21"):
        decode(enc, size=21)


def test_a_huge_hostile_stream_is_refused_before_it_is_unpacked() -> None:
    enc = dataclasses.replace(_hand(), codes=torch.zeros(50_000_000, dtype=torch.uint8))
    with pytest.raises(MalformedUpdate, match="the stream has 50000000 bytes"):
        decode(enc, size=20)


def test_random_corruptions_decode_or_are_refused_never_crash() -> None:
    rng = np.random.default_rng(0)
    d = 500
    v = torch.randn(d, generator=torch.Generator().manual_seed(3))
    enc = encode_topk(v, 0.05, values="fp16", indices="rice")
    assert enc.codes is not None
    base = enc.codes.numpy()
    refused = 0
    for _ in range(2000):
        codes = base.copy()
        if rng.random() < 0.2:
            codes = codes[: rng.integers(0, codes.size)] if rng.random() < 0.5 else np.concatenate(
                [codes, rng.integers(0, 256, rng.integers(1, 4)).astype(np.uint8)])
        else:
            flips = rng.integers(0, codes.size, rng.integers(1, 4))
            codes[flips] ^= (1 << rng.integers(0, 8, flips.size)).astype(np.uint8)
        try:
            out = decode(dataclasses.replace(enc, codes=torch.from_numpy(codes)), size=d)
        except MalformedUpdate:
            refused += 1
            continue
        assert out.shape == (d,) and int((out != 0).sum()) <= 25
    assert refused > 1000


def test_error_feedback_keeps_the_fp16_rounding() -> None:
    stage = compress("topk", fraction=0.5, error_feedback=True, values="fp16", indices="rice")
    state: dict[str, torch.Tensor] = {}
    v = torch.tensor([1.0 / 3.0, -4.0, 3.0001, 0.5])
    out = stage.client(Update("a", v, 1.0), {}, ClientContext(1, "a", 0, state=state))
    assert isinstance(out.encoded, Encoded) and out.encoded.kind == "sparse"
    sent = decode(out.encoded, size=4)
    residual = state["compression.residual"]
    assert torch.equal(residual, v - sent)
    x = torch.tensor(3.0001)
    assert float(residual[2]) == float(x - x.half().float())
    assert float(residual[2]) != 0.0 and residual[[0, 3]].tolist() == v[[0, 3]].tolist()


def test_the_server_expects_the_runs_kind_k_and_dtype() -> None:
    layout = Layout.of({"x": torch.zeros(20)})
    stage = compress("topk", fraction=0.2, values="fp16", indices="rice")
    good = Update("a", torch.zeros(0), 1.0, encoded=_hand())
    assert stage.decoded(good, layout).count_nonzero() == 4
    plain = Update("a", torch.zeros(0), 1.0, encoded=encode_topk(torch.randn(20), 0.2))
    with pytest.raises(MalformedUpdate, match="expects 'sparse'"):
        stage.decoded(plain, layout)
    with pytest.raises(MalformedUpdate, match="sent k = 4 coordinates; this run keeps k = 2"):
        compress("topk", fraction=0.1, values="fp16", indices="rice").decoded(good, layout)
    with pytest.raises(MalformedUpdate, match="compression.values = 'float32'"):
        compress("topk", fraction=0.2, indices="rice").decoded(good, layout)


def test_config_reaches_the_stage_and_refuses_other_methods() -> None:
    cfg = ExperimentConfig.from_dict({"compression": {
        "uplink": "topk", "values": "fp16", "indices": "rice", "error_feedback": True}})
    stage = compression_stage(cfg, deployed=True)
    assert isinstance(stage, Compress) and (stage.values, stage.indices) == ("fp16", "rice")
    assert stage.kind == "sparse"
    with pytest.raises(ConfigError, match="does not use them"):
        compression_stage(ExperimentConfig.from_dict(
            {"compression": {"uplink": "qsgd", "values": "fp16"}}))
    with pytest.raises(ConfigError, match="compression.indices"):
        ExperimentConfig.from_dict({"compression": {"uplink": "topk", "indices": "gamma"}})


def test_a_run_sends_the_compact_bytes() -> None:
    toy = make_toy(4)
    base = {"rounds": 3, "seed": 1, "algorithm": {"lr": 0.1}, "sampling": {"fraction": 1.0}}
    plain = consortium.simulate({**base, "compression": {
        "uplink": "topk", "fraction": 0.25, "error_feedback": True}}, dataset=toy)
    compact = consortium.simulate({**base, "compression": {
        "uplink": "topk", "fraction": 0.25, "error_feedback": True, "values": "fp16",
        "indices": "rice"}}, dataset=toy)
    d = plain.params.vector.numel()
    k = keep_count(d, 0.25)
    for a, b in zip(plain.history, compact.history):
        assert a["bytes_up"] == a["clients"] * (len("topk") + 16 + 8 * k)
        # 2 bytes a value, the gaps in at most b + 1 bits each plus the unary budget
        b_ = rice_parameter(d, k)
        most = len("sparse") + 16 + 2 * k + (k * b_ + 7) // 8 + max_unary_bytes(d, k, b_)
        assert b["clients"] * (len("sparse") + 16 + 2 * k) < b["bytes_up"] <= b["clients"] * most
    # fp16 rounding with error feedback: close to the float32 top-k run
    assert torch.allclose(plain.params.vector, compact.params.vector, atol=5e-2)
