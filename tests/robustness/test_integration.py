"""Robust rules and attacks in a run: config sections, checks at build, flagged clients in the
log, resumable state, FLTrust's root update, backdoor success, and the robustness report."""

from __future__ import annotations

import json

import pytest
import torch

import consortium
from consortium.cli import main
from consortium.config import load_config
from consortium.errors import ConfigError, PipelineError
from tests.conftest import make_toy

BASE = {"rounds": 3, "seed": 1, "sampling": {"fraction": 1.0}, "executor": {"kind": "sequential"},
        "algorithm": {"lr": 0.3}}


def run(dataset_clients: int = 8, **sections):
    return consortium.simulate({**BASE, **sections}, dataset=make_toy(dataset_clients))


def test_rule_and_attack_sections_take_their_own_parameters() -> None:
    cfg = load_config(None, ['aggregation.rule="trimmed-mean"', "aggregation.f=1",
                             'attack.kind="sign-flip"', "attack.scale=4", "attack.fraction=0.25"])
    assert cfg.aggregation.params == (("f", 1),) and cfg.attack.params == (("scale", 4),)
    again = consortium.config.ExperimentConfig.from_dict(cfg.to_dict())
    assert again == cfg  # the parameters survive config.toml in the run directory


@pytest.mark.parametrize(("overrides", "complaint"), [
    (['aggregation.rule="medain"'], "known rules: mean, bulyan"),
    (['aggregation.rule="krum"', "aggregation.beta=0.1"], "has no parameter 'beta'"),
    (["aggregation.f=1"], "mean\" takes no parameters"),
    (['attack.kind="sign-flop"'], "known attacks"),
    (["attack.scale=4"], "without attack.kind"),
    (['aggregation.rule="median"', "secure_aggregation.enabled=true"], "secure aggregation hides"),
    (['attack.kind="ipm"', "attack.fraction=0.25", "secure_aggregation.enabled=true"],
     "rewrites individual updates"),
])
def test_bad_combinations_are_refused_when_the_config_is_read(overrides, complaint) -> None:
    with pytest.raises(ConfigError, match=complaint):
        load_config(None, overrides)


def test_too_few_clients_per_round_for_f_fails_before_round_one() -> None:
    with pytest.raises(PipelineError, match=r"krum.*f = 3.*at least 9.*raise the clients per round"):
        run(aggregation={"rule": "krum", "f": 3})


