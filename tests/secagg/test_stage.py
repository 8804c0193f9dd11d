"""Secure aggregation in a run: the weighted mean survives, DP composes, bad combinations fail."""

from __future__ import annotations

import pytest
import torch

import consortium
from consortium.aggregation.base import Aggregate, ClientContext, Pipeline, RoundContext
from consortium.errors import ConfigError, PipelineError
from consortium.secagg.quantize import quantization_error_bound
from consortium.secagg.stage import secure_aggregation
from consortium.types import Layout, TensorSpec, Update
from tests.conftest import make_toy


def test_the_weighted_mean_comes_back_within_the_quantisation_bound() -> None:
    stage, summer = secure_aggregation(clip=1.0, bits=16, weight_bound=100.0)
    layout = Layout((TensorSpec("w", (3,), torch.float32),))
    raw = [Update("a", torch.tensor([0.1, -0.2, 0.3]), 10.0), Update("b", torch.tensor([0.5, 0.0, -0.1]), 30.0),
           Update("c", torch.tensor([-0.3, 0.2, 0.2]), 20.0)]
    sent = [stage.client(u, {}, ClientContext(1, u.client_id, i)) for i, u in enumerate(raw)]
    assert all(u.weight == 0.0 for u in sent)  # the weight travels inside the masked vector
    agg = summer.aggregate(sent, ctx=RoundContext(1, 7, 3, 3, layout))
    expected = sum(u.weight * u.delta for u in raw) / 60.0
    # each coordinate of Σ w·Δ is off by at most count·step·weight_bound; Σ w likewise
    bound = quantization_error_bound(count=3, clip=1.0, bits=16) * 100.0
    assert agg.weight == pytest.approx(60.0, abs=bound)
    assert torch.allclose(agg.delta, expected, atol=2 * bound / 60.0)
    assert isinstance(agg, Aggregate) and agg.count == 3


def test_demo_accuracy_is_unchanged() -> None:
    plain = consortium.simulate(None, overrides=["evaluation.baselines=[]"])
    secure = consortium.simulate(None, overrides=["evaluation.baselines=[]",
                                                  "secure_aggregation.enabled=true"])
    assert abs(plain.summary["final"]["accuracy"] - secure.summary["final"]["accuracy"]) <= 0.02
    assert float((plain.params.vector - secure.params.vector).abs().max()) < 1e-2


def test_central_dp_composes_with_secure_aggregation() -> None:
    cfg = {"rounds": 2, "sampling": {"fraction": 1.0},
           "privacy": {"mode": "central", "noise_multiplier": 0.5, "clip": 0.5},
           "secure_aggregation": {"enabled": True}}
    result = consortium.simulate(cfg, dataset=make_toy(5))
    assert result.summary["privacy"]["epsilon"] > 0
    assert all(r["secagg_clients"] == r["clients"] for r in result.history)


def test_rules_that_need_every_update_are_refused_after_it() -> None:
    class Median:
        name = "median"
        needs = frozenset({"individual_updates"})

        def aggregate(self, updates, *, ctx):  # pragma: no cover - never built
            raise AssertionError

    stage, _ = secure_aggregation()
    with pytest.raises(PipelineError, match="secure-aggregation"):
        Pipeline([stage], aggregator=Median())


def test_unsupported_algorithms_are_refused() -> None:
    with pytest.raises(ConfigError, match="not supported yet"):
        consortium.load_config(None, ["secure_aggregation.enabled=true", "algorithm.name=scaffold"])
