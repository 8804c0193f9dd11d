"""What the algorithms reduce to, and hand-computed SCAFFOLD and FedNova steps.

FedProx with mu = 0, SCAFFOLD in its first round and FedNova with equal local steps are all
FedAvg; each differs from FedAvg once its own term is active. The federations are run end to
end through ``simulate`` on a small synthetic data set with a logistic model.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from consortium import simulate
from consortium.aggregation.base import Pipeline, RoundContext
from consortium.algorithms import (
    ALGORITHMS,
    FedAvg,
    FedNova,
    FedProx,
    Scaffold,
    TrainContext,
    build_algorithm,
)
from consortium.algorithms.fednova import normalising_factor
from consortium.client.training import LocalTraining
from consortium.data.base import ClientData, FederatedDataset, Split
from consortium.errors import ConfigError
from consortium.types import Layout, Parameters, Update

D = 3


def federation(sizes: list[int], *, seed: int = 0) -> FederatedDataset:
    """Binary labels from one linear rule; each client's features are shifted (non-IID)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(D, generator=g)

    def split(n: int, shift: float) -> Split:
        x = torch.randn(n, D, generator=g) + shift
        return Split(x, ((x - shift) @ w + 0.3 * torch.randn(n, generator=g) > 0).long())

    clients = {
        f"c{i}": ClientData(split(n, 0.5 * i), split(8, 0.5 * i)) for i, n in enumerate(sizes)
    }
    return FederatedDataset("eq", clients, 2, (D,))


EQUAL = federation([32, 32, 32, 32])
UNEQUAL = federation([8, 16, 32, 64])


def config(name: str, *, rounds: int = 3, seed: int = 0, **algorithm: Any) -> dict[str, Any]:
    return {
        "name": f"eq-{name}",
        "seed": seed,
        "rounds": rounds,
        "model": {"name": "logistic"},
        "algorithm": {"name": name, "lr": 0.1, "batch_size": 8, **algorithm},
        "evaluation": {"every": rounds},
    }


def final(name: str, dataset: FederatedDataset = EQUAL, **kwargs: Any) -> torch.Tensor:
    return simulate(config(name, **kwargs), dataset=dataset).params.vector


@dataclass(eq=False)
class UpdateLog:
    """A pipeline stage that keeps a copy of every update the server receives."""

    name: str = "update_log"
    needs: frozenset[str] = frozenset()
    gives: frozenset[str] = frozenset()
    seen: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)

    def init(self, layout: Layout) -> dict[str, Any]:
        return {}

    def receive(self, update: Update, state: dict[str, Any], ctx: RoundContext) -> Update:
        self.seen[(ctx.round, update.client_id)] = update.delta.clone()
        return update