def test_flagged_clients_and_attackers_reach_metrics_jsonl(tmp_path) -> None:
    cfg = {**BASE, "aggregation": {"rule": "krum", "f": 2},
           "attack": {"kind": "sign-flip", "fraction": 0.25, "scale": 10.0}}
    result = consortium.simulate(cfg, dataset=make_toy(8), out=tmp_path / "run", report=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    attackers = set(result.summary["attack"]["malicious"])
    assert len(attackers) == 2
    for r in records:
        assert set(r["attackers"]) == attackers and r["robust_rule"] == "krum"
        assert attackers <= set(r["robust_flagged"])  # Krum never picks a 10x flipped update


def test_sign_flip_breaks_the_mean_and_the_median_holds() -> None:
    attack = {"kind": "sign-flip", "fraction": 0.25, "scale": 8.0}
    clean = run(rounds=6, aggregation={"rule": "median", "f": 2})
    mean = run(rounds=6, attack=attack)
    median = run(rounds=6, aggregation={"rule": "median", "f": 2}, attack=attack)
    assert clean.summary["final"]["accuracy"] > 0.75
    assert mean.summary["final"]["accuracy"] < clean.summary["final"]["accuracy"] - 0.2
    assert median.summary["final"]["accuracy"] > mean.summary["final"]["accuracy"] + 0.15


def test_default_rules_hold_under_ipm_where_their_old_defaults_fell() -> None:
    # Xie et al. 2020's IPM (ε = 10) from 2 of 10 clients. The rules named without parameters
    # defend; their old defaults (centered clipping's τ = 10, Multi-Krum's and trimmed mean's
    # f = 1) never clipped or excluded anyone and fell with the mean.
    attack = {"kind": "ipm", "fraction": 0.2, "epsilon": 10.0}

    def acc(**aggregation):
        return run(10, rounds=6, attack=attack, aggregation=aggregation).summary["final"]["accuracy"]

    mean = acc()
    for default, old in [({"rule": "centered-clipping"}, {"tau": 10.0}),
                         ({"rule": "multi-krum"}, {"f": 1}),
                         ({"rule": "trimmed-mean"}, {"f": 1})]:
        held, fell = acc(**default), acc(**default, **old)
        assert held > mean + 0.15 and held > fell + 0.15, (default, held, fell, mean)


def test_centered_clipping_resumes_to_the_same_model(tmp_path) -> None:
    cfg = {**BASE, "rounds": 4, "aggregation": {"rule": "centered-clipping", "tau": 0.05}}
    whole = consortium.simulate(cfg, dataset=make_toy(6))
    consortium.simulate({**cfg, "rounds": 2}, dataset=make_toy(6), out=tmp_path / "r", report=False)
    text = (tmp_path / "r" / "config.toml").read_text().replace("rounds = 2", "rounds = 4")
    (tmp_path / "r" / "config.toml").write_text(text)
    resumed = consortium.simulate(resume=tmp_path / "r", dataset=make_toy(6), report=False)
    assert torch.equal(whole.params.vector, resumed.params.vector)
    assert any(r["robust_flagged"] for r in whole.history)  # tau this small clips someone


def test_fltrust_trains_a_root_update_and_distrusts_flipped_clients() -> None:
    result = run(aggregation={"rule": "fltrust", "root_examples": 40},
                 attack={"kind": "sign-flip", "fraction": 0.25})
    attackers = set(result.summary["attack"]["malicious"])
    for r in result.history:
        assert attackers <= set(r["robust_flagged"])  # cos < 0 with the root update: trust 0


def test_backdoor_success_is_measured_and_norm_bounding_limits_model_replacement() -> None:
    # one attacker of ten boosts its backdoored update tenfold (Bagdasaryan et al. 2020); the
    # median-norm bound cuts it back to an honest length (Sun et al. 2019)
    attack = {"kind": "model-replacement", "fraction": 0.1, "target_label": 1, "poison_fraction": 0.3}
    toy = make_toy(10, d=10)
    plain = consortium.simulate({**BASE, "rounds": 4, "attack": attack}, dataset=toy)
    bounded = consortium.simulate(
        {**BASE, "rounds": 4, "attack": attack, "aggregation": {"rule": "norm-bound"}}, dataset=toy
    )
    assert plain.summary["final"]["backdoor_success"] > 0.9
    assert bounded.summary["final"]["backdoor_success"] < 0.3
    assert all(plain.summary["attack"]["malicious"][0] in r["robust_flagged"] for r in bounded.history)


def test_robustness_command_writes_the_matrix(tmp_path, capsys) -> None:
    out = tmp_path / "rob"
    code = main(["robustness", "--rules", "mean,median", "--attacks", "none,sign-flip:scale=4",
                 "--fraction", "0.25", "--out", str(out), "--set", "rounds=2",
                 "--set", "evaluation.baselines=[]"])
    assert code == 0
    table = json.loads((out / "robustness.json").read_text())
    assert set(table) == {"mean", "median"}
    for row in table.values():
        assert set(row) == {"none", "sign-flip:scale=4"}
        for cell in row.values():
            assert 0.0 <= cell["accuracy"] <= 1.0 and cell["backdoor_success"] is None
    assert (out / "robustness.png").stat().st_size > 0
    assert "| median |" in (out / "robustness.md").read_text()
    assert "sign-flip:scale=4" in capsys.readouterr().out


def test_robustness_command_rejects_an_unknown_rule_before_running(tmp_path, capsys) -> None:
    code = main(["robustness", "--rules", "mean,krun", "--out", str(tmp_path / "x")])
    assert code == 2 and "known rules" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("no_f", [False, True])
def test_robustness_command_gives_f_unless_told_not_to_and_never_with_beta(tmp_path, no_f) -> None:
    out = tmp_path / "rob"
    args = ["robustness", "--rules", "trimmed-mean:beta=0.25,krum", "--attacks", "none",
            "--fraction", "0.25", "--out", str(out), "--set", "rounds=1",
            "--set", "evaluation.baselines=[]"]
    assert main(args + (["--no-f"] if no_f else [])) == 0
    table = json.loads((out / "robustness.json").read_text())
    assert "error" not in table["trimmed-mean:beta=0.25"]["none"]  # beta and f clashed before
    # the demo's rounds have 4 clients: Krum told f = 1 needs 5; by default it takes f = 0
    krum_cell = table["krum"]["none"]
    if no_f:
        assert "error" not in krum_cell and krum_cell["accuracy"] > 0
    else:
        assert "f = 1 needs at least 5 clients per round" in krum_cell["error"]
    meta = "each rule's default (--no-f)" if no_f else "expected attackers per round"
    assert f"- f: {meta}" in (out / "robustness.md").read_text()
