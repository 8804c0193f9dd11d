"""``clip_by_l2_norm``'s server half: a client that skips its clip is clipped on arrival."""

from __future__ import annotations

import torch

from consortium.aggregation.base import ClientContext, RoundContext
from consortium.aggregation.clipping import SLACK, clip_by_l2_norm, enforce_norm
from consortium.types import Layout, TensorSpec, Update

LAYOUT = Layout((TensorSpec("w", (2,), torch.float32),))
CTX = RoundContext(round=1, seed=0, population=2, sampled=2, layout=LAYOUT)


def test_a_skipped_clip_is_applied_on_arrival() -> None:
    stage = clip_by_l2_norm(1.0)
    cheat = Update("m", torch.tensor([6.0, 8.0]), 1.0)
    got = stage.receive(cheat, stage.init(LAYOUT), CTX)
    assert got.delta.tolist() == [0.6000000238418579, 0.800000011920929]


def test_an_honestly_clipped_update_is_the_same_object() -> None:
    stage = clip_by_l2_norm(1.0)
    sent = stage.client(Update("a", torch.tensor([6.0, 8.0]), 1.0), {"max_norm": 1.0},
                        ClientContext(1, "a", 0))
    assert stage.receive(sent, stage.init(LAYOUT), CTX) is sent


def test_a_hair_above_the_bound_is_float_rounding_and_passes() -> None:
    delta = torch.tensor([1.0 + SLACK / 2, 0.0])
    assert enforce_norm(delta, 1.0)[0] is delta
    over = torch.tensor([1.0 + 2 * SLACK, 0.0])
    assert enforce_norm(over, 1.0)[0].tolist() == [1.0, 0.0]
