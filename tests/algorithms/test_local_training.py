"""The local loop: one SGD step by hand, momentum and weight decay, step arithmetic, NaN loss."""

from __future__ import annotations

import pytest
import torch

from consortium.algorithms import FedAvg, TrainContext
from consortium.client.training import (
    LocalTraining,
    PlainSGD,
    batch_indices,
    make_optimizer,
    planned_steps,
    steps_for_work,
    train_locally,
)
from consortium.data.base import Split
from consortium.errors import ClientError
from consortium.types import Parameters

# Two examples: x = (1, 2) with target 1 and x = (3, -1) with target 0.
DATA = Split(torch.tensor([[1.0, 2.0], [3.0, -1.0]]), torch.tensor([1, 0]))


def linear(w: tuple[float, float] = (0.5, -1.0), b: float = 0.25) -> torch.nn.Linear:
    module = torch.nn.Linear(2, 1)
    with torch.no_grad():
        module.weight.copy_(torch.tensor([w]))
        module.bias.copy_(torch.tensor([b]))
    return module


def squared_error(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out.squeeze(1) - y.float()) ** 2).mean()


def output_sum(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A loss with a constant gradient: d/dw = Σ x = (4, 1), d/db = n = 2."""
    return out.sum()


def weights(module: torch.nn.Linear) -> tuple[list[float], float]:
    return module.weight.detach()[0].tolist(), float(module.bias.detach()[0])


def test_one_full_batch_sgd_step_by_hand() -> None:
    module = linear()
    stats = train_locally(
        module, DATA, LocalTraining(batch_size=2, lr=0.1), loss_fn=squared_error, seed=0, steps=1
    )
    # outputs: 0.5·1 - 1·2 + 0.25 = -1.25 and 0.5·3 - 1·(-1) + 0.25 = 2.75
    # residuals r = (-1.25 - 1, 2.75 - 0) = (-2.25, 2.75);  loss = (2.25² + 2.75²)/2 = 6.3125
    # ∇w = (2/n) Σ r x = -2.25·(1, 2) + 2.75·(3, -1) = (6, -7.25);  ∇b = Σ r = 0.5
    # w ← (0.5, -1) - 0.1·(6, -7.25) = (-0.1, -0.275);  b ← 0.25 - 0.1·0.5 = 0.2
    w, b = weights(module)
    assert w == pytest.approx([-0.1, -0.275], abs=1e-6)
    assert b == pytest.approx(0.2, abs=1e-6)
    assert stats.steps == 1 and stats.examples == 2
    assert stats.mean_loss == pytest.approx(6.3125)


def test_momentum_reaches_the_optimizer() -> None:
    module = linear()
    train_locally(
        module,
        DATA,
        LocalTraining(batch_size=2, lr=0.1, momentum=0.5),
        loss_fn=output_sum,
        seed=0,
        steps=2,
    )
    # buffer: g, then 0.5·g + g; total move 0.1·(1 + 1.5)·g = 0.25·g with g = ((4, 1), 2)
    # w = (0.5 - 1, -1 - 0.25) = (-0.5, -1.25);  b = 0.25 - 0.5 = -0.25   [no momentum: 0.2·g]
    w, b = weights(module)
    assert w == pytest.approx([-0.5, -1.25], abs=1e-6)
    assert b == pytest.approx(-0.25, abs=1e-6)


def test_weight_decay_reaches_the_optimizer() -> None:
    module = linear()
    train_locally(
        module,
        DATA,
        LocalTraining(batch_size=2, lr=0.1, weight_decay=0.5),
        loss_fn=output_sum,
        seed=0,
        steps=2,
    )
    # step 1: ∇w = (4, 1) + 0.5·(0.5, -1) = (4.25, 0.5)  → w = (0.075, -1.05)
    #         ∇b = 2 + 0.5·0.25 = 2.125                  → b = 0.0375
    # step 2: ∇w = (4, 1) + 0.5·(0.075, -1.05) = (4.0375, 0.475) → w = (-0.32875, -1.0975)
    #         ∇b = 2 + 0.5·0.0375 = 2.01875                     → b = -0.164375
    w, b = weights(module)
    assert w == pytest.approx([-0.32875, -1.0975], abs=1e-6)
    assert b == pytest.approx(-0.164375, abs=1e-6)


def test_settings_reach_torch_optimizers() -> None:
    params = list(linear().parameters())
    sgd = make_optimizer(params, LocalTraining(lr=0.3, momentum=0.7, weight_decay=0.01))
    assert isinstance(sgd, PlainSGD)
    assert (sgd.lr, sgd.momentum, sgd.weight_decay) == (0.3, 0.7, 0.01)
    adam = make_optimizer(params, LocalTraining(optimizer="adam", lr=0.02, weight_decay=0.1))
    assert isinstance(adam, torch.optim.Adam)
    assert (adam.param_groups[0]["lr"], adam.param_groups[0]["weight_decay"]) == (0.02, 0.1)
    with pytest.raises(ClientError, match="'rmsprop'"):
        make_optimizer(params, LocalTraining(optimizer="rmsprop"))


@pytest.mark.parametrize(
    ("n", "settings", "steps"),
    [
        (100, LocalTraining(epochs=1, batch_size=32), 4),  # ⌈100/32⌉ = 4
        (100, LocalTraining(epochs=2, batch_size=32), 8),
        (64, LocalTraining(epochs=3, batch_size=32), 6),  # exact division: 2 per epoch
        (5, LocalTraining(epochs=1, batch_size=32), 1),  # a partial batch is a step
        (100, LocalTraining(epochs=3, steps=5, batch_size=32), 5),  # steps override epochs
    ],
)
def test_planned_steps(n: int, settings: LocalTraining, steps: int) -> None:
    assert planned_steps(n, settings) == steps


@pytest.mark.parametrize(
    ("planned", "work", "steps"),
    [
        (10, 1.0, 10),
        (10, 0.5, 5),
        (10, 0.25, 3),  # 2.5 rounds up
        (100, 0.07, 7),  # 0.07·100 is 7.000000000000001 in floating point; still 7, not 8
        (25, 0.28, 7),  # 0.28·25 is 7.000000000000001
        (100, 0.57, 57),  # 0.57·100 is 56.99999999999999
        (10, 0.01, 1),  # at least one step
        (10, 0.0, 1),
        (10, 1.5, 10),  # never more than planned
        (3, 0.34, 2),
    ],
)
def test_steps_for_work(planned: int, work: float, steps: int) -> None:
    assert steps_for_work(planned, work) == steps


def test_local_update_does_the_work_share_of_the_planned_steps() -> None:
    g = torch.Generator().manual_seed(0)
    data = Split(torch.randn(40, 2, generator=g), torch.randint(0, 2, (40,), generator=g))
    module = torch.nn.Linear(2, 2)
    ctx = TrainContext(
        client_id="a",
        module=module,
        global_params=Parameters.from_module(module),
        data=data,
        settings=LocalTraining(epochs=2, batch_size=8),
        loss_fn=torch.nn.functional.cross_entropy,
        seed=0,
        work=0.3,
    )
    update = FedAvg().train(ctx)
    # planned 2·⌈40/8⌉ = 10, work 0.3 → 3 steps
    assert update.metrics["steps"] == 3.0
    assert update.weight == 40.0


def test_batches_cover_the_data_once_per_pass() -> None:
    batches = batch_indices(10, 5, 4, seed=3)
    assert [len(b) for b in batches] == [4, 4, 2, 4, 4]  # a new pass starts after the short batch
    assert sorted(torch.cat(batches[:3]).tolist()) == list(range(10))
    assert all(torch.equal(a, b) for a, b in zip(batches, batch_indices(10, 5, 4, seed=3)))
    assert not torch.equal(torch.cat(batches[:3]), torch.cat(batch_indices(10, 3, 4, seed=4)))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_loss_raises_client_error(bad: float) -> None:
    module = linear()
    before = weights(module)
    with pytest.raises(ClientError, match="lower"):
        train_locally(
            module,
            DATA,
            LocalTraining(batch_size=2),
            seed=0,
            steps=3,
            loss_fn=lambda out, y: out.sum() * bad,
        )
    assert weights(module) == before  # no step was taken with the bad loss


def test_a_loss_that_blows_up_later_names_the_step() -> None:
    # A huge learning rate makes the squared error overflow to inf after a few steps.
    with pytest.raises(ClientError, match=r"after [1-9]\d* steps"):
        train_locally(
            linear(),
            DATA,
            LocalTraining(batch_size=2, lr=1e6),
            loss_fn=squared_error,
            seed=0,
            steps=50,
        )


@pytest.mark.parametrize(("momentum", "weight_decay"), [(0.0, 0.0), (0.9, 0.0), (0.0, 1e-3), (0.5, 1e-2)])
def test_plain_sgd_is_torch_sgd_bit_for_bit(momentum: float, weight_decay: float) -> None:
    """PlainSGD replaces torch.optim.SGD in local training: 60 steps of a CNN (one parameter
    without a gradient on some steps) end in exactly the same tensors."""
    from consortium.models.zoo import cnn

    torch.manual_seed(0)
    a = cnn((1, 8, 8), 10)
    b = cnn((1, 8, 8), 10)
    b.load_state_dict(a.state_dict())
    ours = PlainSGD(list(a.parameters()), lr=0.05, momentum=momentum, weight_decay=weight_decay)
    theirs = torch.optim.SGD(list(b.parameters()), lr=0.05, momentum=momentum,
                             weight_decay=weight_decay)
    x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,))
    for step in range(60):
        idx = torch.randperm(64, generator=torch.Generator().manual_seed(step))[:16]
        for module, opt in ((a, ours), (b, theirs)):
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(module(x[idx]), y[idx]).backward()
            if step % 7 == 3:  # the last layer's bias gets no gradient this step
                list(module.parameters())[-1].grad = None
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_local_sgd_does_not_import_torch_dynamo() -> None:
    """torch.optim's first optimiser imports torch._dynamo (about a second); plain SGD, the
    default, must not, or every one-model-at-a-time training pays it."""
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from consortium.client.training import LocalTraining, train_locally\n"
        "from consortium.data.base import Split\n"
        "m = torch.nn.Linear(2, 2)\n"
        "data = Split(torch.randn(8, 2), torch.randint(0, 2, (8,)))\n"
        "train_locally(m, data, LocalTraining(momentum=0.9), loss_fn=torch.nn.functional.cross_entropy,"
        " seed=0, steps=3)\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
