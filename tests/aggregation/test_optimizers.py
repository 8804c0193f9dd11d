"""Server optimisers, two steps each, worked out by hand (Reddi et al. 2021; Hsu et al. 2019).

The clients' mean delta Δ points downhill, so every optimiser *adds* its step to the model.
Small round hyper-parameters (β = 0.5, τ = 0.5) keep the arithmetic readable and make the
initial second moment ``v₋₁ = τ²`` large enough to matter.
"""

from __future__ import annotations

import math

import pytest
import torch

from consortium.aggregation.optimizers import (
    SERVER_OPTIMIZERS,
    adagrad,
    adam,
    avgm,
    server_optimizer,
    sgd,
    yogi,
)
from consortium.errors import ConfigError
from consortium.types import Layout, TensorSpec


def vec(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def two_steps(opt, x0: torch.Tensor, d1: torch.Tensor, d2: torch.Tensor):
    state0 = opt.init(Layout((TensorSpec("w", tuple(x0.shape), torch.float32),)))
    x1, state1 = opt.step(x0, d1, state0)
    x2, state2 = opt.step(x1, d2, state1)
    return (x1, state1), (x2, state2)


def close(t: torch.Tensor, expected: list[float]) -> bool:
    return torch.allclose(t, torch.tensor(expected), rtol=1e-6, atol=1e-6)


def test_sgd_adds_lr_times_delta() -> None:
    (x1, s1), (x2, s2) = two_steps(sgd(lr=0.5), vec(1.0, -2.0), vec(0.5, 0.25), vec(-1.0, 2.0))
    # x1 = (1 + 0.5·0.5, -2 + 0.5·0.25) = (1.25, -1.875)
    # x2 = (1.25 + 0.5·(-1), -1.875 + 0.5·2) = (0.75, -0.875)
    assert close(x1, [1.25, -1.875])
    assert close(x2, [0.75, -0.875])
    assert s1 == s2 == {}


def test_sgd_with_lr_one_is_fedavg() -> None:
    x, _ = sgd().step(vec(1.0, 2.0), vec(0.25, -0.5), {})
    assert close(x, [1.25, 1.5])


def test_avgm_accumulates_momentum() -> None:
    (x1, s1), (x2, s2) = two_steps(
        avgm(lr=0.5, momentum=0.5), vec(1.0, -2.0), vec(0.5, 0.25), vec(-1.0, 2.0)
    )
    # m1 = Δ1 = (0.5, 0.25);  x1 = x0 + 0.5·m1 = (1.25, -1.875)
    assert close(s1["m"], [0.5, 0.25])
    assert close(x1, [1.25, -1.875])
    # m2 = 0.5·m1 + Δ2 = (0.25 - 1, 0.125 + 2) = (-0.75, 2.125)
    # x2 = x1 + 0.5·m2 = (1.25 - 0.375, -1.875 + 1.0625) = (0.875, -0.8125)
    assert close(s2["m"], [-0.75, 2.125])
    assert close(x2, [0.875, -0.8125])


def test_adaptive_optimisers_start_with_m_zero_and_v_tau_squared() -> None:
    for opt in (adam(tau=0.5), yogi(tau=0.5), adagrad(tau=0.5)):
        state = opt.init(Layout((TensorSpec("w", (3,), torch.float32),)))
        assert state["m"].tolist() == [0.0, 0.0, 0.0], opt.name
        assert state["v"].tolist() == [0.25, 0.25, 0.25], opt.name


def test_adam_two_steps_by_hand() -> None:
    opt = adam(lr=1.0, beta1=0.5, beta2=0.75, tau=0.5)
    (x1, s1), (x2, s2) = two_steps(opt, vec(0.0, 2.0), vec(2.0, -1.0), vec(-0.5, 0.5))
    # v₋₁ = τ² = 0.25
    # step 1, first entry:  m = 0.5·0 + 0.5·2 = 1;      v = 0.75·0.25 + 0.25·4 = 1.1875
    #         second entry: m = 0.5·0 + 0.5·(-1) = -0.5; v = 0.75·0.25 + 0.25·1 = 0.4375
    a1 = 0.0 + 1.0 / (math.sqrt(1.1875) + 0.5)
    b1 = 2.0 - 0.5 / (math.sqrt(0.4375) + 0.5)
    assert close(s1["m"], [1.0, -0.5])
    assert close(s1["v"], [1.1875, 0.4375])
    assert close(x1, [a1, b1])
    # step 2, first entry:  m = 0.5·1 + 0.5·(-0.5) = 0.25;   v = 0.75·1.1875 + 0.25·0.25 = 0.953125
    #         second entry: m = 0.5·(-0.5) + 0.5·0.5 = 0;    v = 0.75·0.4375 + 0.25·0.25 = 0.390625
    a2 = a1 + 0.25 / (math.sqrt(0.953125) + 0.5)
    b2 = b1  # m = 0: no move
    assert close(s2["m"], [0.25, 0.0])
    assert close(s2["v"], [0.953125, 0.390625])
    assert close(x2, [a2, b2])


def test_yogi_two_steps_by_hand() -> None:
    opt = yogi(lr=1.0, beta1=0.5, beta2=0.75, tau=0.5)
    (x1, s1), (x2, s2) = two_steps(opt, vec(0.0, 2.0), vec(2.0, -1.0), vec(-0.5, 0.5))
    # step 1: Δ² = (4, 1) > v = 0.25, so sign(v - Δ²) = -1 and v grows by (1-β₂)Δ²:
    #   v = (0.25 + 0.25·4, 0.25 + 0.25·1) = (1.25, 0.5)   [Adam would give (1.1875, 0.4375)]
    a1 = 0.0 + 1.0 / (math.sqrt(1.25) + 0.5)
    b1 = 2.0 - 0.5 / (math.sqrt(0.5) + 0.5)
    assert close(s1["v"], [1.25, 0.5])
    assert close(x1, [a1, b1])
    # step 2: Δ² = (0.25, 0.25) < v, so sign = +1 and v shrinks by (1-β₂)Δ² = 0.0625:
    #   v = (1.1875, 0.4375);  m = (0.25, 0)
    a2 = a1 + 0.25 / (math.sqrt(1.1875) + 0.5)
    assert close(s2["v"], [1.1875, 0.4375])
    assert close(s2["m"], [0.25, 0.0])
    assert close(x2, [a2, b1])


def test_adagrad_two_steps_by_hand() -> None:
    opt = adagrad(lr=1.0, beta1=0.5, tau=0.5)
    (x1, s1), (x2, s2) = two_steps(opt, vec(1.0, -1.0), vec(1.2, -1.2), vec(8.4, 0.0))
    # step 1: m = 0.5·Δ = (0.6, -0.6); v = 0.25 + 1.44 = 1.69 = 1.3²
    #   x = (1 + 0.6/(1.3 + 0.5), -1 - 0.6/1.8) = (4/3, -4/3)
    assert close(s1["v"], [1.69, 1.69])
    assert close(x1, [4 / 3, -4 / 3])
    # step 2: m = (0.3 + 4.2, -0.3 + 0) = (4.5, -0.3); v = (1.69 + 70.56, 1.69 + 0) = (72.25, 1.69)
    #   √v = (8.5, 1.3);  x = (4/3 + 4.5/9, -4/3 - 0.3/1.8) = (11/6, -3/2)
    assert close(s2["m"], [4.5, -0.3])
    assert close(s2["v"], [72.25, 1.69])
    assert close(x2, [11 / 6, -1.5])


def test_adagrad_never_decays_v() -> None:
    (_, s1), (_, s2) = two_steps(adagrad(tau=0.5), vec(0.0), vec(3.0), vec(0.0))
    assert s2["v"].tolist() == s1["v"].tolist() == [9.25]


@pytest.mark.parametrize(
    ("name", "lr"), [("sgd", 1.0), ("avgm", 1.0), ("adam", 1e-2), ("yogi", 1e-2), ("adagrad", 1e-2)]
)
def test_server_optimizer_with_lr_zero_picks_the_default(name: str, lr: float) -> None:
    opt = server_optimizer(name, lr=0)
    assert opt.name == name
    assert opt.lr == lr
    if name == "avgm":
        assert opt.momentum == 0.9
    if name in ("adam", "yogi", "adagrad"):
        assert (opt.beta1, opt.tau) == (0.9, 1e-3)
    if name in ("adam", "yogi"):
        assert opt.beta2 == 0.99


def test_server_optimizer_passes_its_hyper_parameters_on() -> None:
    opt = server_optimizer("yogi", lr=0.3, beta1=0.5, beta2=0.75, tau=0.25)
    assert (opt.name, opt.lr, opt.beta1, opt.beta2, opt.tau) == ("yogi", 0.3, 0.5, 0.75, 0.25)
    assert server_optimizer("avgm", lr=0.2, momentum=0.5).momentum == 0.5


def test_every_listed_server_optimizer_can_be_built() -> None:
    assert {server_optimizer(name).name for name in SERVER_OPTIMIZERS} == set(SERVER_OPTIMIZERS)


@pytest.mark.parametrize(
    ("build", "key"),
    [
        (lambda: sgd(lr=0.0), "lr"),
        (lambda: sgd(lr=-1.0), "lr"),
        (lambda: avgm(lr=0.0), "lr"),
        (lambda: avgm(momentum=1.0), "momentum"),
        (lambda: avgm(momentum=-0.1), "momentum"),
        (lambda: adam(lr=float("nan")), "lr"),
        (lambda: adam(beta1=1.0), "beta1"),
        (lambda: adam(beta2=1.0), "beta2"),
        (lambda: yogi(beta2=-0.5), "beta2"),
        (lambda: yogi(tau=0.0), "tau"),
        (lambda: adagrad(tau=-1.0), "tau"),
        (lambda: server_optimizer("adam", lr=-0.1), "lr"),
        (lambda: server_optimizer("avgm", momentum=1.0), "momentum"),
        (lambda: server_optimizer("nesterov"), "nesterov"),
    ],
)
def test_invalid_hyper_parameters_raise_config_error(build, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        build()
