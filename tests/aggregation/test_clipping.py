"""clip_by_l2_norm: hand-computed scaling, and it runs on the client in every executor."""

from __future__ import annotations

import pytest
import torch

import consortium
from consortium.aggregation.base import ClientContext
from consortium.aggregation.clipping import clip_by_l2_norm
from consortium.errors import ConfigError
from consortium.executors import SequentialExecutor, VectorizedExecutor
from consortium.types import Update
from tests.conftest import make_toy

CTX = ClientContext(1, "c", 0)


def test_long_update_is_scaled_to_the_bound_short_one_untouched() -> None:
    stage = clip_by_l2_norm(1.0)
    out = stage.client(Update("c", torch.tensor([3.0, 4.0]), 1.0), {"max_norm": 1.0}, CTX)
    assert torch.allclose(out.delta, torch.tensor([0.6, 0.8]))
    assert out.metrics["update_norm"] == pytest.approx(5.0)
    short = stage.client(Update("c", torch.tensor([0.3, 0.4]), 1.0), {"max_norm": 1.0}, CTX)
    assert torch.equal(short.delta, torch.tensor([0.3, 0.4]))


def test_bad_bound() -> None:
    with pytest.raises(ConfigError, match="max_norm"):
        clip_by_l2_norm(0.0)


@pytest.mark.parametrize("executor", [SequentialExecutor, VectorizedExecutor])
def test_every_client_update_is_clipped_in_a_run(executor) -> None:
    bound = 0.05
    seen: list[float] = []

    class Spy:
        name = "spy"
        needs: frozenset[str] = frozenset({"clipped"})
        gives: frozenset[str] = frozenset()

        def init(self, layout):
            return {}

        def receive(self, update, state, ctx):
            seen.append(float(torch.linalg.vector_norm(update.delta)))
            return update

    pipe = consortium.pipeline(clip_by_l2_norm(bound), Spy())
    toy = make_toy(4)
    consortium.simulate({"rounds": 2, "algorithm": {"lr": 0.5}}, dataset=toy, pipeline=pipe,
                        executor=executor())
    assert len(seen) == 8 and max(seen) <= bound + 1e-6
