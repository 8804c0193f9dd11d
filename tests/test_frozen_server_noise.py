"""Frozen parameters stay bit-identical under what the server does to the aggregate.

Clients send exact zeros for frozen parameters (tests/executors/test_frozen.py); central DP's
noise, distributed DP's discrete Gaussian and secure aggregation's stochastic rounding would
still move them at the server. ``federation.build_frozen`` wraps the server optimiser in
:func:`~consortium.aggregation.frozen.keep_frozen` for any model with frozen parameters.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import consortium
import consortium.federation as federation
from consortium.aggregation.frozen import KeepFrozen, frozen_mask, keep_frozen
from consortium.aggregation.optimizers import SERVER_OPTIMIZERS, server_optimizer
from consortium.errors import PipelineError
from consortium.executors import SequentialExecutor, VectorizedExecutor
from consortium.types import Layout, TensorSpec
from tests.conftest import make_toy
from tests.executors.test_frozen import BODY, assert_body_untouched, initial_mlp

FEDADAM = {"optimizer": "adam", "lr": 0.05}  # FedAdam (Reddi et al. 2021)
SECAGG = {"enabled": True}
CASES: dict[str, dict[str, Any]] = {
    "central-dp": {"privacy": {"mode": "central", "noise_multiplier": 1.0, "clip": 0.5}},
    "central-dp+fedadam": {
        "privacy": {"mode": "central", "noise_multiplier": 1.0, "clip": 0.5}, "server": FEDADAM,
    },
    "distributed-dp": {
        "privacy": {"mode": "distributed", "noise_multiplier": 1.0, "clip": 0.5},
        "secure_aggregation": SECAGG,
    },
    "secagg": {"secure_aggregation": SECAGG},
    "secagg+fedadam": {"secure_aggregation": SECAGG, "server": FEDADAM},
    "secagg+avgm": {"secure_aggregation": SECAGG, "server": {"optimizer": "avgm", "lr": 1.0}},
    # SCAFFOLD's control-variate change travels through SecAgg's rounding too
    "scaffold+secagg": {"secure_aggregation": SECAGG, "algorithm": {"name": "scaffold"}},
    "fednova+secagg": {"secure_aggregation": SECAGG, "algorithm": {"name": "fednova"}},
}


def config(extra: dict[str, Any]) -> dict[str, Any]:
    algorithm = {"name": "fedavg", "lr": 0.1, "batch_size": 16, **extra.get("algorithm", {})}
    return {
        "rounds": 3, "seed": 2, "evaluation": {"baselines": []},
        "model": {"name": "mlp", "hidden": [8, 4], "freeze": ["1"]},
        "sampling": {"clients_per_round": 6},
        **{k: v for k, v in extra.items() if k != "algorithm"}, "algorithm": algorithm,
    }


@pytest.mark.parametrize("name", list(CASES))
def test_the_frozen_body_is_bit_identical_after_server_side_noise(name: str) -> None:
    toy = make_toy(6)
    cfg = config(CASES[name])
    result = consortium.simulate(cfg, dataset=toy, executor=SequentialExecutor())
    assert all(r["clients"] > 0 for r in result.history)  # the rounds did aggregate
    assert_body_untouched(result, initial_mlp(cfg, toy))


def test_the_vectorised_executor_keeps_the_body_under_central_dp_too() -> None:
    toy = make_toy(6)
    cfg = config(CASES["central-dp+fedadam"])
    a = consortium.simulate(cfg, dataset=toy, executor=SequentialExecutor())
    b = consortium.simulate(cfg, dataset=toy, executor=VectorizedExecutor())
    assert_body_untouched(b, initial_mlp(cfg, toy))
    assert torch.allclose(a.params.vector, b.params.vector, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["central-dp", "distributed-dp", "secagg+fedadam"])
def test_without_the_builder_the_server_side_noise_moves_the_body(name: str, monkeypatch) -> None:
    """The other tests can fail: assembled without ``build_frozen``, the same runs move the
    frozen body (by the noise, or by SecAgg's rounding of zeros)."""
    monkeypatch.setattr(federation, "BUILDERS", tuple(
        b for b in federation.BUILDERS if b is not federation.build_frozen
    ))
    toy = make_toy(6)
    cfg = config(CASES[name])
    result = consortium.simulate(cfg, dataset=toy, executor=SequentialExecutor())
    final, initial = result.params.tensors(), initial_mlp(cfg, toy)
    assert any(not torch.equal(final[n], initial[n]) for n in BODY)


def test_a_model_without_frozen_parameters_keeps_its_optimiser() -> None:
    cfg = consortium.ExperimentConfig.from_dict({**config(CASES["secagg+fedadam"]),
                                                 "model": {"name": "mlp", "hidden": [8, 4]}})
    fed = federation.assemble(cfg, federation.Given(dataset=make_toy(6)))
    assert not isinstance(fed.pipeline.optimizer, KeepFrozen)
    frozen = federation.assemble(
        consortium.ExperimentConfig.from_dict(config(CASES["secagg+fedadam"])),
        federation.Given(dataset=make_toy(6)),
    )
    assert isinstance(frozen.pipeline.optimizer, KeepFrozen)
    assert frozen.pipeline.describe() == fed.pipeline.describe()  # same stages, same names


# -- the wrapper and the server optimisers, by hand --------------------------------------------

LAYOUT = Layout((TensorSpec("body", (3,), torch.float32), TensorSpec("head", (2,), torch.float32)))
FROZEN = torch.tensor([True, True, True, False, False])


@pytest.mark.parametrize("name", sorted(SERVER_OPTIMIZERS))
def test_every_server_optimiser_leaves_zero_delta_coordinates_exactly(name: str) -> None:
    """With a delta that is exactly zero at a coordinate from the first round on, every server
    optimiser leaves it exactly (its moments stay zero there: Adam's step is 0 / (√v + τ))."""
    opt = server_optimizer(name)
    params = torch.tensor([0.5, -1.25, 3.0, 0.1, 0.2])
    state = opt.init(LAYOUT)
    x = params.clone()
    for t in range(5):
        delta = torch.tensor([0.0, 0.0, 0.0, 0.3 - 0.1 * t, -0.2])
        x, state = opt.step(x, delta, state)
    assert torch.equal(x[:3], params[:3]) and not torch.equal(x[3:], params[3:])


@pytest.mark.parametrize("name", sorted(SERVER_OPTIMIZERS))
def test_keep_frozen_masks_a_noisy_delta_and_keeps_every_bit(name: str) -> None:
    inner = server_optimizer(name)
    opt = keep_frozen(inner, FROZEN)
    assert opt.name == inner.name
    params = torch.tensor([-0.0, 1.5, -2.0, 0.1, 0.2])  # -0.0: `x + 0` would give +0.0
    state = opt.init(LAYOUT)
    ref_state = inner.init(LAYOUT)
    x, ref = params.clone(), params.clone()
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        noisy = torch.randn(5, generator=g)
        x, state = opt.step(x, noisy, state)
        ref, ref_state = inner.step(ref, noisy.masked_fill(FROZEN, 0.0), ref_state)
    assert x[:3].numpy().tobytes() == params[:3].numpy().tobytes()  # bits, -0.0 included
    assert torch.equal(x[3:], ref[3:])  # trainable coordinates: exactly the inner step
    assert state.keys() == ref_state.keys()
    assert all(torch.equal(state[k], ref_state[k]) for k in state)
    if "m" in state:  # the first moment / momentum never saw the noise at frozen coordinates
        assert torch.equal(state["m"][:3], torch.zeros(3))


def test_frozen_mask_follows_requires_grad_in_layout_order() -> None:
    module = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    module[0].bias.requires_grad_(False)
    layout = consortium.Parameters.from_module(module).layout
    mask = frozen_mask(module, layout)
    assert mask is not None
    assert mask.tolist() == [False] * 6 + [True] * 3 + [False] * 4
    assert frozen_mask(torch.nn.Linear(2, 1), consortium.Parameters.from_module(
        torch.nn.Linear(2, 1)).layout) is None


def test_keep_frozen_says_what_is_wrong() -> None:
    with pytest.raises(PipelineError, match="1-D bool tensor"):
        keep_frozen(server_optimizer("sgd"), torch.zeros(5))
    with pytest.raises(PipelineError, match="every coordinate"):
        keep_frozen(server_optimizer("sgd"), torch.ones(5, dtype=torch.bool))
    with pytest.raises(PipelineError, match="mask has 4 coordinates but the model has 5"):
        keep_frozen(server_optimizer("sgd"), torch.tensor([True, False, False, False])).init(LAYOUT)
    other = Layout((TensorSpec("w", (2,), torch.float32),))
    with pytest.raises(PipelineError, match=r"not parameters of the model"):
        frozen_mask(torch.nn.Linear(2, 1), other)
