"""``evaluation.clients``: a seeded sample per round, every client at the end, and the
sampling error of the weighted means (Cochran's ratio estimator)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from consortium import simulate
from consortium.config import ExperimentConfig
from consortium.errors import ConfigError
from consortium.messages import EvaluationResult
from consortium.seeds import derive_seed
from consortium.server.evaluation import Evaluator, draw_clients, pps_estimate
from tests.conftest import make_toy

ACCURACY = {"a": 0.5, "b": 1.0, "c": 0.8, "d": 0.6}
TEST_SIZE = {"a": 10, "b": 20, "c": 5, "d": 15}


class FixedScores:
    """An executor whose clients report fixed accuracies (records whom it was asked)."""

    def __init__(self) -> None:
        self.asked: list[list[str]] = []

    def evaluate(self, tasks, clients):
        self.asked.append([t.client_id for t in tasks])
        for t in tasks:
            yield EvaluationResult(t.round, t.client_id, TEST_SIZE[t.client_id],
                                   {"accuracy": ACCURACY[t.client_id]})


CLIENTS = {c: SimpleNamespace(data=SimpleNamespace(test=range(n))) for c, n in TEST_SIZE.items()}


def _evaluator(clients: float) -> Evaluator:
    return Evaluator(lambda: torch.nn.Linear(1, 2), torch.nn.functional.cross_entropy, 2,
                     clients=clients, seed=5, final_round=10)


def _params():
    from consortium.types import Parameters

    return Parameters.from_module(torch.nn.Linear(1, 2))


def test_pps_estimate_by_hand() -> None:
    # draws a, b, b, c: accuracies 0.5, 1.0, 1.0, 0.8 → R̂ = 3.3/4 = 0.825;
    # Σ(m − R̂)² = 0.325² + 2·0.175² + 0.025² = 0.1675; se = sqrt(0.1675 / (4·3))
    estimate, se = pps_estimate([0.5, 1.0, 1.0, 0.8])
    assert estimate == pytest.approx(0.825, abs=1e-15)
    assert se == pytest.approx(math.sqrt(0.1675 / 12), rel=1e-12)
    assert pps_estimate([0.75, 0.75, 0.75]) == (0.75, 0.0)  # no spread, no error
    assert math.isnan(pps_estimate([0.5])[1])  # one draw: nothing to estimate a spread from


def test_draws_are_proportional_to_test_examples_and_seeded() -> None:
    sizes = [10, 20, 5, 15]
    picks = draw_clients(sizes, 50_000, seed=1)
    shares = torch.bincount(torch.tensor(picks), minlength=4).double() / len(picks)
    assert shares.tolist() == pytest.approx([0.2, 0.4, 0.1, 0.3], abs=0.01)
    assert draw_clients(sizes, 20, seed=7) == draw_clients(sizes, 20, seed=7)
    assert draw_clients(sizes, 20, seed=7) != draw_clients(sizes, 20, seed=8)
    assert 2 not in draw_clients([3, 4, 0], 200, seed=0)  # no test examples, never drawn


def test_the_standard_error_is_honest_on_skewed_clients() -> None:
    # 60 clients with power-law test sizes (one holds 71 % of the rows), 4,000 samples of 50
    # draws:
    # the estimate is unbiased, its stated variance matches its actual variance, and nominal
    # 95 % intervals hold the true weighted accuracy about 95 % of the time
    g = torch.Generator().manual_seed(0)
    sizes = (5 / torch.rand(60, generator=g, dtype=torch.float64) ** 1.2).round().tolist()
    accuracy = 0.4 + 0.55 * torch.rand(60, generator=g, dtype=torch.float64)
    a = torch.tensor(sizes, dtype=torch.float64)
    truth = float((accuracy * a).sum() / a.sum())
    estimates, variances, covered = [], [], 0
    for i in range(4000):
        picks = draw_clients(sizes, 50, seed=i)
        estimate, se = pps_estimate(accuracy[picks].tolist())
        estimates.append(estimate)
        variances.append(se**2)
        covered += abs(estimate - truth) <= 1.96 * se
    e = torch.tensor(estimates, dtype=torch.float64)
    assert float(e.mean()) == pytest.approx(truth, abs=3 * float(e.std()) / 4000**0.5)
    assert sum(variances) / len(variances) == pytest.approx(float(e.var()), rel=0.1)
    assert 0.92 <= covered / 4000 <= 0.97  # 20 draws here: 0.89 (the normal interval is
    # optimistic for few draws dominated by one client; the variance itself stays unbiased)


def test_a_sampled_round_estimates_from_the_draws_and_states_the_error() -> None:
    executor = FixedScores()
    metrics, per_client = _evaluator(3).evaluate(3, _params(), executor=executor, clients=CLIENTS)
    picks = [list(CLIENTS)[i] for i in draw_clients(
        list(TEST_SIZE.values()), 3, seed=derive_seed(5, "evaluation", 3))]
    (asked,) = executor.asked
    assert asked == [c for c in CLIENTS if c in picks]  # each drawn client evaluated once
    assert set(per_client) == set(picks)
    estimate, se = pps_estimate([ACCURACY[c] for c in picks])
    assert metrics["accuracy"] == estimate
    assert metrics["accuracy_se"] == se
    assert metrics["evaluated_clients"] == len(set(picks))
    # seeded: the same round draws the same clients; the final round evaluates every client
    again = FixedScores()
    _evaluator(3).evaluate(3, _params(), executor=again, clients=CLIENTS)
    assert again.asked == [asked]
    final = FixedScores()
    metrics, _ = _evaluator(3).evaluate(10, _params(), executor=final, clients=CLIENTS)
    assert final.asked == [list(CLIENTS)]
    assert "evaluated_clients" not in metrics and "accuracy_se" not in metrics  # a census


def test_a_fraction_rounds_up() -> None:
    executor = FixedScores()
    metrics, _ = _evaluator(0.3).evaluate(1, _params(), executor=executor, clients=CLIENTS)
    assert 1 <= len(executor.asked[0]) <= 2  # ceil(0.3 · 4) = 2 draws


def test_clients_equal_to_the_population_is_the_full_evaluation() -> None:
    full, _ = _evaluator(0).evaluate(3, _params(), executor=FixedScores(), clients=CLIENTS)
    for n in (4, 9):  # a count above the population is every client too
        every, _ = _evaluator(n).evaluate(3, _params(), executor=FixedScores(), clients=CLIENTS)
        assert every == full
    assert full["accuracy"] == pytest.approx(
        sum(ACCURACY[c] * TEST_SIZE[c] for c in CLIENTS) / sum(TEST_SIZE.values()))


def test_a_simulation_with_every_client_sampled_equals_the_default() -> None:
    cfg = {"rounds": 3, "seed": 2, "algorithm": {"lr": 0.1, "batch_size": 16}}
    base = simulate(cfg, dataset=make_toy())
    same = simulate({**cfg, "evaluation": {"clients": 4}}, dataset=make_toy())
    assert torch.equal(base.params.vector, same.params.vector)
    for a, b in zip(base.history, same.history, strict=True):
        assert {k: v for k, v in b.items() if k != "wall_s"} == {
            k: v for k, v in a.items() if k != "wall_s"}
    sampled = simulate({**cfg, "evaluation": {"clients": 2}}, dataset=make_toy())
    assert [r.get("evaluated_clients", 4) <= 2 for r in sampled.history] == [True, True, False]
    # equal test sets: two draws of accuracies a, b give (a + b)/2 ± |a − b|/2
    for r in sampled.history[:2]:
        low = r["accuracy_min"]
        high = 2 * r["accuracy"] - low if r["evaluated_clients"] == 2 else low
        assert r["accuracy_se"] == pytest.approx((high - low) / 2)
    assert torch.equal(base.params.vector, sampled.params.vector)  # training is untouched
    assert sampled.history[-1]["accuracy"] == base.history[-1]["accuracy"]


@pytest.mark.parametrize("bad", [-1, 1.5, 2.5])
def test_bad_counts_are_refused(bad) -> None:
    with pytest.raises(ConfigError, match="evaluation.clients"):
        ExperimentConfig.from_dict({"evaluation": {"clients": bad}})
