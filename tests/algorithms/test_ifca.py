"""IFCA (Ghosh et al. 2020): cluster choice, per-cluster averaging by hand, group recovery on
label-flipped clients, executors, checkpoint/resume and the combinations it refuses."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import consortium
from consortium.aggregation.base import RoundContext
from consortium.aggregation.mean import weighted_mean
from consortium.algorithms import IFCA, build_algorithm
from consortium.algorithms.base import TrainContext, train_with
from consortium.algorithms.ifca import CLUSTER_KEY
from consortium.client.training import LocalTraining
from consortium.config import ExperimentConfig
from consortium.data.base import ClientData, FederatedDataset, Split
from consortium.errors import ConfigError
from consortium.executors import SequentialExecutor, VectorizedExecutor
from consortium.server.checkpoint import load_checkpoint
from consortium.types import Parameters

# -- one round by hand ---------------------------------------------------------------------------


def _linear() -> torch.nn.Module:
    return torch.nn.Linear(2, 2, bias=False)


def _trained(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor, lr: float) -> torch.Tensor:
    """One full-batch gradient step of mean cross-entropy on logits ``W x`` (by the formula
    ``∇W = mean (softmax(Wx) − e_y) xᵀ``)."""
    p = torch.softmax(x @ w.T, dim=1)
    p[torch.arange(len(y)), y] -= 1.0
    return w - lr * (p.T @ x) / len(y)


def test_one_round_by_hand() -> None:
    lr = 0.5
    w0 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # class = the larger coordinate
    w1 = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # the opposite rule
    init = Parameters.from_module(_linear()).replace(w0.reshape(-1))
    ifca = IFCA(clusters=2, starts=w1.reshape(1, -1))
    state = ifca.init_server(init.layout)
    payload = ifca.make_payload(state)
    # a and b follow w0's rule, c follows w1's; a holds its example twice (weight 2)
    data = {
        "a": Split(torch.tensor([[2.0, 0.5], [2.0, 0.5]]), torch.tensor([0, 0])),
        "b": Split(torch.tensor([[0.2, 1.0]]), torch.tensor([1])),
        "c": Split(torch.tensor([[1.5, 0.1]]), torch.tensor([1])),
    }
    settings = LocalTraining(epochs=1, batch_size=2, lr=lr)
    agg = weighted_mean()
    acc = agg.start(init.layout)
    chosen = {}
    for cid, split in data.items():
        module = _linear()
        init.load_into(module)
        ctx = TrainContext(cid, module, init, split, settings,
                           torch.nn.functional.cross_entropy, seed=1, payload=payload)
        update = train_with(ifca, ctx)
        chosen[cid] = int(ctx.client_state[CLUSTER_KEY][0])
        acc = agg.accumulate(acc, update)
    assert chosen == {"a": 0, "b": 0, "c": 1}
    ctx = RoundContext(round=1, seed=0, population=3, sampled=3, layout=init.layout)
    aggregate = agg.finalize(acc)
    delta, new_state = ifca.server_step(aggregate, state, ctx)
    # each cluster: the weighted mean of its clients' locally trained models
    ta = _trained(w0, data["a"].x, data["a"].y, lr)
    tb = _trained(w0, data["b"].x, data["b"].y, lr)
    tc = _trained(w1, data["c"].x, data["c"].y, lr)
    assert torch.allclose(w0.reshape(-1) + delta, ((2 * ta + tb) / 3).reshape(-1), atol=1e-6)
    assert torch.allclose(new_state["clusters"][0], tc.reshape(-1), atol=1e-6)
    assert aggregate.info["ifca_cluster_sizes"] == [2, 1]
    # a client's own model is its cluster's current model
    own = ifca.own_parameters(init, {CLUSTER_KEY: torch.tensor([1])})
    assert torch.equal(own.vector, new_state["clusters"][0])
    assert ifca.own_parameters(init, {}) is init


def test_a_cluster_nobody_chose_stays() -> None:
    init = Parameters.from_module(_linear())
    far = torch.tensor([[-50.0, 0.0, 50.0, 0.0]])  # predicts class 1 for x = (1, 0): no one picks it
    ifca = IFCA(clusters=2, starts=far)
    state = ifca.init_server(init.layout)
    split = Split(torch.tensor([[1.0, 0.0]]), torch.tensor([0]))
    module = _linear()
    init.load_into(module)
    ctx = TrainContext("a", module, init, split, LocalTraining(batch_size=1, lr=0.1),
                       torch.nn.functional.cross_entropy, seed=0, payload=ifca.make_payload(state))
    update = train_with(ifca, ctx)
    agg = weighted_mean()
    aggregate = agg.finalize(agg.accumulate(agg.start(init.layout), update))
    rctx = RoundContext(round=1, seed=0, population=1, sampled=1, layout=init.layout)
    delta, new_state = ifca.server_step(aggregate, state, rctx)
    assert torch.equal(new_state["clusters"], far)
    assert torch.equal(delta, update.delta) and delta.abs().sum() > 0  # FedAvg's step exactly


def test_ties_go_to_the_lowest_cluster_and_the_module_keeps_the_global_model() -> None:
    init = Parameters.from_module(_linear())
    ifca = IFCA(clusters=3, starts=torch.stack([init.vector, init.vector]))
    module = _linear()
    init.load_into(module)
    module.train()
    ctx = TrainContext("a", module, init, Split(torch.randn(4, 2), torch.tensor([0, 1, 0, 1])),
                       LocalTraining(), torch.nn.functional.cross_entropy, seed=0,
                       payload=ifca.make_payload(ifca.init_server(init.layout)))
    terms = ifca.local_terms(ctx)
    assert int(ctx.client_state[CLUSTER_KEY][0]) == 0 and terms.start is None
    assert module.training and torch.equal(Parameters.from_module(module).vector, init.vector)


# -- runs ----------------------------------------------------------------------------------------


def flipped(groups: int = 2, per_group: int = 4, n: int = 60, d: int = 5, seed: int = 0
            ) -> FederatedDataset:
    """Binary labels from one linear rule; the second group's labels are flipped."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, generator=g)
    clients = {}
    for group in range(groups):
        for i in range(per_group):
            def split(m: int) -> Split:
                x = torch.randn(m, d, generator=g)
                y = (x @ w > 0).long()
                return Split(x, 1 - y if group % 2 else y)
            clients[f"g{group}c{i}"] = ClientData(split(n), split(n // 2))
    return FederatedDataset("flipped", clients, 2, (d,))


FLIPPED = flipped()


def config(**extra: object) -> dict:
    return {
        "name": "ifca", "rounds": 10, "seed": 0,
        "model": {"name": "logistic"},
        "algorithm": {"name": "ifca", "lr": 0.5, "batch_size": 16},
        "personalization": {"clusters": 2},
        **extra,
    }


def test_ifca_recovers_flipped_groups_and_beats_fedavg() -> None:
    ifca = consortium.simulate(config(), dataset=FLIPPED, report=False)
    fedavg = consortium.simulate(config(algorithm={"name": "fedavg", "lr": 0.5, "batch_size": 16}),
                                 dataset=FLIPPED, report=False)
    assignment = ifca.summary["ifca"]["assignment"]
    by_group = {g: {assignment[c] for c in assignment if c.startswith(g)} for g in ("g0", "g1")}
    assert len(by_group["g0"]) == 1 and len(by_group["g1"]) == 1  # each group one cluster
    assert by_group["g0"] != by_group["g1"]
    assert ifca.summary["ifca"]["sizes"] == [4, 4]
    assert ifca.summary["personalized"]["accuracy"] > 0.9
    assert fedavg.summary["final"]["accuracy"] < 0.7
    assert ifca.summary["personalized"]["accuracy"] > fedavg.summary["final"]["accuracy"] + 0.25
    assert ifca.history[-1]["ifca_cluster_sizes"] == [4, 4]


def test_one_cluster_is_fedavg_bit_for_bit() -> None:
    a = consortium.simulate(config(rounds=3, personalization={"clusters": 1}), dataset=FLIPPED,
                            report=False)
    b = consortium.simulate(config(rounds=3, algorithm={"name": "fedavg", "lr": 0.5,
                                                        "batch_size": 16}),
                            dataset=FLIPPED, report=False)
    assert torch.equal(a.params.vector, b.params.vector)
    assert a.summary["final"] == b.summary["final"]


def _run(cfg: dict, executor: object, out: Path) -> tuple[consortium.SimulationResult, dict]:
    result = consortium.simulate(cfg, dataset=FLIPPED, executor=executor, out=out, report=False)
    state, store = load_checkpoint(out / "checkpoint", layout=result.params.layout,
                                   rounds=cfg["rounds"])
    return result, {"server": state.algorithm["clusters"], **store.to_flat()}


def test_sequential_and_vectorised_agree(tmp_path: Path, capsys) -> None:
    cfg = config(rounds=4, model={"name": "mlp", "hidden": [6]}, sampling={"clients_per_round": 5},
                 simulation={"stragglers": 0.5})
    a, sa = _run(cfg, SequentialExecutor(), tmp_path / "a")
    b, sb = _run(cfg, VectorizedExecutor(), tmp_path / "b")
    assert "cannot batch" not in capsys.readouterr().err
    assert torch.allclose(a.params.vector, b.params.vector, atol=1e-6, rtol=0)
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.allclose(sa[key].double(), sb[key].double(), atol=1e-6, rtol=0), key
    assert a.summary["ifca"] == b.summary["ifca"]
    assert a.summary["personalized"]["accuracy"] == pytest.approx(
        b.summary["personalized"]["accuracy"], abs=1e-9)


def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path: Path) -> None:
    class StopAfter:
        def on_round_end(self, record, state) -> None:
            if record["round"] == 2:
                raise KeyboardInterrupt

    cfg = config(rounds=4, sampling={"clients_per_round": 5})
    whole, sw = _run(cfg, SequentialExecutor(), tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        consortium.simulate(cfg, dataset=FLIPPED, out=tmp_path / "cut", callbacks=[StopAfter()],
                            executor=SequentialExecutor(), report=False)
    resumed = consortium.simulate(resume=tmp_path / "cut", dataset=FLIPPED,
                                  executor=SequentialExecutor(), report=False)
    _, sr = _run(cfg, SequentialExecutor(), tmp_path / "again")  # same config, fresh: as whole
    assert torch.equal(resumed.params.vector, whole.params.vector)
    state, store = load_checkpoint(tmp_path / "cut" / "checkpoint", layout=whole.params.layout,
                                   rounds=4)
    assert torch.equal(state.algorithm["clusters"], sw["server"])
    flat = store.to_flat()
    assert flat.keys() == {k for k in sw if k != "server"}
    assert all(torch.equal(flat[k], sw[k]) for k in flat)
    assert resumed.summary["ifca"] == whole.summary["ifca"]
    assert resumed.summary["personalized"] == whole.summary["personalized"]
    assert resumed.summary["per_client"] == whole.summary["per_client"]
    assert torch.equal(sr["server"], sw["server"])  # the clusters' draws repeat exactly


def test_secure_aggregation_sees_only_sums_and_agrees() -> None:
    cfg = config(rounds=4, secure_aggregation={"enabled": True})
    secure = consortium.simulate(cfg, dataset=FLIPPED, report=False)
    plain = consortium.simulate(config(rounds=4), dataset=FLIPPED, report=False)
    assert secure.summary["ifca"]["assignment"] == plain.summary["ifca"]["assignment"]
    assert torch.allclose(secure.params.vector, plain.params.vector, atol=1e-2)
    assert secure.history[-1]["ifca_cluster_sizes"] == plain.history[-1]["ifca_cluster_sizes"]


# -- what it refuses -------------------------------------------------------------------------------


@pytest.mark.parametrize("section, values, names", [
    ("server", {"optimizer": "adam"}, "server.optimizer"),
    ("server", {"lr": 0.5}, "server.lr"),
    ("privacy", {"mode": "central", "noise_multiplier": 1.0}, "privacy.mode"),
    ("privacy", {"mode": "local", "noise_multiplier": 1.0}, "privacy.mode"),
    ("aggregation", {"rule": "median"}, "aggregation.rule"),
    ("aggregation", {"update_bound": 3.0}, "update_bound"),
    ("attack", {"kind": "sign-flip", "fraction": 0.25}, "sign-flip"),
])
def test_refused_combinations(section: str, values: dict, names: str) -> None:
    with pytest.raises(ConfigError, match=names):
        ExperimentConfig.from_dict(config(**{section: values}))


def test_data_attacks_and_secure_aggregation_are_allowed() -> None:
    from consortium.federation import assemble

    cfg = ExperimentConfig.from_dict(config(attack={"kind": "label-flip", "fraction": 0.25},
                                            secure_aggregation={"enabled": True}))
    f = assemble(cfg)  # the whole run is built: no builder refuses the combination
    assert f.algorithm.name == "ifca" and f.secure_sum is not None and f.threat is not None


def test_clusters_must_be_positive_and_starting_models_given() -> None:
    with pytest.raises(ConfigError, match="personalization.clusters"):
        ExperimentConfig.from_dict(config(personalization={"clusters": 0}))
    layout = Parameters.from_module(_linear()).layout
    with pytest.raises(ConfigError, match="with_model"):
        IFCA(clusters=2).init_server(layout)
    assert build_algorithm("ifca", clusters=3) == IFCA(clusters=3)


def test_starting_models_are_seeded_draws_of_the_model() -> None:
    init = Parameters.from_module(_linear())
    a = IFCA(clusters=3).with_model(init, _linear, seed=5)
    b = IFCA(clusters=3).with_model(init, _linear, seed=5)
    c = IFCA(clusters=3).with_model(init, _linear, seed=6)
    assert a.starts is not None and b.starts is not None and c.starts is not None
    assert a.starts.shape == (2, 4) and torch.equal(a.starts, b.starts)
    assert not torch.equal(a.starts, c.starts) and not torch.equal(a.starts[0], a.starts[1])
