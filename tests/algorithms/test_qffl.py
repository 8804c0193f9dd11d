"""q-FFL / q-FedAvg (Li et al. 2020): a hand-computed client update and server step, q = 0
is FedAvg with equal client weights, and q > 0 moves the model toward high-loss clients."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from consortium import simulate
from consortium.aggregation.base import Aggregate, Pipeline, RoundContext
from consortium.algorithms import QFedAvg, build_algorithm
from consortium.algorithms.base import LocalResult, TrainContext
from consortium.client.training import LocalTraining
from consortium.config import ExperimentConfig
from consortium.data.base import Split
from consortium.errors import ConfigError
from consortium.federation import Given, assemble
from consortium.types import Parameters
from tests.algorithms.test_equivalences import EQUAL, UNEQUAL, UpdateLog


def mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out - y) ** 2).mean()


def context(x: list[float], *, lr: float) -> TrainContext:
    module = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        module.weight.fill_(1.0)
    data = Split(torch.tensor(x).view(-1, 1), torch.zeros(len(x), 1))
    return TrainContext(
        client_id="c", module=module, global_params=Parameters.from_module(module), data=data,
        settings=LocalTraining(lr=lr), loss_fn=mse, seed=0,
    )


def test_client_update_by_hand() -> None:
    # w = 1, F = mean((x·1)²) over x = 1, 2: 2.5; L = 1/lr = 2; w̄ − w = −0.25 ⇒ Δ = 0.5
    ctx = context([1.0, 2.0], lr=0.5)
    update = QFedAvg(q=2).make_update(ctx, LocalResult(torch.tensor([-0.25]), 1, 0.0, 2))
    assert update.weight == 1.0
    assert update.delta.item() == pytest.approx(-(2.5**2) * 0.5)  # −F^q Δ
    h = 2 * 2.5 * 0.5**2 + 2 * 2.5**2  # q F^{q−1} ‖Δ‖² + L F^q = 1.25 + 12.5
    assert update.extras["qffl.h"].item() == pytest.approx(h)
    assert update.extras["qffl.loss"].item() == pytest.approx(2.5)


def test_loss_is_taken_at_the_global_model_not_the_trained_one() -> None:
    # Algorithm 2 weights client k by F_k(w^t), its loss BEFORE local training. The module
    # arrives holding the trained w̄ = 0.75 (loss mean((0.75·x)²) = 1.40625); F must be 2.5.
    ctx = context([1.0, 2.0], lr=0.5)
    with torch.no_grad():
        ctx.module.weight.fill_(0.75)
    update = QFedAvg(q=1).make_update(ctx, LocalResult(torch.tensor([-0.25]), 1, 0.0, 2))
    assert update.extras["qffl.loss"].item() == pytest.approx(2.5)
    assert update.delta.item() == pytest.approx(-2.5 * 0.5)  # −F^q Δ with F = 2.5, Δ = 0.5
    # h = q F^{q−1} ‖Δ‖² + L F^q = 1 · 1 · 0.25 + 2 · 2.5
    assert update.extras["qffl.h"].item() == pytest.approx(0.25 + 5.0)


def test_server_step_by_hand() -> None:
    # two clients: F^qΔ = 3 and −1, h = 4 and 6 ⇒ w ← w − (3 − 1)/10, the step is −0.2
    deltas, hs = torch.tensor([[-3.0], [1.0]]), [4.0, 6.0]
    agg = Aggregate(delta=deltas.mean(0), weight=2.0, count=2,
                    extras={"qffl.h": torch.tensor([sum(hs)])})
    ctx = RoundContext(round=1, seed=0, population=2, sampled=2,
                       layout=Parameters.from_module(torch.nn.Linear(1, 1, bias=False)).layout)
    step, _ = QFedAvg(q=1).server_step(agg, {}, ctx)
    assert step.item() == pytest.approx(-0.2)
    empty = Aggregate(delta=torch.zeros(1), weight=0.0, count=0, extras={})
    assert QFedAvg().server_step(empty, {}, ctx)[0].item() == 0.0


def test_q_zero_weights_every_client_by_L() -> None:
    ctx = context([1.0, 2.0], lr=0.25)
    update = QFedAvg(q=0).make_update(ctx, LocalResult(torch.tensor([-0.5]), 1, 0.0, 2))
    assert update.extras["qffl.h"].item() == pytest.approx(4.0)  # L
    assert update.delta.item() == pytest.approx(-0.5 * 4.0)  # L(w̄ − w)


def config(name: str, **algorithm: Any) -> dict[str, Any]:
    return {
        "name": f"q-{name}", "seed": 0, "rounds": 3, "model": {"name": "logistic"},
        "algorithm": {"name": name, "lr": 0.1, "batch_size": 8, **algorithm},
    }


def test_q_zero_equals_fedavg_on_equal_clients() -> None:
    fedavg = simulate(config("fedavg"), dataset=EQUAL, report=False).params.vector
    qffl = simulate(config("qffl", q=0.0), dataset=EQUAL, report=False).params.vector
    assert torch.allclose(fedavg, qffl, atol=1e-6, rtol=0)
    q2 = simulate(config("qffl", q=2.0), dataset=EQUAL, report=False).params.vector
    assert not torch.allclose(fedavg, q2, atol=1e-3)


def test_q_is_checked() -> None:
    assert build_algorithm("qffl", q=5.0) == QFedAvg(q=5.0)
    with pytest.raises(ConfigError, match="algorithm.q"):
        QFedAvg(q=-1.0)


def test_one_round_end_to_end_is_algorithm_2() -> None:
    # One round, every client, through simulate (pipeline sums of the extras, server step,
    # server optimiser): the new model must be Algorithm 2's, recomputed here from each
    # client's local model w̄_k (FedAvg's updates: the same local training) and F_k(w⁰).
    q, lr = 2.0, 0.1
    cfg = {**config("fedavg"), "rounds": 1}
    log = UpdateLog()
    simulate(cfg, dataset=UNEQUAL, report=False, pipeline=Pipeline([log]))
    fed = assemble(ExperimentConfig.from_dict(cfg), Given(dataset=UNEQUAL))
    w0, model = fed.init.vector.double(), fed.factory()
    fed.init.load_into(model)
    num, den = torch.zeros_like(w0), 0.0
    for cid, data in UNEQUAL.clients.items():
        with torch.no_grad():
            loss = float(torch.nn.functional.cross_entropy(model(data.train.x), data.train.y))
        grad = -log.seen[(1, cid)].double() / lr  # Δw_k = L(w − w̄_k), L = 1/lr
        num += loss**q * grad
        den += q * loss ** (q - 1) * float(grad.square().sum()) + loss**q / lr
    expected = w0 - num / den
    got = simulate(config("qffl", q=q) | {"rounds": 1}, dataset=UNEQUAL, report=False).params.vector
    assert torch.allclose(got.double(), expected, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(got.double(), w0 + sum(log.seen[(1, c)].double() for c in
                                                     UNEQUAL.clients) / 4, atol=1e-4)
