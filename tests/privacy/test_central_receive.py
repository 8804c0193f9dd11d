"""Central DP's server half checks what a site was asked to do and a malicious one skips:
re-clipping to ``C``, weight 1 and a centred bit of exactly ±½ (issue 13: ``dp.unclipped = -1e6``
overflowed adaptive clipping)."""

from __future__ import annotations

import math

import torch

from consortium.aggregation.base import ClientContext, Pipeline, RoundContext
from consortium.privacy.central import central_dp
from consortium.types import Layout, TensorSpec, Update

LAYOUT = Layout((TensorSpec("w", (2,), torch.float32),))
CTX = RoundContext(round=1, seed=0, population=3, sampled=3, layout=LAYOUT)
BIT = "dp.unclipped"


def _honest(stage, delta: list[float], cid: str = "a") -> Update:
    payload = stage.broadcast(stage.init(LAYOUT))
    return stage.client(Update(cid, torch.tensor(delta), 90.0), payload, ClientContext(1, cid, 0))


def test_an_honest_update_is_passed_through_as_the_same_object() -> None:
    stage = central_dp(1.0, 0.5)
    for delta in ([3.0, 4.0], [0.1, 0.2], [0.3, 0.4]):  # clipped, within, exactly at C
        update = _honest(stage, delta)
        assert stage.receive(update, stage.init(LAYOUT), CTX) is update


def test_a_site_that_skips_its_clip_is_clipped_by_the_server() -> None:
    stage = central_dp(1.0, 0.5)
    cheat = Update("m", torch.tensor([30.0, 40.0]), 1.0, extras={BIT: torch.tensor([0.5])})
    got = stage.receive(cheat, stage.init(LAYOUT), CTX)
    assert got.delta.tolist() == [0.30000001192092896, 0.4000000059604645]  # norm C = 0.5
    assert got.extras[BIT].tolist() == [-0.5]  # at C: it was clipped, whatever it said


def test_a_weight_other_than_1_and_a_bit_other_than_a_half_are_neutralised() -> None:
    stage = central_dp(1.0, 0.5)
    for bit in (-1e6, 0.25, math.nan):
        cheat = Update("m", torch.tensor([0.1, 0.0]), 1e9, extras={BIT: torch.tensor([bit])})
        got = stage.receive(cheat, stage.init(LAYOUT), CTX)
        assert got.weight == 1.0 and got.extras[BIT].tolist() == [0.5]  # below C: unclipped
    missing = stage.receive(Update("m", torch.tensor([0.1, 0.0]), 1.0), stage.init(LAYOUT), CTX)
    assert missing.extras[BIT].tolist() == [0.5]


def test_the_reviews_bit_of_minus_1e6_leaves_adaptive_clipping_finite() -> None:
    stage = central_dp(1.0, 0.5, adaptive=True)
    pipe = Pipeline([stage])
    state = pipe.init(LAYOUT)
    honest = [_honest(stage, [0.1, 0.2], cid) for cid in ("a", "b")]
    cheat = Update("m", torch.tensor([0.1, 0.0]), 1.0, extras={BIT: torch.tensor([-1e6])})
    agg, state = pipe.aggregate([*honest, cheat], state, CTX)
    assert agg is not None and math.isfinite(state.stages[0]["clip"])
    # the three bits were all +½: the clip moves down, as for three honest unclipped updates
    assert state.stages[0]["clip"] < 0.5


def test_behind_secure_aggregation_the_empty_placeholder_is_left_alone() -> None:
    stage = central_dp(1.0, 0.5)
    placeholder = Update("a", torch.zeros(0), 0.0, extras={BIT: torch.zeros(1)})
    assert stage.receive(placeholder, stage.init(LAYOUT), CTX) is placeholder
