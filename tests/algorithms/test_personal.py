"""FedPer and FedRep: personal heads kept in client state, shared bodies averaged.

Hand-computed steps on a two-weight linear model ``f(x) = w2·w1·x`` (body ``w1``, head
``w2``) with the squared error, the server side (the global head never moves, even under
central DP noise), what a client keeps (only its head), and the config that selects the
personal layers.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from consortium import simulate
from consortium.algorithms import ALGORITHMS, FedPer, FedRep, PersonalLayers, build_algorithm
from consortium.algorithms.base import TrainContext, train_with
from consortium.algorithms.personal import STATE_KEY, personal_layers, personal_mask
from consortium.client.training import LocalTraining, Phase, phase_schedule
from consortium.config import ExperimentConfig
from consortium.data.base import ClientData, FederatedDataset, Split
from consortium.errors import ConfigError
from consortium.executors import SequentialExecutor
from consortium.server.checkpoint import load_checkpoint
from consortium.types import Layout, Parameters


class TwoWeights(nn.Module):
    """``f(x) = w2 · (w1 · x)``: a body ``w1`` and a head ``w2``, starting at 1 and 2 (a
    constant second output makes it fit a two-class data set; the loss reads ``f`` only)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(1, 1, bias=False)
        self.head = nn.Linear(1, 1, bias=False)
        with torch.no_grad():
            self.body.weight.fill_(1.0)
            self.head.weight.fill_(2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.head(self.body(x))
        return torch.cat([f, torch.zeros_like(f)], dim=1)


def squared_error(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out[:, 0] - y.float()) ** 2).mean()


ONE = Split(torch.tensor([[1.0]]), torch.tensor([1]))  # x = 1, y = 1
SETTINGS = LocalTraining(lr=0.1, batch_size=1)


def one_round(algorithm: FedPer | FedRep, state: dict[str, torch.Tensor], body: float = 1.0):
    module = TwoWeights()
    with torch.no_grad():
        module.body.weight.fill_(body)
    params = Parameters.from_module(module)
    ctx = TrainContext(
        client_id="c", module=module, global_params=params, data=ONE, settings=SETTINGS,
        loss_fn=squared_error, seed=0, client_state=state,
    )
    return train_with(algorithm, ctx)


def test_fedper_one_step_by_hand() -> None:
    # f = 2, r = f − y = 1: dL/dw1 = 2·r·w2 = 4, dL/dw2 = 2·r·w1 = 2; lr 0.1
    state: dict[str, torch.Tensor] = {}
    update = one_round(FedPer(PersonalLayers(("head",))), state)
    assert update.delta.tolist() == pytest.approx([-0.4, 0.0])
    assert update.delta[1].item() == 0.0  # exactly: the head is not sent
    assert state[STATE_KEY].tolist() == pytest.approx([1.8])
    assert update.metrics["train_loss"] == pytest.approx(1.0)
    # round 2 from the new body 0.6 and the client's own head 1.8: f = 1.08, r = 0.08,
    # dw1 = 2·0.08·1.8 = 0.288, dw2 = 2·0.08·0.6 = 0.096
    update = one_round(FedPer(PersonalLayers(("head",))), state, body=0.6)
    assert update.delta.tolist() == pytest.approx([-0.0288, 0.0])
    assert state[STATE_KEY].tolist() == pytest.approx([1.7904])


def test_fedrep_head_then_body_by_hand() -> None:
    # head with the body fixed: dw2 = 2·(2 − 1)·1 = 2 → w2 = 1.8; then the body with the new
    # head: f = 1.8, r = 0.8, dw1 = 2·0.8·1.8 = 2.88 → w1 = 1 − 0.288 = 0.712
    state: dict[str, torch.Tensor] = {}
    update = one_round(FedRep(PersonalLayers(("head",)), head_epochs=1), state)
    assert update.delta.tolist() == pytest.approx([-0.288, 0.0])
    assert state[STATE_KEY].tolist() == pytest.approx([1.8])
    assert update.metrics["steps"] == 2
    assert update.metrics["train_loss"] == pytest.approx((1.0 + 0.64) / 2)


def test_fedrep_head_epochs_run_before_the_body() -> None:
    # two head steps: w2 = 1.8, then r = 0.8, dw2 = 1.6 → w2 = 1.64; body: f = 1.64,
    # r = 0.64, dw1 = 2·0.64·1.64 = 2.0992 → w1 = 0.79008
    state: dict[str, torch.Tensor] = {}
    update = one_round(FedRep(PersonalLayers(("head",)), head_epochs=2), state)
    assert update.delta.tolist() == pytest.approx([-0.20992, 0.0])
    assert state[STATE_KEY].tolist() == pytest.approx([1.64])
    assert update.metrics["steps"] == 3


