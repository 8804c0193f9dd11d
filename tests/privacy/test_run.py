"""Central DP in a run: epsilon per round in metrics and summary, ledger, resume, refusals."""

from __future__ import annotations

import json

import pytest
import torch

import consortium
from consortium.errors import ConfigError
from consortium.executors import SequentialExecutor, VectorizedExecutor
from consortium.privacy.accountant import RoundMechanism, epsilon
from tests.conftest import make_toy

DP = {
    "rounds": 4,
    "seed": 2,
    "sampling": {"fraction": 0.5},
    "privacy": {"mode": "central", "noise_multiplier": 0.8, "clip": 0.5, "adaptive": True,
                "count_stddev": 1.0},
    "algorithm": {"lr": 0.1},
}


def test_epsilon_is_reported_every_round_and_in_the_summary(tmp_path) -> None:
    toy = make_toy(8)
    result = consortium.simulate(DP, dataset=toy, out=tmp_path / "run", report=False)
    mech = RoundMechanism(0.8, "poisson", rate=0.5)
    for record in result.history:
        assert record["epsilon"] == pytest.approx(epsilon(mech, record["round"], 1e-5))
    privacy = result.summary["privacy"]
    assert privacy["epsilon"] == pytest.approx(epsilon(mech, 4, 1e-5))
    assert privacy["delta"] == 1e-5 and privacy["accountant"] == "rdp"
    ledger = json.loads((tmp_path / "run" / "privacy.json").read_text())
    assert [e["round"] for e in ledger["releases"]] == [1, 2, 3, 4]
    for entry, record in zip(ledger["releases"], result.history):
        assert len(entry["sites"]) == record["clients"]
        assert entry["noise_multiplier"] == 0.8 and entry["clip"] == record["dp_clip"]
    # adaptive clipping moved the clip norm
    assert len({r["dp_clip"] for r in result.history}) > 1


def test_ledger_survives_resume(tmp_path) -> None:
    class Stop:
        def on_round_end(self, record, state) -> None:
            if record["round"] == 2:
                raise KeyboardInterrupt

    toy = make_toy(8)
    whole = consortium.simulate(DP, dataset=toy, out=tmp_path / "a", report=False)
    with pytest.raises(KeyboardInterrupt):
        consortium.simulate(DP, dataset=toy, out=tmp_path / "b", report=False, callbacks=[Stop()])
    resumed = consortium.simulate(resume=tmp_path / "b", dataset=toy, report=False)
    assert torch.equal(whole.params.vector, resumed.params.vector)
    a = json.loads((tmp_path / "a" / "privacy.json").read_text())
    b = json.loads((tmp_path / "b" / "privacy.json").read_text())
    assert a == b


def test_vectorised_and_sequential_agree_under_dp() -> None:
    toy = make_toy(8)
    a = consortium.simulate(DP, dataset=toy, executor=SequentialExecutor())
    b = consortium.simulate(DP, dataset=toy, executor=VectorizedExecutor())
    assert torch.allclose(a.params.vector, b.params.vector, atol=1e-6)


def test_calibrated_run_meets_its_target() -> None:
    cfg = {**DP, "privacy": {"mode": "central", "target_epsilon": 5.0, "clip": 0.5}}
    result = consortium.simulate(cfg, dataset=make_toy(8))
    assert result.summary["privacy"]["epsilon"] <= 5.0
    assert result.summary["privacy"]["epsilon"] == pytest.approx(5.0, rel=1e-2)


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"algorithm": {"name": "scaffold"}}, "control variates"),
        ({"privacy": {"mode": "central"}}, "exactly one of"),
        ({"privacy": {"mode": "central", "noise_multiplier": 1.0, "sampling": "fixed",
                      "accountant": "pld"}}, "Poisson sampling only"),
    ],
)
def test_bad_privacy_settings(change: dict, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        consortium.simulate({**DP, **change}, dataset=make_toy(8))


def test_no_privacy_means_null_epsilon() -> None:
    result = consortium.simulate({"rounds": 1}, dataset=make_toy(4))
    assert result.history[0]["epsilon"] is None
    assert result.summary["privacy"] == {"epsilon": None, "delta": None, "accountant": None}
