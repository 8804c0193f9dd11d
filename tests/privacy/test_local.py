"""Local DP-SGD: per-example clipping, noise of the stated size, per-site accounting."""

from __future__ import annotations

import math

import dp_accounting
import pytest
import torch

import consortium
from consortium.client.dp_sgd import poisson_batches, private_step
from consortium.client.training import LocalTraining, planned_steps
from consortium.data.base import Split
from consortium.executors import SequentialExecutor, VectorizedExecutor
from tests.conftest import make_toy


def linear(d: int = 5, k: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(d, k))


def flat_grad(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in module.parameters()])


def test_without_clipping_or_noise_it_is_the_mean_gradient() -> None:
    g = torch.Generator().manual_seed(1)
    data = Split(torch.randn(8, 5, generator=g), torch.randint(0, 2, (8,), generator=g))
    module = linear()
    idx = torch.tensor([0, 2, 3, 7])
    private_step(module, data, idx, loss_fn=torch.nn.functional.cross_entropy, clip=1e6,
                 noise_multiplier=1e-12, expected_batch=4.0, seed=0, step=0)
    dp = flat_grad(module)
    module.zero_grad()
    torch.nn.functional.cross_entropy(module(data.x[idx]), data.y[idx]).backward()
    assert torch.allclose(dp, flat_grad(module), atol=1e-6)


def test_each_example_is_clipped_to_the_bound() -> None:
    g = torch.Generator().manual_seed(2)
    data = Split(10 * torch.randn(6, 5, generator=g), torch.randint(0, 2, (6,), generator=g))
    module = linear()
    clip = 1e-3
    private_step(module, data, torch.arange(6), loss_fn=torch.nn.functional.cross_entropy,
                 clip=clip, noise_multiplier=1e-12, expected_batch=1.0, seed=0, step=0)
    # the sum of 6 clipped gradients cannot be longer than 6·clip
    assert float(torch.linalg.vector_norm(flat_grad(module))) <= 6 * clip + 1e-9


def test_noise_has_the_stated_standard_deviation() -> None:
    d = 200
    module = torch.nn.Sequential(torch.nn.Linear(d, 100))  # 20,100 parameters
    data = Split(torch.zeros(1, d), torch.zeros(1, dtype=torch.long))
    z, clip, expected = 1.5, 0.8, 4.0
    private_step(module, data, torch.tensor([], dtype=torch.long),
                 loss_fn=torch.nn.functional.cross_entropy, clip=clip, noise_multiplier=z,
                 expected_batch=expected, seed=3, step=0)
    grad = flat_grad(module).double()
    assert float(grad.std()) == pytest.approx(z * clip / expected, rel=0.03)


def test_poisson_batches_have_the_expected_size_and_repeat() -> None:
    batches = poisson_batches(1000, 200, 0.05, seed=4)
    sizes = torch.tensor([len(b) for b in batches], dtype=torch.float64)
    assert float(sizes.mean()) == pytest.approx(50, rel=0.05)
    assert all(torch.equal(a, b) for a, b in zip(batches, poisson_batches(1000, 200, 0.05, seed=4)))


LOCAL = {
    "rounds": 3,
    "algorithm": {"lr": 0.1, "batch_size": 16},
    "privacy": {"mode": "local", "noise_multiplier": 1.2, "clip": 1.0},
}


def test_per_site_epsilon_is_dp_accountings(tmp_path) -> None:
    toy = make_toy(3, sizes=[40, 64, 30])
    result = consortium.simulate(LOCAL, dataset=toy, out=tmp_path / "r", report=False)
    spent = result.summary["privacy"]["site_epsilon"]
    for cid, n in (("c0", 40), ("c1", 64), ("c2", 30)):
        steps = 3 * planned_steps(n, LocalTraining(batch_size=16))
        acc = dp_accounting.rdp.RdpAccountant()
        acc.compose(dp_accounting.PoissonSampledDpEvent(16 / n, dp_accounting.GaussianDpEvent(1.2)), steps)
        assert spent[cid] == pytest.approx(acc.get_epsilon(1e-5), rel=1e-6)
    assert result.history[-1]["epsilon"] == pytest.approx(max(spent.values()))
    assert (tmp_path / "r" / "privacy.json").exists()


@pytest.mark.parametrize("model", [{"name": "logistic"}, {"name": "mlp", "hidden": [6]}])
@pytest.mark.parametrize("algorithm", ["fedavg", "scaffold"])
def test_vectorised_dp_sgd_equals_the_sequential_one(capsys, model, algorithm) -> None:
    toy = make_toy(4, sizes=[40, 64, 30, 17])
    cfg = {**LOCAL, "model": model, "algorithm": {**LOCAL["algorithm"], "name": algorithm,
                                                  "momentum": 0.5}}
    a = consortium.simulate(cfg, dataset=toy, executor=SequentialExecutor())
    b = consortium.simulate(cfg, dataset=toy, executor=VectorizedExecutor())
    assert torch.allclose(a.params.vector, b.params.vector, atol=1e-5, rtol=0)
    assert "cannot batch" not in capsys.readouterr().err
    for ra, rb in zip(a.history, b.history):
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], abs=1e-5)
    assert math.isfinite(a.summary["final"]["accuracy"])


@pytest.mark.parametrize("executor", [SequentialExecutor, VectorizedExecutor])
def test_site_budget_under_local_dp(tmp_path, executor) -> None:
    from consortium.privacy.accountant import RoundMechanism, epsilon

    toy = make_toy(3, sizes=[32, 48, 64])
    per_round = planned_steps(32, LocalTraining(batch_size=16))  # c0: 2 steps a round
    mech = RoundMechanism(1.2, "poisson", rate=16 / 32)
    budget = (epsilon(mech, 2 * per_round, 1e-5) + epsilon(mech, 3 * per_round, 1e-5)) / 2
    policies = tmp_path / "p.toml"
    policies.write_text(f"[sites.c0]\nmax_epsilon = {budget}\n")
    cfg = {**LOCAL, "rounds": 4, "privacy": {**LOCAL["privacy"], "site_policies": str(policies)}}
    result = consortium.simulate(cfg, dataset=toy, executor=executor())
    rounds_in = [r["round"] for r in result.history if "c0" not in r.get("failed", {})]
    assert rounds_in == [1, 2]
    assert "DP-SGD steps" in result.history[2]["failed"]["c0"]
    assert result.summary["privacy"]["site_epsilon"]["c0"] <= budget
