"""Ditto, APFL and q-FFL in the sequential and vectorised executors: the same global model,
personal models (client state) and personalised metrics."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import consortium
from consortium.algorithms.apfl import ALPHA_KEY, V_KEY
from consortium.algorithms.ditto import STATE_KEY
from consortium.executors import SequentialExecutor, VectorizedExecutor
from tests.conftest import make_toy
from tests.executors.test_personal import SIZES, assert_same, config, run


@pytest.mark.parametrize("algorithm", ["ditto", "apfl"])
def test_sequential_and_vectorised_agree(tmp_path: Path, capsys, algorithm: str) -> None:
    cfg = config(algorithm)
    if algorithm == "apfl":  # plain SGD (weight decay kept)
        cfg["algorithm"] = {**cfg["algorithm"], "momentum": 0.0}
    a = run(cfg, SequentialExecutor(), tmp_path / "a")
    b = run(cfg, VectorizedExecutor(), tmp_path / "b")
    assert "cannot batch" not in capsys.readouterr().err
    assert_same(a, b)
    result, store = a
    d = result.params.vector.numel()
    keys = {STATE_KEY} if algorithm == "ditto" else {V_KEY, ALPHA_KEY}
    state = store.to_flat()
    assert {name.split("\x1f")[-1] for name in state} == keys
    assert all(t.numel() == d for name, t in state.items() if not name.endswith(ALPHA_KEY))
    assert result.summary["personalized"]["accuracy"] == result.history[-1]["personalized_accuracy"]


def test_ditto_personal_steps(tmp_path: Path) -> None:
    cfg = config("ditto", personalization={"ditto_lambda": 0.5, "personal_steps": 2})
    assert_same(run(cfg, SequentialExecutor(), tmp_path / "a"),
                run(cfg, VectorizedExecutor(), tmp_path / "b"))


def test_qffl_sequential_and_vectorised_agree(capsys) -> None:
    cfg = config("qffl")
    cfg["algorithm"] = {**cfg["algorithm"], "q": 2.0}
    runs = [consortium.simulate(cfg, dataset=make_toy(6, sizes=SIZES), executor=ex, report=False)
            for ex in (SequentialExecutor(), VectorizedExecutor())]
    assert "cannot batch" not in capsys.readouterr().err
    assert torch.allclose(runs[0].params.vector, runs[1].params.vector, atol=1e-6, rtol=0)
    assert runs[0].history[-1]["accuracy"] == pytest.approx(runs[1].history[-1]["accuracy"])
