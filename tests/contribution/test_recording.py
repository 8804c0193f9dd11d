"""Recording the rounds, coalition models, scores in a run, the CLI and the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from consortium.aggregation.mean import weighted_mean
from consortium.cli import main
from consortium.contribution import (
    RecordingAggregator,
    RoundUpdates,
    Settings,
    benefit,
    combine_rounds,
    load_rounds,
)
from consortium.errors import CheckpointError, ConfigError
from consortium.simulation import simulate
from consortium.types import Layout, Update

FAST = ["rounds=3", 'evaluation.baselines=["local"]']


def test_coalition_model_by_hand(tmp_path: Path) -> None:
    rnd = RoundUpdates(
        round=2, start=torch.tensor([1.0, 1.0]), clients=("a", "b", "c"),
        deltas=torch.tensor([[2.0, 0.0], [0.0, 4.0], [1.0, 1.0]]),
        weights=torch.tensor([1.0, 3.0, 0.0], dtype=torch.float64),
    )
    assert torch.equal(rnd.coalition(frozenset()), rnd.start)
    # (1·[2, 0] + 3·[0, 4]) / 4 = [0.5, 3]
    assert torch.allclose(rnd.coalition(frozenset({"a", "b"})), torch.tensor([1.5, 4.0]))
    assert torch.allclose(rnd.coalition(frozenset({"b"})), torch.tensor([1.0, 5.0]))
    assert torch.equal(rnd.coalition(frozenset({"c"})), rnd.start)  # weight 0: no move
    rnd.save(tmp_path)
    back = load_rounds(tmp_path)[0]
    assert back.round == 2 and back.clients == rnd.clients
    assert torch.equal(back.deltas, rnd.deltas) and torch.equal(back.weights, rnd.weights)


def test_recording_aggregator_is_transparent() -> None:
    seen: list[str] = []
    inner = weighted_mean()
    rec = RecordingAggregator(inner, lambda u: seen.append(u.client_id))
    assert hasattr(rec, "accumulate") and not hasattr(rec, "aggregate")  # still streaming
    assert rec.name == inner.name and rec.linear
    layout = Layout.of({"w": torch.zeros(2)})
    acc = rec.start(layout)
    for cid, d in (("a", [1.0, 0.0]), ("b", [0.0, 2.0])):
        acc = rec.accumulate(acc, Update(cid, torch.tensor(d), 1.0))
    assert seen == ["a", "b"]
    assert torch.allclose(rec.finalize(acc).delta, torch.tensor([0.5, 1.0]))


def test_flags_and_benefit() -> None:
    rounds = [
        {"values": {"a": 0.3, "b": 0.0, "c": -0.05, "d": 0.02}, "full": 0.8, "empty": 0.5,
         "standard_error": {"a": 0.01, "b": 0.0, "c": 0.0, "d": 0.02}, "evaluations": 9,
         "seconds": 0.0},
    ]
    out = combine_rounds(rounds, ["a", "b", "c", "d"], Settings("tmc-shapley"))
    # b: zero; c: negative; d: positive but within 2 standard errors of zero (undetermined,
    # not flagged: its upper bound 0.06 is above 0.1 × the fair share 0.3 / 4)
    assert out["flagged"] == ["b", "c"] and out["ranking"][0] == "a"
    assert out["indistinguishable"] == ["d"]
    # confidently below the fair share: 0.002 + 2 · 0.001 ≤ 0.1 × 0.075
    rounds[0]["values"]["d"], rounds[0]["standard_error"]["d"] = 0.002, 0.001
    out = combine_rounds(rounds, ["a", "b", "c", "d"], Settings("tmc-shapley"))
    assert out["flagged"] == ["b", "c", "d"] and out["indistinguishable"] == []
    assert out["total"] == pytest.approx(0.3)
    ben, basis = benefit({"a": {"global_accuracy": 0.8, "local_accuracy": 0.7},
                          "b": {"global_accuracy": 0.6}})
    assert ben == pytest.approx({"a": 0.1}) and basis == "global"
    ben, basis = benefit({"a": {"global_accuracy": 0.8, "personalized_accuracy": 0.9,
                                "local_accuracy": 0.7}})
    assert ben == pytest.approx({"a": 0.2}) and basis == "personalized"


def test_exact_shapley_in_a_run(tmp_path: Path) -> None:
    """Efficiency over the run, the same model as without scoring, the benefit table."""
    plain = simulate(overrides=FAST, report=False)
    run = simulate(overrides=[*FAST, "contribution.method=exact-shapley",
                              "contribution.record=true"], out=tmp_path / "run", report=False)
    assert torch.equal(plain.params.vector, run.params.vector)  # recording changes nothing
    c = run.summary["contribution"]
    assert c["method"] == "exact-shapley" and c["rounds"] == 3
    assert sum(c["scores"].values()) == pytest.approx(c["total"], abs=1e-9)
    assert c["evaluations"] == 3 * 2**4
    assert set(c["benefit"]) == set(c["scores"]) and c["benefit_basis"] == "global"
    for cid, b in c["benefit"].items():
        pc = run.summary["per_client"][cid]
        assert b == pytest.approx(pc["global_accuracy"] - pc["local_accuracy"])
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())["contribution"]
    assert saved["scores"] == pytest.approx(c["scores"])
    # the CLI rescoring the recorded rounds with the run's method gives the same scores
    assert main(["contribution", str(tmp_path / "run"), "--method", "exact-shapley"]) == 0
    again = json.loads((tmp_path / "run" / "contribution.json").read_text())
    assert again["scores"] == pytest.approx(c["scores"], abs=1e-12)
    assert main(["contribution", str(tmp_path / "run"), "--method", "gtg-shapley", "--json"]) == 0


def test_gtg_is_deterministic_for_a_seed() -> None:
    over = [*FAST, "contribution.method=gtg-shapley", "contribution.permutations=8"]
    a = simulate(overrides=over, report=False).summary["contribution"]
    b = simulate(overrides=over, report=False).summary["contribution"]
    assert a["scores"] == b["scores"] and a["standard_error"] == b["standard_error"]


def test_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match="never sees under secure aggregation.*leave-one-out"):
        simulate(overrides=[*FAST, "contribution.method=gtg-shapley",
                            "secure_aggregation.enabled=true"], report=False)
    with pytest.raises(ConfigError, match="exact-shapley.*12 clients per round.*gtg-shapley"):
        simulate(overrides=[*FAST, "contribution.method=exact-shapley", "data.dataset=synthetic",
                            "data.clients=12", "sampling.clients_per_round=12"], report=False)
    with pytest.raises(ConfigError, match="contribution.permutations"):
        simulate(overrides=[*FAST, "contribution.permutations=1"], report=False)
    simulate(overrides=FAST, out=tmp_path / "plain", report=False)
    with pytest.raises(CheckpointError, match="contribution.record = true"):
        load_rounds(tmp_path / "plain" / "contribution")
    assert main(["contribution", str(tmp_path / "plain")]) == 2
    assert "contribution.record = true" in capsys.readouterr().err


def test_report_section(tmp_path: Path) -> None:
    from consortium.reporting.contribution import contribution_section
    from consortium.reporting.report import write_report

    assert contribution_section({}) == ""
    summary = {"contribution": {
        "method": "exact-shapley", "utility": "accuracy", "scores": {"a": 0.2, "b": -0.1},
        "standard_error": {"a": 0.0, "b": 0.0}, "flagged": ["b"], "benefit": {"a": 0.05},
        "benefit_basis": "global", "total": 0.1, "rounds": 2, "evaluations": 8}}
    html = contribution_section(summary)
    assert "Contribution and benefit" in html and "+0.2000" in html and "+0.050" in html
    assert html.index(">a<") < html.index(">b<") and "low / free-rider" in html
    run = simulate(overrides=[*FAST, "contribution.method=leave-one-out"], out=tmp_path / "r")
    assert run.summary["contribution"]["method"] == "leave-one-out"
    assert "Contribution and benefit" in write_report(tmp_path / "r").read_text()


def test_a_model_attack_is_recorded_as_sent() -> None:
    """The recorder sits inside a simulated attacker's wrapper: it records the attacked update."""
    from consortium.config import load_config
    from consortium.federation import assemble

    cfg = load_config(None, [*FAST, "contribution.method=leave-one-out", "attack.kind=sign-flip",
                             "attack.ids=[\"va\"]"])
    fed = assemble(cfg)
    outer = fed.pipeline.aggregator
    assert type(outer).__name__ == "AttackedAggregator"
    assert isinstance(outer.inner, RecordingAggregator)
    fed.executor.close()


