"""The vectorised executor trains and evaluates exactly like the sequential one."""

from __future__ import annotations

import pytest
import torch

import consortium
from consortium.data.base import ClientData, FederatedDataset, Split
from consortium.executors import SequentialExecutor, VectorizedExecutor
from tests.conftest import make_toy

SIZES = [30, 61, 45, 80, 17, 60]  # unequal data ⇒ unequal step counts


def run(cfg: dict, dataset: FederatedDataset, executor, **kw):
    return consortium.simulate(cfg, dataset=dataset, executor=executor, **kw)


def config(algorithm: str, momentum: float, **extra) -> dict:
    return {
        "rounds": 4,
        "seed": 1,
        "algorithm": {
            "name": algorithm, "mu": 0.5, "lr": 0.1, "batch_size": 16, "momentum": momentum,
            "weight_decay": 0.01, **extra,
        },
        "sampling": {"clients_per_round": 4},
        "simulation": {"stragglers": 0.5},
    }


@pytest.mark.parametrize("algorithm", ["fedavg", "fedprox", "scaffold", "fednova"])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_same_global_model_as_sequential(algorithm: str, momentum: float) -> None:
    toy = make_toy(6, sizes=SIZES)
    a = run(config(algorithm, momentum), toy, SequentialExecutor())
    b = run(config(algorithm, momentum), toy, VectorizedExecutor())
    assert torch.allclose(a.params.vector, b.params.vector, atol=1e-6, rtol=0)
    for ra, rb in zip(a.history, b.history):
        assert ra["clients"] == rb["clients"]
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], abs=1e-6)
        assert ra["accuracy"] == pytest.approx(rb["accuracy"], abs=1e-9)
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-6)
        assert ra["auc"] == pytest.approx(rb["auc"], abs=1e-6)


def test_fixed_local_steps_and_mlp() -> None:
    toy = make_toy(5, sizes=[20, 40, 33, 50, 9])
    cfg = {**config("fedavg", 0.5, local_steps=7), "model": {"name": "mlp", "hidden": [8, 4]}}
    a = run(cfg, toy, SequentialExecutor())
    b = run(cfg, toy, VectorizedExecutor())
    assert torch.allclose(a.params.vector, b.params.vector, atol=1e-6, rtol=0)


def _images(num_clients: int = 4, n: int = 24, classes: int = 3) -> FederatedDataset:
    g = torch.Generator().manual_seed(0)

    def split(k: int) -> Split:
        y = torch.randint(0, classes, (k,), generator=g)
        x = torch.randn(k, 1, 8, 8, generator=g) + y.view(-1, 1, 1, 1).float()
        return Split(x, y)

    clients = {f"s{i}": ClientData(split(n + 7 * i), split(10)) for i in range(num_clients)}
    return FederatedDataset("images", clients, classes, (1, 8, 8))


def test_cnn_multiclass_training_and_evaluation() -> None:
    data = _images()
    cfg = {**config("fedavg", 0.0), "model": {"name": "cnn"}, "rounds": 2}
    a = run(cfg, data, SequentialExecutor())
    b = run(cfg, data, VectorizedExecutor())
    assert torch.allclose(a.params.vector, b.params.vector, atol=1e-5, rtol=0)
    for cid in a.per_client:
        for name, value in a.per_client[cid].items():
            assert b.per_client[cid][name] == pytest.approx(value, abs=1e-5), (cid, name)


def test_memory_budget_splits_the_round_into_groups() -> None:
    toy = make_toy(6, sizes=SIZES)
    tiny = VectorizedExecutor(max_memory_mb=0.001)  # one client per group
    a = run(config("scaffold", 0.9), toy, VectorizedExecutor())
    b = run(config("scaffold", 0.9), toy, tiny)
    assert torch.allclose(a.params.vector, b.params.vector, atol=1e-6, rtol=0)


class _Normed(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = torch.nn.BatchNorm1d(5)
        self.out = torch.nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(x))


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"overrides": ["algorithm.optimizer=adam"]}, "local optimizer 'adam'"),
        ({"loss_fn": lambda out, y: torch.nn.functional.nll_loss(out.log_softmax(1), y)}, "custom loss"),
        ({"model": _Normed}, "buffers"),
    ],
)
def test_falls_back_to_sequential_and_says_so_once(capsys, kwargs, reason) -> None:
    toy = make_toy(4)
    cfg = {"rounds": 2, "algorithm": {"lr": 0.05}}
    a = consortium.simulate(cfg, dataset=toy, executor=SequentialExecutor(), **kwargs)
    b = consortium.simulate(cfg, dataset=toy, executor=VectorizedExecutor(), **kwargs)
    assert torch.equal(a.params.vector, b.params.vector)
    err = capsys.readouterr().err
    assert err.count("cannot batch") == 1 and reason in err


def test_auto_picks_vectorised() -> None:
    from consortium.executors import build_executor

    assert isinstance(build_executor("auto"), VectorizedExecutor)
    assert isinstance(build_executor("sequential"), SequentialExecutor)


def test_nan_loss_fails_only_that_client() -> None:
    toy = make_toy(3)
    clients = dict(toy.clients)
    bad = clients["c1"].train
    clients["c1"] = ClientData(Split(bad.x * 1e30, bad.y), clients["c1"].test)
    data = FederatedDataset("toy", clients, 2, (5,))
    result = consortium.simulate({"rounds": 1, "algorithm": {"lr": 1.0}}, dataset=data,
                                 executor=VectorizedExecutor())
    record = result.history[0]
    assert record["clients"] == 2 and set(record["failed"]) == {"c1"}
