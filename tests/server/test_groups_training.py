"""Group fairness end to end on heart disease: group columns kept out of the model, bands,
reweighing the same under every executor, and refused over gRPC."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from consortium.config import ExperimentConfig
from consortium.errors import ConfigError
from consortium.executors.sequential import SequentialExecutor
from consortium.reporting.report import format_value
from consortium.simulation import simulate

BASE = {"rounds": 2, "evaluation": {"groups": ["sex", "age_band"], "bands": ["age: 50, 60"]}}


def test_groups_are_not_features_and_are_reported() -> None:
    result = simulate(ExperimentConfig.from_dict(BASE))
    assert result.params.layout.size == 2 * 31 + 2  # logistic on 31 features: 32 less sex
    sex = result.summary["groups"]["sex"]["overall"]
    assert set(sex["groups"]) == {"0", "1"}
    assert {"calibration", "ece", "equalized_odds"} <= set(sex["gaps"])
    assert {"mean_predicted", "observed_rate", "ece"} <= set(sex["groups"]["1"])
    bands = result.summary["groups"]["age_band"]["overall"]["groups"]
    assert set(bands) == {"<50", "50\u201360", "\u226560"}
    assert sum(g["n"] for g in bands.values()) == 231
    kept = simulate(ExperimentConfig.from_dict(
        {**BASE, "evaluation": {**BASE["evaluation"], "group_features": True}}))
    assert kept.params.layout.size == 2 * 32 + 2


@pytest.mark.parametrize("kind", ["sequential", "vectorized"])
def test_reweighing_trains_on_the_same_rows_in_every_executor(kind: str) -> None:
    cfg = {**BASE, "fairness": {"method": "reweigh", "column": "sex"}}
    ref = simulate(ExperimentConfig.from_dict({**cfg, "executor": {"kind": "sequential"}}))
    got = simulate(ExperimentConfig.from_dict({**cfg, "executor": {"kind": kind}}))
    assert torch.allclose(got.params.vector, ref.params.vector, atol=1e-5)
    plain = simulate(ExperimentConfig.from_dict(BASE))
    assert not torch.allclose(plain.params.vector, ref.params.vector, atol=1e-5)


class _Remote(SequentialExecutor):
    name = "remote"


def test_groups_are_refused_over_grpc() -> None:
    with pytest.raises(ConfigError, match=r"evaluation.groups and \[fairness\] run in simulation only"):
        simulate(ExperimentConfig.from_dict(BASE), executor=_Remote())


def test_the_report_shows_the_groups(tmp_path: Path) -> None:
    result = simulate(ExperimentConfig.from_dict(BASE), out=tmp_path / "run")
    page = (tmp_path / "run" / "report.html").read_text(encoding="utf-8")
    section = page[page.index("<h2>Groups</h2>"):]
    assert "<h3>sex</h3>" in section and "<h3>age_band</h3>" in section
    gaps = result.summary["groups"]["sex"]["overall"]["gaps"]
    assert f"<td>overall</td><td class=\"num\">{format_value(gaps['equalized_odds'])}</td>" in section
    assert "<td>\u226560</td>" in section and "<td>cleveland</td>" in section
