"""Ditto (Li et al. 2021) and APFL (Deng et al. 2020): hand-computed personal steps on a
one-weight model, the personalised model each evaluates, and their config checks."""

from __future__ import annotations

import pytest
import torch

from consortium.algorithms import APFL, Ditto, build_algorithm
from consortium.algorithms.apfl import ALPHA_KEY, V_KEY
from consortium.algorithms.base import LocalResult, TrainContext
from consortium.algorithms.ditto import STATE_KEY
from consortium.client.training import LocalTraining
from consortium.data.base import Split
from consortium.errors import ConfigError
from consortium.types import Parameters


def square(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out - y) ** 2).mean()


def context(w: float = 1.0, *, lr: float = 0.1, state: dict | None = None,
            weight_decay: float = 0.0) -> TrainContext:
    """One example x = 1, y = 0 and a weight θ: the loss is θ², its gradient 2θ."""
    module = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        module.weight.fill_(w)
    return TrainContext(
        client_id="c", module=module, global_params=Parameters.from_module(module),
        data=Split(torch.ones(1, 1), torch.zeros(1, 1)),
        settings=LocalTraining(lr=lr, batch_size=1, weight_decay=weight_decay),
        loss_fn=square, seed=0, client_state=state if state is not None else {},
    )


# -- Ditto --------------------------------------------------------------------------------------

def test_ditto_personal_step_by_hand() -> None:
    # v = 0.5, w = 1, λ = 1: g = 2·0.5 + 1·(0.5 − 1) = 0.5 ⇒ v = 0.5 − 0.1·0.5 = 0.45
    ctx = context(state={STATE_KEY: torch.tensor([0.5])})
    v = Ditto(lam=1.0, personal_steps=1).train_personal(ctx)
    assert v.item() == pytest.approx(0.45)
    assert ctx.client_state[STATE_KEY].item() == pytest.approx(0.45)
    # two steps: 0.45 − 0.1·(0.9 − 0.55) = 0.415
    assert Ditto(lam=1.0, personal_steps=1).train_personal(ctx).item() == pytest.approx(0.415)


def test_ditto_starts_from_the_global_model_and_sends_fedavgs_update() -> None:
    ctx = context()
    update = Ditto(lam=1.0).make_update(ctx, LocalResult(torch.tensor([-0.2]), 1, 1.0, 1))
    assert update.delta.item() == pytest.approx(-0.2) and update.weight == 1.0  # FedAvg's
    assert ctx.client_state[STATE_KEY].item() == pytest.approx(0.8)  # 1 − 0.1·(2 + 0)


def test_ditto_lambda_pulls_toward_the_global_model() -> None:
    far = {STATE_KEY: torch.tensor([-3.0])}
    free = Ditto(lam=0.0, personal_steps=1).train_personal(context(state=dict(far)))
    pulled = Ditto(lam=5.0, personal_steps=1).train_personal(context(state=dict(far)))
    assert free.item() == pytest.approx(-3.0 + 0.6)  # the loss alone
    assert pulled.item() == pytest.approx(-3.0 + 0.6 + 0.1 * 5.0 * 4.0)


def test_ditto_evaluates_the_personal_model() -> None:
    params = Parameters.from_module(torch.nn.Linear(1, 1, bias=False))
    assert Ditto().own_parameters(params, {}) is params
    own = Ditto().own_parameters(params, {STATE_KEY: torch.tensor([7.0])})
    assert own.vector.item() == 7.0


# -- APFL ---------------------------------------------------------------------------------------

def test_apfl_step_by_hand() -> None:
    # w = 1, v = 0, α = 0.5: g_w = 2, v̄ = 0.5, g = ∇f(v̄) = 1;
    # α ← 0.5 − 0.1·(0 − 1)·1 = 0.6; v ← 0 − 0.1·0.5·1 = −0.05
    ctx = context(state={V_KEY: torch.tensor([0.0]), ALPHA_KEY: torch.tensor([0.5])})
    v, alpha = APFL().train_personal(ctx, 1)
    assert v.item() == pytest.approx(-0.05) and alpha == pytest.approx(0.6)
    # the personalised model with the next global w' = 0.8: 0.6·(−0.05) + 0.4·0.8
    params = Parameters.from_module(torch.nn.Linear(1, 1, bias=False)).replace(torch.tensor([0.8]))
    assert APFL().own_parameters(params, ctx.client_state).vector.item() == pytest.approx(0.29)


def test_apfl_two_steps_follow_the_local_global_copy() -> None:
    # step 2 uses w_k = 0.8 (after its own step), v = −0.05, α = 0.6: v̄ = −0.03 + 0.32 = 0.29,
    # g = 0.58; α ← 0.6 − 0.1·(−0.85)·0.58 = 0.6493; v ← −0.05 − 0.1·0.6·0.58 = −0.0848
    ctx = context(state={V_KEY: torch.tensor([0.0]), ALPHA_KEY: torch.tensor([0.5])})
    v, alpha = APFL().train_personal(ctx, 2)
    assert alpha == pytest.approx(0.6 + 0.1 * 0.85 * 0.58)
    assert v.item() == pytest.approx(-0.05 - 0.1 * 0.6 * 0.58)


def test_apfl_first_round_and_alpha_stays_in_unit_interval() -> None:
    ctx = context()  # v starts at w = 1, α at 0.25: v − w = 0 ⇒ α unchanged
    v, alpha = APFL(alpha=0.25).train_personal(ctx, 1)
    assert alpha == 0.25 and v.item() == pytest.approx(1 - 0.1 * 0.25 * 2)
    # v̄ = −44.9, g = −89.8, ⟨v − w, g⟩ = 4579.8 ⇒ α far below 0: clipped to 0
    ctx = context(state={V_KEY: torch.tensor([-50.0]), ALPHA_KEY: torch.tensor([0.9])})
    assert APFL().train_personal(ctx, 1)[1] == 0.0
    # lr 1, v = 0, w = 1, α = 0.95: v̄ = 0.05, g = 0.1 ⇒ α = 0.95 + 0.1: clipped to 1
    ctx = context(lr=1.0, state={V_KEY: torch.tensor([0.0]), ALPHA_KEY: torch.tensor([0.95])})
    assert APFL().train_personal(ctx, 1)[1] == 1.0


def test_apfl_weight_decay_as_torch_sgd() -> None:
    ctx = context(state={V_KEY: torch.tensor([0.0]), ALPHA_KEY: torch.tensor([0.5])},
                  weight_decay=0.5)
    v, _ = APFL().train_personal(ctx, 1)
    assert v.item() == pytest.approx(-0.05)  # decay of v = 0 is 0


def test_apfl_refuses_momentum() -> None:
    with pytest.raises(ConfigError, match="momentum = 0"):
        APFL().check_settings(LocalTraining(momentum=0.9))
    with pytest.raises(ConfigError, match="apfl_alpha"):
        APFL(alpha=1.5)


def test_build_and_check() -> None:
    assert build_algorithm("ditto", ditto_lambda=0.5, personal_steps=3) == Ditto(0.5, 3)
    assert build_algorithm("apfl", apfl_alpha=0.1) == APFL(0.1)
    with pytest.raises(ConfigError, match="ditto_lambda"):
        Ditto(lam=-1.0)
    with pytest.raises(ConfigError, match="personal_steps"):
        Ditto(personal_steps=-1)
