"""Acceptance (slow): on Synthetic(1,1) with 90% stragglers, FedProx trains more stably than FedAvg."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fedprox_stragglers.py"


@pytest.mark.slow
def test_fedprox_is_more_stable_than_fedavg_with_stragglers() -> None:
    spec = importlib.util.spec_from_file_location("fedprox_stragglers", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fedavg = [r["loss"] for r in module.experiment("fedavg", 0.0, 0.9, rounds=20, seed=0)]
    fedprox = [r["loss"] for r in module.experiment("fedprox", 1.0, 0.9, rounds=20, seed=0)]
    assert module.instability(fedprox) < 0.7 * module.instability(fedavg)
    assert fedprox[-1] < fedavg[-1]