def far_apart(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool((a - b).abs().max() > 1e-4)


# -- FedProx ------------------------------------------------------------------------------------


def test_fedprox_with_mu_zero_is_fedavg_exactly() -> None:
    assert torch.equal(final("fedprox", mu=0.0), final("fedavg"))


def test_fedprox_pulls_client_updates_towards_the_global_model() -> None:
    logs, finals = {}, {}
    for name in ("fedavg", "fedprox"):
        logs[name] = UpdateLog()
        result = simulate(
            config(name, rounds=2, mu=1.0, local_epochs=2),  # FedAvg ignores mu
            dataset=EQUAL,
            pipeline=Pipeline([logs[name]]),
        )
        finals[name] = result.params.vector
    assert far_apart(finals["fedprox"], finals["fedavg"])
    # Round 1 starts both from the same model with the same batches, so only the penalty differs.
    for cid in EQUAL.clients:
        prox, avg = logs["fedprox"].seen[(1, cid)], logs["fedavg"].seen[(1, cid)]
        assert prox.norm() < 0.99 * avg.norm(), cid


# -- SCAFFOLD -----------------------------------------------------------------------------------


def test_scaffold_first_round_is_fedavg() -> None:
    # c = c_i = 0 before any round, so the corrected gradient is the plain one.
    assert torch.equal(final("scaffold", rounds=1), final("fedavg", rounds=1))


def test_scaffold_differs_from_fedavg_once_control_variates_are_set() -> None:
    assert far_apart(final("scaffold", rounds=3), final("fedavg", rounds=3))


def one_weight_model(w: float) -> torch.nn.Linear:
    module = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        module.weight.fill_(w)
    return module


def half_squared_error(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((out.squeeze(1) - y.float()) ** 2).mean()


# One example x = 2 with target 1: loss(w) = ½(2w − 1)², gradient g(w) = 2(2w − 1) = 4w − 2.
ONE_EXAMPLE = Split(torch.tensor([[2.0]]), torch.tensor([1]))


def scaffold_context(*, steps: int, c: float, c_i: float, lr: float = 0.1) -> TrainContext:
    module = one_weight_model(1.0)
    return TrainContext(
        client_id="a",
        module=module,
        global_params=Parameters.from_module(module),
        data=ONE_EXAMPLE,
        settings=LocalTraining(steps=steps, batch_size=1, lr=lr),
        loss_fn=half_squared_error,
        seed=0,
        payload={"c": torch.tensor([c])},
        client_state={"c_i": torch.tensor([c_i])},
    )


def test_scaffold_control_variates_by_hand_one_step() -> None:
    ctx = scaffold_context(steps=1, c=0.5, c_i=0.25)
    update = Scaffold().train(ctx)
    # x = 1, g(1) = 2; corrected step direction g - c_i + c = 2 - 0.25 + 0.5 = 2.25
    # y = 1 - 0.1·2.25 = 0.775, so Δy = -0.225
    # c_i⁺ = c_i - c + (x - y)/(K·lr) = 0.25 - 0.5 + 0.225/(1·0.1) = 2.0   (= g(x), option II)
    assert update.delta.tolist() == pytest.approx([-0.225], abs=1e-6)
    assert ctx.client_state["c_i"].tolist() == pytest.approx([2.0], abs=1e-5)
    # the client sends Δc = c_i⁺ - c_i = 1.75
    assert update.extras["scaffold.delta_c"].tolist() == pytest.approx([1.75], abs=1e-5)
    # server: c ← c + Σ Δc / N with N = 4 clients in the federation: 0.5 + 1.75/4 = 0.9375
    pipe = Pipeline()
    layout = ctx.global_params.layout
    ctx_round = RoundContext(round=1, seed=0, population=4, sampled=1, layout=layout)
    agg, _ = pipe.aggregate([update], pipe.init(layout), ctx_round)
    assert agg is not None
    delta, state = Scaffold().server_step(agg, {"c": torch.tensor([0.5])}, ctx_round)
    assert state["c"].tolist() == pytest.approx([0.9375], abs=1e-5)
    assert delta.tolist() == pytest.approx([-0.225], abs=1e-6)


def test_scaffold_control_variates_by_hand_two_steps() -> None:
    ctx = scaffold_context(steps=2, c=0.5, c_i=0.25)
    update = Scaffold().train(ctx)
    # step 1 as above: y₁ = 0.775. step 2: g(0.775) = 1.1, corrected 1.35, y₂ = 0.775 - 0.135 = 0.64
    # c_i⁺ = 0.25 - 0.5 + (1 - 0.64)/(2·0.1) = -0.25 + 1.8 = 1.55   (the mean of g(1) and g(0.775))
    assert update.delta.tolist() == pytest.approx([-0.36], abs=1e-6)
    assert ctx.client_state["c_i"].tolist() == pytest.approx([1.55], abs=1e-5)
    assert update.extras["scaffold.delta_c"].tolist() == pytest.approx([1.3], abs=1e-5)


def test_scaffold_first_client_round_starts_from_zero_control_variate() -> None:
    ctx = scaffold_context(steps=1, c=0.0, c_i=0.0)
    ctx.client_state.clear()
    update = Scaffold().train(ctx)
    # plain step: y = 1 - 0.1·2 = 0.8, c_i⁺ = 0 - 0 + 0.2/0.1 = 2
    assert update.delta.tolist() == pytest.approx([-0.2], abs=1e-6)
    assert ctx.client_state["c_i"].tolist() == pytest.approx([2.0], abs=1e-5)


# -- frozen parameters ------------------------------------------------------------------------


def frozen_body_and_head(
    algorithm: Any, c: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Train a two-layer model whose first layer is frozen, and the head alone on the frozen
    layer's features; return both updates. The head's update must be the same in both."""
    g = torch.Generator().manual_seed(0)
    data = Split(torch.randn(16, 2, generator=g), torch.randint(0, 2, (16,), generator=g))
    torch.manual_seed(0)
    full = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    full[0].requires_grad_(False)
    head = copy.deepcopy(full[1])
    with torch.no_grad():
        features = Split(full[0](data.x), data.y)
    deltas = []
    for module, split, payload in (
        (full, data, {} if c is None else {"c": c}),
        (head, features, {} if c is None else {"c": c[6:]}),  # the body's 6 entries come first
    ):
        deltas.append(
            algorithm.train(
                TrainContext(
                    client_id="a",
                    module=module,
                    global_params=Parameters.from_module(module),
                    data=split,
                    settings=LocalTraining(steps=3, batch_size=8, lr=0.1),
                    loss_fn=torch.nn.functional.cross_entropy,
                    seed=0,
                    payload=payload,
                )
            ).delta
        )
    return deltas[0], deltas[1]


def test_fedprox_anchors_the_trainable_tensors_to_their_own_global_values() -> None:
    full, head = frozen_body_and_head(FedProx(mu=10.0))
    assert torch.equal(full[:6], torch.zeros(6))
    assert torch.allclose(full[6:], head, atol=1e-6)


def test_scaffold_corrects_each_trainable_tensor_with_its_own_control_variate() -> None:
    full, head = frozen_body_and_head(Scaffold(), c=torch.arange(12.0) / 10)
    assert torch.equal(full[:6], torch.zeros(6))
    assert torch.allclose(full[6:], head, atol=1e-6)


# -- FedNova ------------------------------------------------------------------------------------


def test_fednova_with_equal_steps_is_fedavg() -> None:
    nova = final("fednova", local_steps=3)
    avg = final("fedavg", local_steps=3)
    assert torch.allclose(nova, avg, rtol=1e-5, atol=1e-6)


def test_fednova_with_equal_steps_but_unequal_data_is_fedavg() -> None:
    nova = final("fednova", UNEQUAL, local_steps=3)
    assert torch.allclose(nova, final("fedavg", UNEQUAL, local_steps=3), rtol=1e-5, atol=1e-6)


def test_fednova_with_equal_steps_and_momentum_is_fedavg() -> None:
    nova = final("fednova", local_steps=3, momentum=0.5)
    avg = final("fedavg", local_steps=3, momentum=0.5)
    assert torch.allclose(nova, avg, rtol=1e-5, atol=1e-6)


def test_fednova_with_unequal_steps_differs_from_fedavg() -> None:
    # one epoch at batch size 8: 1, 2, 4 and 8 local steps
    assert far_apart(final("fednova", UNEQUAL), final("fedavg", UNEQUAL))


@pytest.mark.parametrize(
    ("steps", "momentum", "a"),
    [
        (1, 0.0, 1.0),
        (3, 0.0, 3.0),
        (5, 0.0, 5.0),
        (1, 0.5, 1.0),
        # with momentum ρ the k-th gradient is applied 1 + ρ + … + ρ^(τ-k) times in total
        (2, 0.5, (1 + 0.5) + 1),  # 2.5
        (3, 0.5, (1 + 0.5 + 0.25) + (1 + 0.5) + 1),  # 4.25
        (4, 0.5, (1 + 0.5 + 0.25 + 0.125) + (1 + 0.5 + 0.25) + (1 + 0.5) + 1),  # 6.125
    ],
)
def test_normalising_factor_by_hand(steps: int, momentum: float, a: float) -> None:
    assert normalising_factor(steps, momentum) == pytest.approx(a)


@pytest.mark.parametrize("steps", [1, 2, 3, 5])
@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_normalising_factor_is_what_torch_sgd_applies(steps: int, momentum: float) -> None:
    # With a constant gradient g, `steps` steps of SGD (momentum ρ) move by -lr · a · g.
    module = one_weight_model(0.0)
    ctx = TrainContext(
        client_id="a",
        module=module,
        global_params=Parameters.from_module(module),
        data=ONE_EXAMPLE,
        settings=LocalTraining(steps=steps, batch_size=1, lr=0.5, momentum=momentum),
        loss_fn=lambda out, y: out.sum(),  # output 2w, so g = 2 at every step
        seed=0,
    )
    update = FedAvg().train(ctx)
    assert update.delta.item() / (-0.5 * 2) == pytest.approx(normalising_factor(steps, momentum))


def test_fednova_update_and_server_step_by_hand() -> None:
    def nova_update(cid: str, n: int, steps: int) -> tuple[Update, Update]:
        data = Split(torch.full((n, 1), 2.0), torch.ones(n, dtype=torch.long))
        out = []
        for algo in (FedNova(), FedAvg()):
            module = one_weight_model(1.0)
            out.append(
                algo.train(
                    TrainContext(
                        client_id=cid,
                        module=module,
                        global_params=Parameters.from_module(module),
                        data=data,
                        settings=LocalTraining(steps=steps, batch_size=n, lr=0.1),
                        loss_fn=half_squared_error,
                        seed=0,
                    )
                )
            )
        return out[0], out[1]

    # Client a: 1 example, 1 step: Δ = -0.1·g(1) = -0.2.
    # Client b: 3 examples, 2 steps: y₁ = 0.8, g(0.8) = 1.2, y₂ = 0.68, Δ = -0.32.
    nova_a, avg_a = nova_update("a", 1, 1)
    nova_b, avg_b = nova_update("b", 3, 2)
    assert avg_a.delta.tolist() == pytest.approx([-0.2], abs=1e-6)
    assert avg_b.delta.tolist() == pytest.approx([-0.32], abs=1e-6)
    # FedNova sends d = Δ/a and n·a: (-0.2, 1·1) and (-0.16, 3·2)
    assert nova_a.delta.tolist() == pytest.approx([-0.2], abs=1e-6)
    assert nova_b.delta.tolist() == pytest.approx([-0.16], abs=1e-6)
    assert nova_b.extras["fednova.weighted_a"].tolist() == pytest.approx([6.0])
    # server: Σ p d = (1·(-0.2) + 3·(-0.16))/4 = -0.17; τ_eff = (1 + 6)/4 = 1.75
    # step = 1.75 · (-0.17) = -0.2975   (FedAvg: (1·(-0.2) + 3·(-0.32))/4 = -0.29)
    pipe = Pipeline()
    layout = Layout.of({"weight": torch.zeros(1, 1)})
    ctx = RoundContext(round=1, seed=0, population=2, sampled=2, layout=layout)
    agg, _ = pipe.aggregate([nova_a, nova_b], pipe.init(layout), ctx)
    assert agg is not None
    delta, _ = FedNova().server_step(agg, {}, ctx)
    assert delta.tolist() == pytest.approx([-0.2975], abs=1e-6)
    avg, _ = pipe.aggregate([avg_a, avg_b], pipe.init(layout), ctx)
    assert avg is not None and avg.delta.tolist() == pytest.approx([-0.29], abs=1e-6)


# -- settings the algorithms refuse ------------------------------------------------------------


@pytest.mark.parametrize("algorithm", [Scaffold(), FedNova()], ids=["scaffold", "fednova"])
def test_algorithms_defined_for_local_sgd_refuse_adam(algorithm: Any) -> None:
    ctx = scaffold_context(steps=1, c=0.0, c_i=0.0)
    ctx.settings = LocalTraining(steps=1, batch_size=1, optimizer="adam")
    with pytest.raises(ConfigError, match="sgd"):
        algorithm.train(ctx)


def test_fedprox_refuses_a_negative_mu() -> None:
    with pytest.raises(ConfigError, match="algorithm.mu"):
        FedProx(mu=-0.1)


def test_build_algorithm_names() -> None:
    assert {build_algorithm(name).name for name in ALGORITHMS} == set(ALGORITHMS)
    assert build_algorithm("fedprox", mu=0.5) == FedProx(mu=0.5)
    with pytest.raises(ConfigError, match="'fedsgd'"):
        build_algorithm("fedsgd")


# -- determinism --------------------------------------------------------------------------------

NOISY = {"sampling": {"clients_per_round": 2}, "simulation": {"stragglers": 0.5}}


def run_noisy(seed: int) -> torch.Tensor:
    cfg = config("scaffold", rounds=3, seed=seed)
    cfg.update(NOISY)
    return simulate(cfg, dataset=EQUAL).params.vector


def test_same_seed_same_parameters() -> None:
    assert torch.equal(run_noisy(0), run_noisy(0))


def test_different_seed_different_parameters() -> None:
    assert far_apart(run_noisy(0), run_noisy(1))


def test_fednova_steps_by_nothing_when_the_aggregate_has_no_weight() -> None:
    """FLTrust trusting no client returns a zero update of weight 0: FedNova must not divide
    by it (the model stays)."""
    from consortium.aggregation.base import Aggregate
    from consortium.types import TensorSpec

    layout = Layout((TensorSpec("w", (3,), torch.float32),))
    ctx = RoundContext(round=1, seed=0, population=2, sampled=2, layout=layout)
    empty = Aggregate(torch.zeros(3), 0.0, 0, {"fednova.weighted_a": torch.zeros(1)})
    algorithm = FedNova()
    delta, _ = algorithm.server_step(empty, algorithm.init_server(layout), ctx)
    assert torch.equal(delta, torch.zeros(3))
