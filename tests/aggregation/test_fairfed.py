"""FairFed's weights (Ezzeldin et al., AAAI 2023): a hand-computed update over two rounds, the
wrapper's aggregate, β = 0 as FedAvg bit for bit, the same run under every executor, resume, and
the configurations it refuses."""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
import torch

from consortium.aggregation.base import Aggregate, RoundContext
from consortium.aggregation.fairfed import FairFedWeights, fairfed_step
from consortium.aggregation.mean import weighted_mean
from consortium.config import ExperimentConfig
from consortium.errors import ConfigError
from consortium.simulation import simulate
from consortium.types import Layout, Parameters, Update

CLIENTS = ("a", "b", "c")
SIZES = (1.0, 2.0, 1.0)  # ω⁰ = (1/4, 1/2, 1/4)
# (F_g, F_k) of two rounds, β = 1:
# round 1: Δ = (.1, 0, .3), mean 2/15 -> ω = (17/60, 38/60, 5/60) (sums to 1, nothing clipped)
# round 2: Δ = (0, 0, .9), mean .3 -> (35/60, 56/60, 5/60 - 54/60 < 0 -> 0) -> /(91/60)
#          = (5/13, 8/13, 0)
ROUNDS = [(0.2, {"a": 0.1, "b": 0.2, "c": 0.5}), (0.1, {"a": 0.1, "b": 0.1, "c": 1.0})]
AFTER_1 = {"a": 17 / 60, "b": 38 / 60, "c": 5 / 60}
AFTER_2 = {"a": 5 / 13, "b": 8 / 13, "c": 0.0}


def test_the_weights_follow_the_hand_computed_update() -> None:
    w0 = {"a": 0.25, "b": 0.5, "c": 0.25}
    w1 = fairfed_step(w0, ROUNDS[0][1], ROUNDS[0][0], beta=1.0)
    assert w1 == pytest.approx(AFTER_1, abs=1e-12)
    w2 = fairfed_step(w1, ROUNDS[1][1], ROUNDS[1][0], beta=1.0)
    assert w2 == pytest.approx(AFTER_2, abs=1e-12)
    assert Fraction(w2["a"]).limit_denominator(100) == Fraction(5, 13)


def test_undefined_gaps_and_absent_clients_keep_their_weight() -> None:
    w0 = {"a": 0.25, "b": 0.5, "c": 0.25}
    # c is not in the round and b's gap is undefined: only a moves, by Δ_a − mean = 0
    assert fairfed_step(w0, {"a": 0.3, "b": None}, 0.1, beta=1.0) == pytest.approx(w0)
    assert fairfed_step(w0, {"a": 0.3}, None, beta=1.0) == w0
    assert fairfed_step(w0, {"a": 0.3, "b": 0.0}, 0.1, beta=0.0) == w0


class _Script:
    """Gaps read from a list, one entry per round, recording what it was asked."""

    def __init__(self) -> None:
        self.asked: list[list[str]] = []

    def __call__(self, params: Parameters, ids: Sequence[str]) -> tuple[Any, dict[str, Any]]:
        self.asked.append(list(ids))
        return ROUNDS[len(self.asked) - 1]


def _ctx(rnd: int, layout: Layout) -> RoundContext:
    params = Parameters(layout, torch.zeros(layout.size))
    return RoundContext(round=rnd, seed=0, population=3, sampled=3, layout=layout,
                        global_params=params)


def test_the_wrapper_averages_with_the_weights_and_keeps_them_in_its_state() -> None:
    layout = Layout.of({"w": torch.zeros(3)})
    rule = FairFedWeights(weighted_mean(), CLIENTS, SIZES, _Script(), beta=1.0)
    state = rule.init(layout)
    assert state["omega"].tolist() == [0.25, 0.5, 0.25]
    # client k's delta is the k-th unit vector, so the mean is the weight vector itself
    updates = [Update(client_id=c, delta=torch.eye(3)[i], weight=SIZES[i])
               for i, c in enumerate(CLIENTS)]
    for rnd, want in ((1, AFTER_1), (2, AFTER_2)):
        agg, state = rule.aggregate(updates, ctx=_ctx(rnd, layout), state=state)
        expected = torch.tensor([want[c] for c in CLIENTS])
        assert torch.allclose(agg.delta, expected, atol=1e-6)
        assert torch.allclose(state["omega"], expected, atol=1e-6)
        assert agg.info["fairfed_gap"] == ROUNDS[rnd - 1][0]
        assert agg.info["fairfed_weights"] == pytest.approx(want, abs=1e-6)


