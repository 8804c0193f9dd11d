"""Batch-norm models (mlp_bn, cnn_bn) in the vectorised executor: each client's running
statistics are batched beside its parameters and updated in place; the result must be the
sequential executor's, with unequal batch sizes (short last batches) in the same step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import consortium
from consortium.data.base import ClientData, FederatedDataset, Split
from consortium.executors import SequentialExecutor, VectorizedExecutor
from consortium.server.checkpoint import load_checkpoint
from tests.conftest import make_toy

SIZES = [30, 61, 45, 80, 17, 60]  # unequal data ⇒ unequal steps and short last batches


def config(algorithm: str, model: dict, **extra: object) -> dict:
    return {
        "rounds": 3, "seed": 1, "model": model,
        "algorithm": {"name": algorithm, "lr": 0.1, "batch_size": 16, "momentum": 0.9,
                      "weight_decay": 0.01},
        "sampling": {"clients_per_round": 4},
        "simulation": {"stragglers": 0.5},
        "evaluation": {"baselines": []},
        **extra,
    }


def images() -> FederatedDataset:
    g = torch.Generator().manual_seed(0)

    def split(k: int, shift: float) -> Split:
        y = torch.randint(0, 3, (k,), generator=g)
        x = torch.randn(k, 1, 8, 8, generator=g) + y.view(-1, 1, 1, 1).float() + shift
        return Split(x, y)

    clients = {f"s{i}": ClientData(split(20 + 7 * i, i), split(10, i)) for i in range(4)}
    return FederatedDataset("images", clients, 3, (1, 8, 8))


def both(cfg: dict, data: FederatedDataset, tmp_path: Path, capsys, **kw: object):
    a = consortium.simulate(cfg, dataset=data, executor=SequentialExecutor(),
                            out=tmp_path / "a", report=False)
    b = consortium.simulate(cfg, dataset=data, executor=VectorizedExecutor(**kw),
                            out=tmp_path / "b", report=False)
    assert "cannot batch" not in capsys.readouterr().err
    return a, b


def assert_same(a, b, tmp_path: Path, atol: float = 1e-6) -> None:
    assert torch.allclose(a.params.vector, b.params.vector, atol=atol, rtol=0)
    for ra, rb in zip(a.history, b.history, strict=True):
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], abs=1e-5)
    for cid, metrics in a.per_client.items():
        for name, value in metrics.items():
            assert b.per_client[cid][name] == pytest.approx(value, abs=1e-5), (cid, name)
    rounds = a.config.rounds
    _, sa = load_checkpoint(tmp_path / "a" / "checkpoint", layout=a.params.layout, rounds=rounds)
    _, sb = load_checkpoint(tmp_path / "b" / "checkpoint", layout=a.params.layout, rounds=rounds)
    fa, fb = sa.to_flat(), sb.to_flat()
    assert fa.keys() == fb.keys()
    for key in fa:
        assert torch.allclose(fa[key], fb[key], atol=atol, rtol=0), key


@pytest.mark.parametrize("algorithm", ["fedavg", "fedbn", "fedrep"])
def test_mlp_bn_same_as_sequential(tmp_path: Path, capsys, algorithm: str) -> None:
    cfg = config(algorithm, {"name": "mlp_bn", "hidden": [8, 4]})
    a, b = both(cfg, make_toy(6, sizes=SIZES), tmp_path, capsys)
    assert_same(a, b, tmp_path)
    stats = a.params.tensors()["2.running_var"]
    if algorithm == "fedavg":  # the averaged statistics moved from their start
        assert not torch.equal(stats, torch.ones_like(stats))


def test_cnn_bn_same_as_sequential(tmp_path: Path, capsys) -> None:
    cfg = config("fedbn", {"name": "cnn_bn"}, rounds=2)
    a, b = both(cfg, images(), tmp_path, capsys)
    assert_same(a, b, tmp_path, atol=1e-5)


def test_groups_by_memory_budget(tmp_path: Path, capsys) -> None:
    cfg = config("fedavg", {"name": "mlp_bn", "hidden": [8]})
    a, b = both(cfg, make_toy(6, sizes=SIZES), tmp_path, capsys, max_memory_mb=0.001)
    assert_same(a, b, tmp_path)


def test_batches_of_one_and_unequal_sizes_in_one_step(tmp_path: Path, capsys) -> None:
    # batch 16: 17 → 16, 1; 33 → 16, 16, 1; 40 → 16, 16, 8 — step 1 holds batches of 1, 16, 16
    cfg = config("fedbn", {"name": "mlp_bn", "hidden": [6]}, rounds=2,
                 sampling={"clients_per_round": 4}, simulation={})
    a, b = both(cfg, make_toy(4, sizes=[17, 33, 16, 40]), tmp_path, capsys)
    assert_same(a, b, tmp_path)