def test_a_resumed_run_keeps_the_scores_before_the_stop(tmp_path: Path) -> None:
    over = [*FAST, "contribution.method=exact-shapley"]
    whole = simulate(overrides=over, report=False).summary["contribution"]

    class Stop:
        def on_round_end(self, record: dict, state: object) -> None:
            if record["round"] == 2:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        simulate(overrides=over, out=tmp_path / "r", report=False, callbacks=[Stop()])
    resumed = simulate(resume=tmp_path / "r", report=False).summary["contribution"]
    assert resumed["rounds"] == 3
    assert resumed["scores"] == pytest.approx(whole["scores"], abs=1e-12)


@pytest.mark.parametrize("rule", ["median", "centered-clipping"])
def test_buffered_and_stateful_rules_train_the_same_model(rule: str) -> None:
    over = [*FAST, f"aggregation.rule={rule}"]
    plain = simulate(overrides=over, report=False)
    scored = simulate(overrides=[*over, "contribution.method=leave-one-out"], report=False)
    assert torch.equal(plain.params.vector, scored.params.vector)
    assert scored.summary["contribution"]["rounds"] == 3


def test_an_absurd_update_gets_a_finite_negative_score() -> None:
    """A site whose update breaks the model (inf) scores very negative; nobody gets NaN."""
    from consortium.contribution import ModelUtility, score_round
    from consortium.data.base import Split
    from consortium.types import Parameters

    def factory() -> torch.nn.Module:
        return torch.nn.Linear(2, 2)

    template = Parameters.from_module(factory())
    data = Split(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1]))
    d = template.vector.numel()
    rnd = RoundUpdates(1, torch.zeros(d), ("good", "bad"),
                       torch.stack([torch.zeros(d), torch.full((d,), float("inf"))]),
                       torch.tensor([1.0, 1.0], dtype=torch.float64))
    for utility in ("loss", "accuracy"):
        out = score_round(rnd, ModelUtility(factory, template, data, utility=utility),
                          Settings("exact-shapley", utility=utility))
        assert all(v == v for v in out["values"].values())  # no NaN
        assert out["values"]["bad"] < 0 <= out["values"]["good"]


