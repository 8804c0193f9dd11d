"""Personalised runs end to end: fine-tuning, personalised evaluation in summary.json and
metrics.jsonl, the spread across clients, the report, and checkpoint/resume of the heads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from consortium import simulate
from consortium.client.evaluation import client_spread, evaluate_model
from consortium.client.training import train_locally
from consortium.federation import local_training
from consortium.seeds import derive_seed
from consortium.server.checkpoint import load_checkpoint
from tests.conftest import make_toy

TOY = make_toy(5, sizes=[40, 25, 60, 33, 50], seed=1)


def config(algorithm: str = "fedavg", **personalization: object) -> dict:
    return {
        "name": "personal", "rounds": 3, "seed": 4,
        "model": {"name": "mlp", "hidden": [6]},
        "algorithm": {"name": algorithm, "lr": 0.2, "batch_size": 8},
        "personalization": personalization,
        "sampling": {"clients_per_round": 3},
    }


def test_client_spread_by_hand() -> None:
    # [1, 0.5]: mean 0.75, std 0.25, p10 = 0.5 + 0.1·0.5, Jain (1.5)² / (2 · 1.25) = 0.9
    assert client_spread([1.0, 0.5]) == pytest.approx(
        {"mean": 0.75, "worst": 0.5, "p10": 0.55, "std": 0.25, "jain": 0.9, "worst10_mean": 0.5})
    # worst 10 % of 11 clients: the lowest ceil(1.1) = 2 values, (0 + 0.1) / 2
    assert client_spread([0.1, 0.0] + [1.0] * 9)["worst10_mean"] == pytest.approx(0.05)
    assert client_spread([0.8] * 4)["jain"] == pytest.approx(1.0)
    assert client_spread([1.0, 0.0, 0.0, 0.0])["jain"] == pytest.approx(0.25)  # 1/n
    assert client_spread([float("nan")]) == {}


def test_fine_tuning_is_each_client_training_the_final_model_alone() -> None:
    plain = simulate(config(), dataset=TOY)
    tuned = simulate(config(finetune_steps=5), dataset=TOY)
    assert torch.equal(plain.params.vector, tuned.params.vector)  # the federation is unchanged
    assert "personalized" not in plain.summary
    assert plain.summary["final"] == {k: v for k, v in tuned.summary["final"].items()}
    settings = local_training(tuned.config)
    for cid, data in TOY.clients.items():
        module = tuned.model
        tuned.params.load_into(module)
        train_locally(module, data.train, settings, loss_fn=torch.nn.functional.cross_entropy,
                      seed=derive_seed(4, "finetune", cid), steps=5)
        own = evaluate_model(module, data.test, loss_fn=torch.nn.functional.cross_entropy,
                             num_classes=2)
        entry = tuned.per_client[cid]
        assert entry["personalized_loss"] == pytest.approx(own["loss"], abs=1e-6)
        assert entry["personalized_accuracy"] == own["accuracy"]
    sizes = {cid: len(d.test) for cid, d in TOY.clients.items()}
    weighted = sum(tuned.per_client[c]["personalized_accuracy"] * n for c, n in sizes.items())
    assert tuned.summary["personalized"]["accuracy"] == pytest.approx(weighted / sum(sizes.values()))


def test_summary_metrics_and_report_of_a_personalised_run(tmp_path: Path) -> None:
    cfg = {**config("fedrep", finetune_steps=2), "evaluation": {"baselines": ["local"]}}
    result = simulate(cfg, dataset=TOY, out=tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert set(summary["personalized"]) >= {"accuracy", "loss", "balanced_accuracy", "auc"}
    assert not any(k.startswith("personalized_") for k in summary["final"])
    assert "accuracy_jain" not in summary["final"]  # the spread is under client_accuracy
    entry = summary["per_client"]["c0"]
    for kind in ("global", "personalized", "local"):
        assert f"{kind}_accuracy" in entry
    assert entry["global_accuracy"] == entry["accuracy"]
    assert entry["local_accuracy"] == pytest.approx(
        result.summary["per_client"]["c0"]["local_accuracy"])
    spread = summary["client_accuracy"]
    assert set(spread) == {"global", "personalized", "local"}
    accs = [summary["per_client"][c]["personalized_accuracy"] for c in TOY.clients]
    assert spread["personalized"] == pytest.approx(client_spread(accs))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert "personalized_accuracy" in records[0]  # a personalised algorithm: every evaluation
    assert "accuracy_jain" not in records[0]  # the spread: in the final evaluation
    last = records[-1]
    for name in ("accuracy", "personalized_accuracy"):
        assert last[f"{name}_jain"] == pytest.approx(spread["global" if name == "accuracy"
                                                            else "personalized"]["jain"])
    html = (tmp_path / "run" / "report.html").read_text()
    assert "global, personalised and local-only models" in html
    assert "Jain&#x27;s index" in html or "Jain's index" in html


def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path: Path) -> None:
    class StopAfter:
        def on_round_end(self, record, state) -> None:
            if record["round"] == 2:
                raise KeyboardInterrupt

    cfg = {**config("fedrep", head_epochs=2, finetune_steps=3), "rounds": 4}
    cfg["algorithm"] = {**cfg["algorithm"], "momentum": 0.5}
    whole = simulate(cfg, dataset=TOY, out=tmp_path / "whole", report=False)
    with pytest.raises(KeyboardInterrupt):
        simulate(cfg, dataset=TOY, out=tmp_path / "cut", callbacks=[StopAfter()], report=False)
    resumed = simulate(resume=tmp_path / "cut", dataset=TOY, report=False)
    assert torch.equal(resumed.params.vector, whole.params.vector)
    layout = whole.params.layout
    _, a = load_checkpoint(tmp_path / "whole" / "checkpoint", layout=layout, rounds=4)
    _, b = load_checkpoint(tmp_path / "cut" / "checkpoint", layout=layout, rounds=4)
    heads_a, heads_b = a.to_flat(), b.to_flat()
    assert heads_a.keys() == heads_b.keys() and heads_a
    assert all(torch.equal(heads_a[k], heads_b[k]) for k in heads_a)
    assert resumed.summary["personalized"] == whole.summary["personalized"]
    assert resumed.summary["per_client"] == whole.summary["per_client"]


def test_the_example_config_runs() -> None:
    example = Path(__file__).resolve().parents[2] / "examples" / "personalized_digits.toml"
    result = simulate(example, overrides=["rounds=2", "data.clients=10", "evaluation.baselines=[]"])
    assert result.summary["algorithm"] == "fedrep"
    assert 0 < result.summary["personalized"]["accuracy"] <= 1


def test_sampled_evaluation_estimates_the_personalised_metrics_too() -> None:
    cfg = {**config("fedper"), "evaluation": {"clients": 3}}
    history = simulate(cfg, dataset=TOY).history
    first, last = history[0], history[-1]
    assert "accuracy_se" in first and "personalized_accuracy_se" in first
    assert "personalized_accuracy_se" not in last  # the last round evaluates every client
    assert "personalized_evaluated_clients" not in first
