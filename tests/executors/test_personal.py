"""Personal heads (FedPer, FedRep) in every executor: the vectorised executor starts each
client's row from its own head and trains FedRep's phases by masking columns; it must give
the sequential executor's model, heads and personalised metrics.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import consortium
from consortium.algorithms.base import TrainContext
from consortium.algorithms.personal import STATE_KEY, FedRep
from consortium.client.state import ClientStateStore
from consortium.client.training import LocalTerms, Phase
from consortium.executors import SequentialExecutor, VectorizedExecutor
from consortium.server.checkpoint import load_checkpoint
from tests.conftest import make_toy

SIZES = [30, 61, 45, 80, 17, 60]  # unequal data ⇒ unequal step counts (and phase lengths)


def config(algorithm: str, **extra: object) -> dict:
    return {
        "rounds": 3,
        "seed": 2,
        "model": {"name": "mlp", "hidden": [8, 4]},
        "algorithm": {"name": algorithm, "lr": 0.1, "batch_size": 16, "momentum": 0.9,
                      "weight_decay": 0.01},
        "personalization": {"head_epochs": 2},
        "sampling": {"clients_per_round": 4},
        "simulation": {"stragglers": 0.5},
        **extra,
    }


def run(cfg: dict, executor: object, out: Path, **kwargs: object
        ) -> tuple[consortium.SimulationResult, ClientStateStore]:
    result = consortium.simulate(cfg, dataset=make_toy(6, sizes=SIZES), executor=executor,
                                 out=out, report=False, **kwargs)
    _, store = load_checkpoint(out / "checkpoint", layout=result.params.layout,
                               rounds=cfg["rounds"])
    return result, store


def assert_same(a: tuple[consortium.SimulationResult, ClientStateStore],
                b: tuple[consortium.SimulationResult, ClientStateStore]) -> None:
    (ra, sa), (rb, sb) = a, b
    assert torch.allclose(ra.params.vector, rb.params.vector, atol=1e-6, rtol=0)
    heads_a, heads_b = sa.to_flat(), sb.to_flat()
    assert heads_a.keys() == heads_b.keys() and heads_a
    for key in heads_a:
        assert torch.allclose(heads_a[key], heads_b[key], atol=1e-6, rtol=0), key
    for cid, metrics in ra.per_client.items():
        for name, value in metrics.items():
            assert rb.per_client[cid][name] == pytest.approx(value, abs=1e-5), (cid, name)
    for x, y in zip(ra.history, rb.history, strict=True):
        assert x["train_loss"] == pytest.approx(y["train_loss"], abs=1e-6)


@pytest.mark.parametrize("algorithm", ["fedper", "fedrep"])
def test_sequential_and_vectorised_agree(tmp_path: Path, capsys, algorithm: str) -> None:
    cfg = config(algorithm)
    a = run(cfg, SequentialExecutor(), tmp_path / "a")
    b = run(cfg, VectorizedExecutor(), tmp_path / "b")
    assert "cannot batch" not in capsys.readouterr().err
    assert_same(a, b)
    result, store = a
    # each client that trained keeps its head only: 4 × 2 weights + 2 biases
    head = 4 * 2 + 2
    assert all(t.numel() == head for t in store.to_flat().values())
    assert all(name.endswith("\x1f" + STATE_KEY) for name in store.to_flat())
    assert "personalized_accuracy" in result.history[-1]
    assert result.summary["personalized"]["accuracy"] == result.history[-1]["personalized_accuracy"]


class _TanhNet(torch.nn.Module):
    """Not a Linear/ReLU stack: the vectorised executor takes its vmap + autograd path."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Linear(5, 6)
        self.head = torch.nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(x)))


@pytest.mark.parametrize("algorithm", ["fedper", "fedrep"])
def test_the_autograd_path_agrees(tmp_path: Path, capsys, algorithm: str) -> None:
    cfg = {**config(algorithm), "model": {"name": "custom"},
           "personalization": {"local_layers": ["head"], "head_epochs": 1}}
    a = run(cfg, SequentialExecutor(), tmp_path / "a", model=_TanhNet)
    b = run(cfg, VectorizedExecutor(), tmp_path / "b", model=_TanhNet)
    assert "cannot batch" not in capsys.readouterr().err
    assert_same(a, b)


def test_fedrep_with_a_frozen_first_layer_and_no_momentum(tmp_path: Path) -> None:
    cfg = config("fedrep", model={"name": "mlp", "hidden": [8, 4], "freeze": ["1"]})
    cfg["algorithm"] = {**cfg["algorithm"], "momentum": 0.0}
    a = run(cfg, SequentialExecutor(), tmp_path / "a")
    b = run(cfg, VectorizedExecutor(), tmp_path / "b")
    assert_same(a, b)
    torch.manual_seed(consortium.seeds.derive_seed(2, "init") % (2**31))
    init = consortium.models.zoo.mlp((5,), 2, hidden=[8, 4])
    final = a[0].params.tensors()
    for name in ("1.weight", "1.bias", "5.weight", "5.bias"):  # frozen, and the global head
        assert torch.equal(final[name], dict(init.named_parameters())[name].detach()), name
    assert not torch.equal(final["3.weight"], init[3].weight.detach())


def test_fedper_under_local_dp(tmp_path: Path) -> None:
    cfg = config("fedper", privacy={"mode": "local", "clip": 0.5, "noise_multiplier": 1.0})
    assert_same(run(cfg, SequentialExecutor(), tmp_path / "a"),
                run(cfg, VectorizedExecutor(), tmp_path / "b"))


def test_fedrep_with_fixed_local_steps(tmp_path: Path) -> None:
    cfg = config("fedrep")
    cfg["algorithm"] = {**cfg["algorithm"], "local_steps": 3}
    assert_same(run(cfg, SequentialExecutor(), tmp_path / "a"),
                run(cfg, VectorizedExecutor(), tmp_path / "b"))


@dataclass(frozen=True)
class _HeadBodyHead(FedRep):
    """Phases head, body, head: the head's momentum must restart in its second phase, as the
    sequential loop's fresh optimiser per phase does."""

    def local_terms(self, ctx: TrainContext) -> LocalTerms:
        terms = super().local_terms(ctx)
        head, body = terms.phases
        return dataclasses.replace(terms, phases=(head, body, Phase(head.train, 1)))


def test_a_phase_that_comes_back_restarts_its_momentum(tmp_path: Path) -> None:
    cfg = config("fedrep")
    algorithm = _HeadBodyHead(head_epochs=1)
    assert_same(run(cfg, SequentialExecutor(), tmp_path / "a", algorithm=algorithm),
                run(cfg, VectorizedExecutor(), tmp_path / "b", algorithm=algorithm))


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'consortium[ray]'")
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING,
             _node_ip_address="127.0.0.1")
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_ray_keeps_the_heads_in_the_driver_store(local_ray, tmp_path: Path) -> None:
    """Each Ray group receives its clients' heads and returns them trained (client state
    travels as SCAFFOLD's does)."""
    from consortium.executors import RayExecutor

    cfg = config("fedrep")
    assert_same(run(cfg, SequentialExecutor(), tmp_path / "a"),
                run(cfg, RayExecutor(workers=2), tmp_path / "b"))
