"""Frozen parameters (``requires_grad = False``) never train, in any executor.

A model with a frozen body and a trainable head (fine-tuning): every executor must give the
same model as the sequential one (which trains only what its optimiser holds), and the body
must stay bit-identical to the initial one after several rounds — with every algorithm, with
momentum and weight decay, and under local DP-SGD (where the frozen part is neither clipped
nor noised, as in Opacus).
"""

from __future__ import annotations

import pytest
import torch

import consortium
from consortium.data.base import FederatedDataset
from consortium.executors import SequentialExecutor, VectorizedExecutor
from consortium.models.zoo import mlp
from consortium.seeds import derive_seed
from tests.conftest import make_toy

SIZES = [30, 61, 45, 80, 17, 60]  # unequal data ⇒ unequal step counts
BODY = ("1.weight", "1.bias")  # the mlp's first Linear (0 is the Flatten)
ALGORITHMS = ["fedavg", "fedprox", "scaffold", "fednova"]


def config(algorithm: str, **extra: object) -> dict:
    return {
        "rounds": 3,
        "seed": 2,
        "model": {"name": "mlp", "hidden": [8, 4], "freeze": ["1"]},
        "algorithm": {
            "name": algorithm, "mu": 0.5, "lr": 0.1, "batch_size": 16, "momentum": 0.9,
            "weight_decay": 0.01, **extra,
        },
        "sampling": {"clients_per_round": 4},
        "simulation": {"stragglers": 0.5},
    }


def initial_mlp(cfg: dict, dataset: FederatedDataset) -> dict[str, torch.Tensor]:
    """The model ``simulate`` starts from (it seeds torch with the run's "init" seed)."""
    torch.manual_seed(derive_seed(cfg["seed"], "init") % (2**31))
    module = mlp(dataset.input_shape, dataset.num_classes, hidden=cfg["model"]["hidden"])
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def assert_body_untouched(result: consortium.SimulationResult, initial: dict[str, torch.Tensor],
                          body: tuple[str, ...] = BODY) -> None:
    final = result.params.tensors()
    for name in body:
        assert torch.equal(final[name], initial[name]), f"frozen {name} moved"
    head = [n for n in final if n not in body]
    assert any(not torch.equal(final[n], initial[n]) for n in head), "the head did not train"


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_frozen_body_stays_bit_identical_and_executors_agree(algorithm: str) -> None:
    toy = make_toy(6, sizes=SIZES)
    cfg = config(algorithm)
    a = consortium.simulate(cfg, dataset=toy, executor=SequentialExecutor())
    b = consortium.simulate(cfg, dataset=toy, executor=VectorizedExecutor())
    initial = initial_mlp(cfg, toy)
    assert_body_untouched(a, initial)
    assert_body_untouched(b, initial)
    assert torch.allclose(a.params.vector, b.params.vector, atol=1e-6, rtol=0)
    for ra, rb in zip(a.history, b.history, strict=True):
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], abs=1e-6)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_local_dp_neither_clips_nor_noises_frozen_parameters(algorithm: str) -> None:
    """DP-SGD's clip norm and noise cover the trainable parameters only (the noise has their
    dimension): the vectorised executor must draw exactly the sequential one's noise."""
    toy = make_toy(6, sizes=SIZES)
    cfg = {**config(algorithm), "privacy": {"mode": "local", "clip": 0.5, "noise_multiplier": 1.0}}
    a = consortium.simulate(cfg, dataset=toy, executor=SequentialExecutor())
    b = consortium.simulate(cfg, dataset=toy, executor=VectorizedExecutor())
    initial = initial_mlp(cfg, toy)
    assert_body_untouched(a, initial)
    assert_body_untouched(b, initial)
    assert torch.allclose(a.params.vector, b.params.vector, atol=1e-6, rtol=0)


class _FrozenTanhBody(torch.nn.Module):
    """Not a Linear/ReLU stack, so the vectorised executor takes its vmap + autograd path; the
    model freezes its own body, as a user's fine-tuning factory would."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Linear(5, 6)
        self.head = torch.nn.Linear(6, 2)
        with torch.no_grad():  # a "pretrained" body: fixed values, independent of any seed
            self.body.weight.copy_(torch.linspace(-1, 1, 30).view(6, 5))
            self.body.bias.fill_(0.1)
        self.body.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(x)))


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("private", [False, True])
def test_a_model_that_freezes_itself_on_the_autograd_path(capsys, algorithm: str,
                                                          private: bool) -> None:
    toy = make_toy(6, sizes=SIZES)
    cfg = {**config(algorithm), "model": {"name": "custom"}}
    if private:
        cfg["privacy"] = {"mode": "local", "clip": 0.5, "noise_multiplier": 1.0}
    a = consortium.simulate(cfg, dataset=toy, executor=SequentialExecutor(), model=_FrozenTanhBody)
    b = consortium.simulate(cfg, dataset=toy, executor=VectorizedExecutor(), model=_FrozenTanhBody)
    initial = {n: p.detach().clone() for n, p in _FrozenTanhBody().named_parameters()}
    assert "cannot batch" not in capsys.readouterr().err  # batched, not the fallback
    body = ("body.weight", "body.bias")
    assert_body_untouched(a, initial, body)
    assert_body_untouched(b, initial, body)
    assert torch.allclose(a.params.vector, b.params.vector, atol=1e-6, rtol=0)


def test_freezing_only_a_bias_inside_a_layer() -> None:
    """A parameter, not a whole layer: the hand-batched path must still train the weight."""
    toy = make_toy(6, sizes=SIZES)
    cfg = config("fedavg")
    cfg["model"] = {**cfg["model"], "freeze": ["3.bias"]}
    a = consortium.simulate(cfg, dataset=toy, executor=SequentialExecutor())
    b = consortium.simulate(cfg, dataset=toy, executor=VectorizedExecutor())
    initial = initial_mlp(cfg, toy)
    assert_body_untouched(a, initial, ("3.bias",))
    assert_body_untouched(b, initial, ("3.bias",))
    assert torch.allclose(a.params.vector, b.params.vector, atol=1e-6, rtol=0)
