"""Centered clipping's worker momentum (Karimireddy, He, Jaggi 2021, Algorithm 2), kept by the
server per client: hand-computed rounds, absent clients, checkpoints old and new, resume."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

import consortium
from consortium.aggregation.base import PipelineState, RoundContext
from consortium.aggregation.robust import CenteredClipping, centered_clipping, make_rule
from consortium.client.state import ClientStateStore
from consortium.errors import PipelineError
from consortium.server.checkpoint import load_checkpoint, save_checkpoint
from consortium.server.loop import RunState
from consortium.types import Layout, Parameters, TensorSpec, Update
from tests.conftest import make_toy


def layout(d: int) -> Layout:
    return Layout((TensorSpec("w", (d,), torch.float32),))


def ctx(d: int, round: int = 1) -> RoundContext:
    return RoundContext(round=round, seed=7, population=10, sampled=3, layout=layout(d))


def ups(rows: dict[str, list[float]]) -> list[Update]:
    return [Update(k, torch.tensor(v, dtype=torch.float32), 1.0) for k, v in rows.items()]


def step(
    rule: CenteredClipping, rows: dict[str, list[float]], state: dict[str, Any], round: int = 1
) -> tuple[Any, dict[str, Any]]:
    d = len(next(iter(rows.values())))
    return rule.aggregate(ups(rows), ctx=ctx(d, round), state=state)


def close(t: torch.Tensor, expected: list[float], tol: float = 1e-6) -> bool:
    return t.tolist() == pytest.approx(expected, abs=tol)


def test_two_rounds_of_three_clients_by_hand() -> None:
    rule = centered_clipping(tau=1.0, worker_momentum=0.5)
    state = rule.init(layout(2))
    assert set(state) == {"center", "momenta"} and state["momenta"] == {}
    # Round 1, every client new: mᵢ = Δᵢ. Center 0, τ = 1: a = (2, 0) is clipped to (1, 0),
    # b at distance exactly 1 is not; v = ((1, 0) + (0, 1) + (0, −0.5)) / 3 = (1/3, 1/6).
    out, state1 = step(rule, {"a": [2, 0], "b": [0, 1], "c": [0, -0.5]}, state)
    assert close(out.delta, [1 / 3, 1 / 6])
    assert out.info["robust_flagged"] == ["a"] and out.info["robust_weights"] == {"a": 0.5}
    assert close(state1["center"], [1 / 3, 1 / 6])
    assert {k: v.tolist() for k, v in state1["momenta"].items()} == {
        "a": [2, 0], "b": [0, 1], "c": [0, -0.5]
    }
    # Round 2: m = 0.5·m + 0.5·Δ: a = (1, 0), b = (0, 2), c = (0.5, −0.5). Their distances to
    # v = (1/3, 1/6): a (2/3, −1/6) and c (1/6, −2/3) are √17/6 ≈ 0.69 and stay; b (−1/3, 11/6)
    # is √125/6 ≈ 1.86, clipped to (−2, 11)/√125. v' = v + (sum of the three) / 3.
    out, state2 = step(rule, {"a": [0, 0], "b": [0, 3], "c": [1, -0.5]}, state1, round=2)
    r = math.sqrt(125)
    expected = [1 / 3 + (5 / 6 - 2 / r) / 3, 1 / 6 + (-5 / 6 + 11 / r) / 3]
    assert close(out.delta, expected)
    assert out.info["robust_flagged"] == ["b"]
    assert out.info["robust_weights"] == {"b": pytest.approx(6 / r, abs=1e-3)}
    assert {k: v.tolist() for k, v in state2["momenta"].items()} == {
        "a": [1, 0], "b": [0, 2], "c": [0.5, -0.5]
    }
    # the same second round on the raw updates (no worker momentum) is another aggregate
    plain, _ = step(centered_clipping(tau=1.0), {"a": [0, 0], "b": [0, 3], "c": [1, -0.5]},
                    {"center": state1["center"]})
    assert not close(plain.delta, expected, tol=1e-2)


def test_one_dimension_and_the_states_given_are_left_alone() -> None:
    # β = 0.75, τ = ∞ (the plain mean of the momenta)
    rule = centered_clipping(tau=math.inf, worker_momentum=0.75, f=0)
    state0 = rule.init(layout(1))
    _, state1 = step(rule, {"a": [4.0], "b": [8.0], "c": [0.0]}, state0)
    kept = {k: v.clone() for k, v in state1["momenta"].items()}
    out, state2 = step(rule, {"a": [0.0], "b": [0.0], "c": [4.0]}, state1, round=2)
    # a: 0.75·4 = 3; b: 0.75·8 = 6; c: 0.25·4 = 1 → mean 10/3
    assert close(out.delta, [10 / 3])
    assert torch.equal(state0["center"], torch.zeros(1)) and state0["momenta"] == {}
    assert all(torch.equal(state1["momenta"][k], kept[k]) for k in kept), "changed its input"
    assert all(v.dtype == torch.float32 for v in state2["momenta"].values())
    assert state2["center"].dtype == torch.float32


def test_a_client_absent_from_a_round_keeps_its_momentum() -> None:
    rule = centered_clipping(tau=math.inf, worker_momentum=0.5, f=0)
    _, s1 = step(rule, {"a": [2.0, 0.0], "b": [0.0, 4.0], "c": [1.0, 1.0]}, rule.init(layout(2)))
    # b sits out round 2; d is new and starts at its update
    out, s2 = step(rule, {"a": [0.0, 0.0], "c": [3.0, 1.0], "d": [0.0, -6.0]}, s1, round=2)
    assert sorted(s2["momenta"]) == ["a", "b", "c", "d"]
    assert torch.equal(s2["momenta"]["b"], s1["momenta"]["b"])  # untouched
    assert s2["momenta"]["d"].tolist() == [0.0, -6.0]
    # only the round's clients are aggregated: (1, 0), (2, 1), (0, −6) → mean (1, −5/3)
    assert close(out.delta, [1.0, -5 / 3])
    # b comes back two rounds after its last update: 0.5·(0, 4) + 0.5·(2, 2)
    _, s3 = step(rule, {"a": [0.0, 0.0], "b": [2.0, 2.0], "c": [0.0, 0.0]}, s2, round=3)
    assert s3["momenta"]["b"].tolist() == [1.0, 3.0]
    assert torch.equal(s3["momenta"]["d"], s2["momenta"]["d"])


def test_an_update_dropped_as_non_finite_leaves_its_momentum_unchanged() -> None:
    rule = centered_clipping(tau=math.inf, worker_momentum=0.5, f=1)
    _, s1 = step(rule, {"a": [1.0], "b": [2.0], "c": [3.0], "d": [4.0]}, rule.init(layout(1)))
    out, s2 = step(rule, {"a": [float("nan")], "b": [2.0], "c": [3.0], "d": [4.0]}, s1, round=2)
    assert out.info["robust_non_finite"] == ["a"]
    assert torch.equal(s2["momenta"]["a"], s1["momenta"]["a"])
    assert all(bool(torch.isfinite(v).all()) for v in s2["momenta"].values())


def run_state(agg_state: dict[str, Any], d: int) -> RunState:
    params = Parameters(layout(d), torch.zeros(d))
    return RunState(round=1, params=params, pipeline=PipelineState((), {}, agg_state), algorithm={})


def test_the_momenta_survive_a_checkpoint(tmp_path) -> None:
    rule = centered_clipping(worker_momentum=0.9)
    g = torch.Generator().manual_seed(0)
    first = {f"site/{i}": (torch.randn(6, generator=g)).tolist() for i in range(5)}
    _, s1 = step(rule, first, rule.init(layout(6)))
    save_checkpoint(tmp_path / "ck", run_state(s1, 6), ClientStateStore())
    loaded, _ = load_checkpoint(tmp_path / "ck", layout=layout(6), rounds=3)
    back = loaded.pipeline.aggregator
    assert sorted(back["momenta"]) == sorted(first)  # ids with "/" in them too
    assert all(torch.equal(back["momenta"][k], s1["momenta"][k]) for k in first)
    second = {k: (torch.randn(6, generator=g)).tolist() for k in first}
    direct, d2 = step(rule, second, s1, round=2)
    resumed, r2 = step(rule, second, back, round=2)
    assert torch.equal(direct.delta, resumed.delta)
    assert all(torch.equal(d2["momenta"][k], r2["momenta"][k]) for k in first)


def test_a_state_from_before_worker_momentum_starts_every_client_afresh() -> None:
    # an old checkpoint holds only the center: the first round is plain centered clipping
    # around it, and the new state carries the clients' updates as their momenta
    center = torch.tensor([0.5, -0.5])
    rows = {"a": [3.0, 0.0], "b": [0.0, 1.0], "c": [1.0, 2.0]}
    new, state = step(centered_clipping(worker_momentum=0.9), rows, {"center": center})
    old, _ = step(centered_clipping(), rows, {"center": center})
    assert torch.equal(new.delta, old.delta)
    assert {k: v.tolist() for k, v in state["momenta"].items()} == rows


def test_bad_momenta_in_the_state_are_refused() -> None:
    rule = centered_clipping(worker_momentum=0.5)
    rows = {"a": [1.0, 2.0], "b": [2.0, 3.0], "c": [0.0, 0.0]}
    with pytest.raises(PipelineError, match="momentum .*client 'a', expected a vector of 2"):
        step(rule, rows, {"center": torch.zeros(2), "momenta": {"a": torch.zeros(3)}})
    with pytest.raises(PipelineError, match="momenta of type list"):
        step(rule, rows, {"center": torch.zeros(2), "momenta": []})


@pytest.mark.parametrize("beta", [1.0, -0.1, True, "0.9"])
def test_worker_momentum_out_of_range_is_refused(beta: Any) -> None:
    with pytest.raises(PipelineError, match=r"worker_momentum = .* must be in \[0, 1\)"):
        make_rule("centered-clipping", worker_momentum=beta)


def test_off_by_default_and_named_in_the_registry() -> None:
    assert centered_clipping().worker_momentum == 0.0
    assert "momenta" not in centered_clipping().init(layout(3))
    assert make_rule("centered_clipping", worker_momentum=0.9).worker_momentum == 0.9


def test_momentum_removes_the_noise_that_lets_attackers_pull() -> None:
    # The paper's setting: honest clients send g plus fresh noise each round, two of ten send
    # −10 × the honest mean (IPM, Xie et al. 2020). With noise σ·√d ≫ ‖g‖ the clipped
    # aggregate falls short of g by about f/(n − f) of the honest spread; momentum shrinks
    # the spread and with it the shortfall.
    d, rounds = 20, 30
    g = torch.full((d,), 0.1)

    def last_error(beta: float) -> float:
        rule = centered_clipping(worker_momentum=beta, f=2)
        state = rule.init(layout(d))
        gen = torch.Generator().manual_seed(3)
        for t in range(1, rounds + 1):
            honest = g + torch.randn(8, d, generator=gen)
            rows = {f"h{i}": honest[i].tolist() for i in range(8)}
            rows |= {f"z{i}": (-10 * honest.mean(0)).tolist() for i in range(2)}
            out, state = rule.aggregate(ups(rows), ctx=ctx(d, t), state=state)
        return float((out.delta - g).norm())

    plain, momentum = last_error(0.0), last_error(0.9)
    assert momentum < 0.5 * plain, (plain, momentum)


def test_a_sampled_run_with_worker_momentum_resumes_to_the_same_model(tmp_path) -> None:
    # three of six clients a round, so clients sit out rounds and come back
    cfg = {"rounds": 4, "seed": 1, "sampling": {"clients_per_round": 3},
           "executor": {"kind": "sequential"}, "algorithm": {"lr": 0.3},
           "aggregation": {"rule": "centered-clipping", "worker_momentum": 0.9}}
    whole = consortium.simulate(cfg, dataset=make_toy(6))
    consortium.simulate({**cfg, "rounds": 2}, dataset=make_toy(6), out=tmp_path / "r", report=False)
    state, _ = load_checkpoint(tmp_path / "r" / "checkpoint")
    assert 3 <= len(state.pipeline.aggregator["momenta"]) <= 6
    text = (tmp_path / "r" / "config.toml").read_text().replace("rounds = 2", "rounds = 4")
    (tmp_path / "r" / "config.toml").write_text(text)
    resumed = consortium.simulate(resume=tmp_path / "r", dataset=make_toy(6), report=False)
    assert torch.equal(whole.params.vector, resumed.params.vector)