def test_leave_one_out_by_retraining_works_under_secure_aggregation(tmp_path: Path) -> None:
    """n + 1 federations, each under SecAgg; the scores are v(N) − v(N ∖ {i}) of those runs."""
    import copy
    import dataclasses as dc

    from consortium.contribution import ModelUtility, validation_data
    from consortium.data import load_dataset

    over = ["rounds=2", "evaluation.baselines=[]", "secure_aggregation.enabled=true"]
    run = simulate(overrides=over, out=tmp_path / "r", report=False)
    assert main(["contribution", str(tmp_path / "r"), "--retrain"]) == 0
    out = json.loads((tmp_path / "r" / "contribution.json").read_text())
    assert out["method"] == "leave-one-out (retrained)" and out["runs"] == 5
    # by hand for one site: the federation without "va" on the same validation data
    cfg = run.config
    ds = load_dataset(cfg.data, seed=cfg.seed)
    rest = {c: ds.clients[c] for c in ds.client_ids if c != "va"}
    without = simulate(cfg.replace(sampling=dc.replace(cfg.sampling, clients_per_round=3)),
                       dataset=dc.replace(ds, clients=rest, groups={}, fitting={}), report=False)
    evaluate = ModelUtility(lambda: copy.deepcopy(run.model), run.params,
                            validation_data(ds, "sites"), utility=cfg.contribution.utility)
    expected = evaluate(run.params.vector) - evaluate(without.params.vector)
    assert out["scores"]["va"] == pytest.approx(expected, abs=1e-12)