def test_beta_zero_passes_the_very_same_updates() -> None:
    layout = Layout.of({"w": torch.zeros(3)})
    seen: list[Update] = []

    class Spy:
        name = "spy"
        needs: frozenset[str] = frozenset()

        def aggregate(self, updates: list[Update], *, ctx: RoundContext) -> Aggregate:
            seen.extend(updates)
            return Aggregate(torch.zeros(3), 1.0, len(updates))

    script = _Script()
    rule = FairFedWeights(Spy(), CLIENTS, SIZES, script, beta=0.0)  # type: ignore[arg-type]
    updates = [Update(client_id=c, delta=torch.eye(3)[i], weight=SIZES[i])
               for i, c in enumerate(CLIENTS)]
    rule.aggregate(updates, ctx=_ctx(1, layout), state=rule.init(layout))
    assert all(a is b for a, b in zip(seen, updates)) and len(seen) == 3
    assert script.asked == []  # no evaluation at all


BASE: dict[str, Any] = {"rounds": 3, "evaluation": {"groups": ["sex"], "baselines": []}}
FAIRFED = {**BASE, "fairness": {"method": "fairfed", "column": "sex"}}


def test_beta_zero_is_fedavg_bit_for_bit() -> None:
    plain = simulate(ExperimentConfig.from_dict(BASE), report=False)
    zero = simulate(ExperimentConfig.from_dict(
        {**BASE, "fairness": {"method": "fairfed", "column": "sex", "beta": 0.0}}), report=False)
    assert torch.equal(plain.params.vector, zero.params.vector)
    moved = simulate(ExperimentConfig.from_dict(FAIRFED), report=False)
    assert not torch.equal(plain.params.vector, moved.params.vector)
    weights = moved.history[-1]["fairfed_weights"]
    assert set(weights) == {"cleveland", "hungarian", "switzerland", "va"}
    assert sum(weights.values()) == pytest.approx(1.0, abs=1e-5)


def test_sequential_and_vectorized_agree() -> None:
    ref = simulate(ExperimentConfig.from_dict({**FAIRFED, "executor": {"kind": "sequential"}}),
                   report=False)
    got = simulate(ExperimentConfig.from_dict({**FAIRFED, "executor": {"kind": "vectorized"}}),
                   report=False)
    assert torch.allclose(got.params.vector, ref.params.vector, atol=1e-5)
    for a, b in zip(ref.history, got.history):
        assert a["fairfed_weights"] == pytest.approx(b["fairfed_weights"], abs=1e-4)


class _StopAfter:
    def __init__(self, rounds: int) -> None:
        self.rounds = rounds

    def on_round_end(self, record: dict[str, Any], state: Any) -> None:
        if record["round"] == self.rounds:
            raise KeyboardInterrupt


def test_resume_keeps_the_weights(tmp_path: Path) -> None:
    whole = simulate(ExperimentConfig.from_dict(FAIRFED), report=False)
    with pytest.raises(KeyboardInterrupt):
        simulate(ExperimentConfig.from_dict(FAIRFED), out=tmp_path / "run",
                 callbacks=[_StopAfter(2)], report=False)
    resumed = simulate(resume=tmp_path / "run", report=False)
    assert torch.equal(whole.params.vector, resumed.params.vector)
    assert resumed.history[-1]["fairfed_weights"] == whole.history[-1]["fairfed_weights"]


@pytest.mark.parametrize("change", [
    {"secure_aggregation": {"enabled": True}},
    {"privacy": {"mode": "central", "noise_multiplier": 1.0, "clip": 1.0}},
    {"aggregation": {"rule": "median"}},
    {"fairness": {"method": "fairfed", "column": "sex", "beta": -1.0}},
])
def test_refused_where_the_weights_cannot_apply(change: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="fairness"):
        ExperimentConfig.from_dict({**FAIRFED, **change})


def test_refused_over_grpc() -> None:
    from consortium.executors.sequential import SequentialExecutor

    class Remote(SequentialExecutor):
        name = "remote"

    with pytest.raises(ConfigError, match=r"\[fairness\] run in simulation only"):
        simulate(ExperimentConfig.from_dict(FAIRFED), executor=Remote(), report=False)
