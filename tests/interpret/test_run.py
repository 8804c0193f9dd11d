"""``[interpret]`` in a run: summary.json's ``interpret`` and the report's sections."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from consortium.simulation import simulate

pytest.importorskip("shap")
pytest.importorskip("matplotlib")

BASE = ["rounds=3", "evaluation.baselines=[]"]
ON = ["interpret.importance=permutation", "interpret.shap=true", "interpret.coefficients=true",
      "interpret.calibration=true", "interpret.sample=10", "interpret.background=5",
      "interpret.repeats=2"]


def test_interpret_in_summary_and_report(tmp_path: Path) -> None:
    off = simulate(None, overrides=BASE, report=False)
    on = simulate(None, overrides=BASE + ON, out=tmp_path / "run")
    assert "interpret" not in off.summary
    for k, v in off.params.tensors().items():  # explaining the model does not change it
        assert torch.equal(v, on.params.tensors()[k])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    it = summary["interpret"]
    assert it["features"]["cp"] == ["cp=1", "cp=2", "cp=3", "cp=4"]
    assert set(it["permutation"]["sites"]) == {"cleveland", "hungarian", "switzerland", "va"}
    assert set(it["permutation"]["ranking"]) == set(it["features"]) == set(it["shap"]["ranking"])
    assert it["permutation"]["n"] == 231  # the four test splits: 76 + 74 + 31 + 50
    assert it["coefficients"]["kind"] == "log-odds of class 1"
    assert 0 <= it["calibration"]["overall"]["ece"] <= 1
    assert set(it["calibration"]["sites"]) == set(it["permutation"]["sites"])
    page = (tmp_path / "run" / "report.html").read_text()
    assert "<h2>Feature importance</h2>" in page and "<h2>Calibration</h2>" in page
    for name in ("importance_permutation.png", "importance_shap.png", "reliability.png"):
        assert (tmp_path / "run" / "plots" / name).is_file()
        assert f"plots/{name}" in page


def test_interpretation_repeats_exactly() -> None:
    a = simulate(None, overrides=BASE + ON[:1] + ON[4:], report=False)
    b = simulate(None, overrides=BASE + ON[:1] + ON[4:], report=False)
    assert a.summary["interpret"] == b.summary["interpret"]


def test_bad_interpret_settings_are_refused() -> None:
    from consortium.errors import ConfigError

    with pytest.raises(ConfigError, match="interpret.repeats"):
        simulate(None, overrides=BASE + ["interpret.repeats=0"], report=False)
    with pytest.raises(ConfigError, match="interpret.importance"):
        simulate(None, overrides=BASE + ["interpret.importance=shapley"], report=False)


def test_a_deployment_runs_interpret_and_contribution_with_the_sites() -> None:
    """``consortium server`` no longer refuses them (tests/deploy/test_interpret_grpc.py runs
    them); only what a deployment cannot do is refused: a server-side validation set."""
    from consortium.config import load_config
    from consortium.contribution.build import check_contribution
    from consortium.errors import ConfigError

    sites = load_config(None, ["contribution.method=leave-one-out"])
    check_contribution(sites, per_round=4, remote=True)
    server = load_config(None, ["contribution.method=leave-one-out",
                                "contribution.validation=server"])
    with pytest.raises(ConfigError, match="the server holds no test rows"):
        check_contribution(server, per_round=4, remote=True)