def _hospitals_plus_shuffled_and_twin() -> object:
    """The four hospitals, a label-shuffled copy of Budapest's training rows and a twin of
    Cleveland's (the acceptance case of issue 19; benchmarks/contribution.py builds it too)."""
    from consortium.config import ExperimentConfig, default_config_dict
    from consortium.data import load_dataset
    from consortium.data.base import ClientData, FederatedDataset, Split

    ds = load_dataset(ExperimentConfig.from_dict(default_config_dict()).data, seed=0)
    clients = {cid: ds.clients[cid] for cid in ds.client_ids}
    hung, clev = clients["hungarian"], clients["cleveland"]
    empty = Split(hung.test.x[:0], hung.test.y[:0])
    order = torch.randperm(len(hung.train), generator=torch.Generator().manual_seed(0))
    clients["shuffled"] = ClientData(train=Split(hung.train.x.clone(), hung.train.y[order]),
                                     test=empty)
    clients["twin"] = ClientData(train=Split(clev.train.x.clone(), clev.train.y.clone()),
                                 test=empty)
    return FederatedDataset(name="heart-disease+2", clients=clients, num_classes=ds.num_classes,
                            input_shape=ds.input_shape, feature_names=ds.feature_names)


def test_the_default_utility_meets_the_acceptance() -> None:
    """``utility = "loss"`` is the default: exact Shapley ranks the shuffled site last with a
    score ≤ 0 (flagged) and the twin next to Cleveland, whose value it shares."""
    from consortium.config import ContributionConfig

    assert ContributionConfig().utility == "loss"
    data = _hospitals_plus_shuffled_and_twin()
    run = simulate(overrides=["rounds=8", "sampling.clients_per_round=6", "evaluation.baselines=[]",
                              "contribution.method=exact-shapley"], dataset=data, report=False)
    c = run.summary["contribution"]
    assert c["utility"] == "loss"
    assert c["ranking"][-1] == "shuffled" and c["scores"]["shuffled"] <= 0
    assert c["flagged"] == ["shuffled"]
    assert abs(c["scores"]["twin"] - c["scores"]["cleveland"]) < 0.25 * c["scores"]["cleveland"]


@pytest.mark.slow
def test_the_flag_spares_honest_clients_within_the_error_at_100_clients() -> None:
    """100 digits clients, 10 flipping labels, GTG with a loss utility: the 10 are in the
    bottom 15 and flagged; no honest client whose score is within 2 standard errors of 0 is
    flagged (the old rule flagged 34 of them), and an honest client flagged has a score below
    0 beyond its error (it raised the pooled loss: 8 of 90 in RESULTS.md)."""
    over = ["rounds=10", "data.dataset=digits", "data.clients=100", "data.partition=iid",
            "sampling.clients_per_round=100", "evaluation.baselines=[]",
            "attack.kind=label-flip", "attack.fraction=0.1",
            "contribution.method=gtg-shapley", "contribution.permutations=30"]
    res = simulate(overrides=over, report=False)
    c = res.summary["contribution"]
    bad = set(res.summary["attack"]["malicious"])
    assert len(bad) == 10 and bad <= set(c["ranking"][-15:]) and bad <= set(c["flagged"])
    for cid in set(c["flagged"]) - bad:
        assert c["scores"][cid] + 2 * c["standard_error"][cid] < 0
    assert not set(c["flagged"]) & set(c["indistinguishable"])
    assert len(set(c["flagged"]) - bad) <= 10
