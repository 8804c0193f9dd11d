"""``server.async_weighting``: an update's weight in a FedBuff buffer (examples, equal, time)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

import consortium
from consortium.aggregation.staleness import buffer_weight, buffer_weights
from consortium.errors import ConfigError
from tests.simulation.test_async import IDS, TARGET, config, fedbuff, start


def test_buffer_weights_by_hand() -> None:
    # examples 10 and 30, round trips 1 s and 3 s: mean 2 s
    assert buffer_weights("examples", [10.0, 30.0], [1.0, 3.0]) == [10.0, 30.0]
    assert buffer_weights("equal", [10.0, 30.0], [1.0, 3.0]) == [1.0, 1.0]
    assert buffer_weights("time", [10.0, 30.0], [1.0, 3.0]) == [5.0, 45.0]
    assert buffer_weight("time", 8.0, 0.5, 2.0) == 2.0
    # every round trip 0 (nothing tells them apart): the examples
    assert buffer_weights("time", [10.0, 30.0], [0.0, 0.0]) == [10.0, 30.0]
    with pytest.raises(ConfigError, match="async_weighting"):
        buffer_weight("inverse", 1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="durations"):
        buffer_weight("time", 1.0, -1.0, 1.0)


@pytest.mark.parametrize("kind", ["examples", "equal", "time"])
def test_a_fedbuff_step_by_hand(kind: str) -> None:
    # the harness of test_async.py: a, b, c with 1, 2, 3 examples (as weights) finish 1, 2 and
    # 3.5 s after dispatch; buffer of 2, s(τ) = (1 + τ)^−½
    server, _ = fedbuff([10.0, 5.0, 10 / 3.5])
    server.weighting = kind
    assert set(IDS) == {"a", "b", "c"}
    state = server.init_state(start())
    x0 = state.params.vector.clone()
    w = {"examples": {"a": (1.0, 1.0), "b": (2.0, 2.0)},  # step 1: a (1 s) and b (2 s)
         "equal": {"a": (1.0, 1.0), "b": (1.0, 1.0)},
         "time": {"a": (1.0 * 1 / 1.5, 1.0 * 1 / 2.25), "b": (2.0 * 2 / 1.5, 0.0)}}[kind]
    state, _ = server.run_round(state)
    wa, wb = w["a"][0], w["b"][0]
    x1 = x0 + (wa * (TARGET["a"] - x0) + wb * (TARGET["b"] - x0)) / (wa + wb)
    assert torch.allclose(state.params.vector, x1, atol=1e-6)
    if kind == "time":  # step 1: weights 2/3 and 8/3 of 10/3: x1 = 0.2·Ta + 0.8·Tb
        assert torch.allclose(x1, torch.tensor([0.2, 1.6]), atol=1e-6)
    # step 2: a (sent at 2 s, back at 3 s: 1 s) and c (sent version 0 at 0 s, back at 3.5 s,
    # τ = 1, s = 1/√2): mean round trip 2.25 s
    state, _ = server.run_round(state)
    wa2, wc = {"examples": (1.0, 3.0), "equal": (1.0, 1.0),
               "time": (1.0 * 1 / 2.25, 3.0 * 3.5 / 2.25)}[kind]
    s1 = 1 / math.sqrt(2)
    x2 = x1 + (wa2 * (TARGET["a"] - x1) + wc * s1 * (TARGET["c"] - x0)) / (wa2 + wc)
    assert torch.allclose(state.params.vector, x2, atol=1e-6)


def test_the_default_is_the_examples_weighting() -> None:
    cfg = config(rounds=3)
    default = consortium.simulate(cfg, report=False)
    cfg["server"] = {**cfg["server"], "async_weighting": "examples"}
    explicit = consortium.simulate(cfg, report=False)
    assert torch.equal(default.params.vector, explicit.params.vector)
    cfg["server"]["async_weighting"] = "time"
    timed = consortium.simulate(cfg, report=False)
    assert not torch.equal(default.params.vector, timed.params.vector)
    assert torch.isfinite(timed.params.vector).all()


@pytest.mark.parametrize(("change", "match"), [
    ({"secure_aggregation": {"enabled": True}, "server": {"staleness": "constant"}},
     "secure aggregation"),
    ({"privacy": {"mode": "central", "noise_multiplier": 1.0, "clip": 1.0,
                  "sampling": "fixed"}}, "central DP"),
    ({"server": {"mode": "sync"}}, "async_weighting"),
])
def test_a_weighting_the_server_cannot_apply_is_refused(change: dict[str, Any],
                                                         match: str) -> None:
    cfg = config(rounds=1, async_weighting="time")
    for section, values in change.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    with pytest.raises(ConfigError, match=match):
        consortium.simulate(cfg, report=False)