def two_weight_run(name: str, tmp_path: Path, **extra: object):
    one = FederatedDataset("one", {"c": ClientData(ONE, ONE)}, 2, (1,))
    cfg = {
        "rounds": 2, "model": {"name": "custom"},
        "algorithm": {"name": name, "lr": 0.1, "batch_size": 1},
        "personalization": {"local_layers": ["head"]}, **extra,
    }
    result = simulate(cfg, dataset=one, model=TwoWeights, loss_fn=squared_error,
                      executor=SequentialExecutor(), out=tmp_path / name, report=False)
    _, store = load_checkpoint(tmp_path / name / "checkpoint", layout=result.params.layout,
                               rounds=2)
    return result, store


def test_two_fedper_rounds_through_the_server(tmp_path: Path) -> None:
    result, store = two_weight_run("fedper", tmp_path)
    # the server averages the one body; the global head stays at its initial 2 exactly
    assert result.params.vector.tolist() == pytest.approx([0.5712, 2.0])
    assert result.params.vector[1].item() == 2.0
    assert store.get("c")[STATE_KEY].tolist() == pytest.approx([1.7904])


def test_the_global_head_stays_bit_identical_under_central_noise(tmp_path: Path) -> None:
    result, _ = two_weight_run(
        "fedrep", tmp_path,
        privacy={"mode": "central", "noise_multiplier": 1.0, "clip": 1.0, "sampling": "fixed"},
    )
    assert result.params.vector[1].item() == 2.0
    assert result.params.vector[0].item() != 1.0  # the body moved (by the update and noise)


def test_personal_layers_by_prefix_and_by_count() -> None:
    names = ["1.weight", "1.bias", "3.weight", "3.bias", "5.weight", "5.bias"]
    assert personal_layers(names) == ["5.weight", "5.bias"]
    assert personal_layers(names, count=2) == ["3.weight", "3.bias", "5.weight", "5.bias"]
    assert personal_layers(names, layers=["5"]) == ["5.weight", "5.bias"]
    assert personal_layers(names, layers=["3.bias", "5"]) == ["3.bias", "5.weight", "5.bias"]
    layout = Layout.of({n: torch.zeros(2, 3) if n.endswith("weight") else torch.zeros(2)
                        for n in names})
    assert personal_mask(layout).tolist() == [False] * 16 + [True] * 8


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"layers": ["fc9"]}, "match no parameter"),
    ({"count": 3}, "at least one must stay shared"),
    ({"layers": ["1", "3", "5"]}, "nothing is shared"),
    ({"layers": ["5"], "count": 1}, "both set"),
])
def test_bad_personal_layers_are_explained(kwargs: dict, match: str) -> None:
    names = ["1.weight", "1.bias", "3.weight", "3.bias", "5.weight", "5.bias"]
    with pytest.raises(ConfigError, match=match):
        personal_layers(names, **kwargs)


def test_a_single_layer_model_cannot_be_personalised() -> None:
    with pytest.raises(ConfigError, match="at least two layers"):
        personal_layers(["1.weight", "1.bias"])


def test_config_refuses_personal_layers_for_a_shared_algorithm() -> None:
    with pytest.raises(ConfigError, match='use algorithm.name = "fedper" or "fedrep"'):
        ExperimentConfig.from_dict({"personalization": {"local_layers": ["5"]}})
    with pytest.raises(ConfigError, match="head_epochs"):
        ExperimentConfig.from_dict({"algorithm": {"name": "fedrep"},
                                    "personalization": {"head_epochs": 0}})
    cfg = ExperimentConfig.from_dict({"algorithm": {"name": "fedrep"},
                                      "personalization": {"local_count": 2, "head_epochs": 3}})
    assert build_algorithm("fedrep", local_count=2, head_epochs=3) == FedRep(
        PersonalLayers((), 2), head_epochs=3)
    assert cfg.personalization.head_epochs == 3


def test_registered_and_listed() -> None:
    assert {"fedper", "fedrep"} <= set(ALGORITHMS)
    assert build_algorithm("fedper").name == "fedper"
    with pytest.raises(ConfigError, match="does not take them"):
        build_algorithm("fedavg", local_layers=("5",))


def test_phase_lengths() -> None:
    head, body = Phase(torch.tensor([True])), Phase(torch.tensor([False]))
    epochs = LocalTraining(epochs=2, batch_size=10)
    # 25 examples: 3 batches an epoch; the head's 4 epochs, then the body's local 2 epochs
    assert phase_schedule(25, epochs, [Phase(head.train, 4), body]) == [12, 6]
    fixed = LocalTraining(steps=3, batch_size=10)
    assert phase_schedule(25, fixed, [Phase(head.train, 2), body]) == [6, 3]
    # a straggler doing 7 of the 9 steps: the head's 6, then 1 of the body's
    assert phase_schedule(25, fixed, [Phase(head.train, 2), body], steps=7) == [6, 1]
    assert phase_schedule(25, fixed, [Phase(head.train, 2), body], steps=4) == [4, 0]


def test_fedrep_refuses_local_dp() -> None:
    with pytest.raises(ConfigError, match="local DP-SGD"):
        FedRep().check_settings(LocalTraining(dp_clip=1.0, dp_noise=1.0))
