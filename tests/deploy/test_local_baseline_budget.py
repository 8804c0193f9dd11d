"""A deployed site's matched local-only budget: the steps it trained in the federation, counted
at the site (a repeated round replaces its count), kept in its state file across restarts."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from consortium.client.state import ClientStateStore
from consortium.errors import ConfigError
from consortium.messages import EvaluationResult, Result
from consortium.types import Update


class _Client:
    """What ``_Site`` asks of its client: ``fit`` returns an update of ``steps`` steps."""

    def __init__(self, steps: list[int]) -> None:
        self.steps, self.state, self.environment = list(steps), ClientStateStore(), None
        self.client_id, self.model_factory, self.data = "north", None, None
        self.settings, self.loss_fn, self.num_classes = None, None, 2

    def fit(self, task: Any) -> Result:
        update = Update(client_id="north", delta=torch.zeros(3), weight=10.0,
                        metrics={"steps": float(self.steps.pop(0))})
        return Result(task.round, "north", update)


def _site(steps: list[int], budget: str, tmp_path: Path | None = None) -> Any:
    from consortium.deploy.client import _Site

    site = _Site(client=_Client(steps), info=((3,), 2, 10, 5), rounds=4, local_baseline=True,
                 baseline_budget=budget)
    site.state_file = tmp_path / "state.safetensors" if tmp_path is not None else None
    return site


def _trained(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    import consortium.server.baselines as baselines

    seen: list[Any] = []

    def train_alone(*args: Any, steps: Any = None, **kwargs: Any) -> dict[str, float]:
        seen.append(steps)
        return {"accuracy": 0.5}

    monkeypatch.setattr(baselines, "train_alone", train_alone)
    return seen


def _last_evaluation(site: Any) -> EvaluationResult:
    return site._with_local_baseline(SimpleNamespace(round=4),
                                     EvaluationResult(4, "north", 5, {"accuracy": 0.6}))


def test_matched_trains_the_steps_the_site_trained(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rounds 1 and 3 (7 and 5 steps), round 3 again after a server restart (6 steps: it
    replaces 5): the local-only model trains 7 + 6 = 13 steps."""
    seen = _trained(monkeypatch)
    site = _site([7, 5, 6], "matched")
    site.check_base_unchanged = lambda: None
    for rnd in (1, 3, 3):
        site.fit(SimpleNamespace(round=rnd))
    assert _last_evaluation(site).metrics == {"accuracy": 0.6, "local_accuracy": 0.5}
    assert seen == [13]


def test_full_trains_the_full_budget_and_matched_without_training_reports_none(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen = _trained(monkeypatch)
    assert "local_accuracy" in _last_evaluation(_site([], "full")).metrics
    assert seen == [None]  # train_alone's full budget
    assert _last_evaluation(_site([], "matched")).metrics == {"accuracy": 0.6}  # nothing to match
    assert seen == [None]


def test_the_count_survives_a_site_restart_and_a_tampered_one_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    seen = _trained(monkeypatch)
    site = _site([4, 4], "matched", tmp_path)
    site.check_base_unchanged = lambda: None
    for rnd in (1, 2):
        site.fit(SimpleNamespace(round=rnd))
    site.save_state()
    again = _site([], "matched")
    again.attach(None, site.state_file)
    assert again.steps_trained == {"1": 4, "2": 4}
    _last_evaluation(again)
    assert seen == [8]

    from safetensors.torch import load_file, save_file

    flat = load_file(str(site.state_file))
    save_file(flat, str(site.state_file),
              metadata={"steps_trained": '{"1": -4}'})
    with pytest.raises(ConfigError, match="steps record"):
        _site([], "matched").attach(None, site.state_file)


def test_matched_never_trains_more_than_the_full_budget() -> None:
    """A server that sent a site more tasks than the run has rounds (or a tampered count)
    cannot make its local-only model train beyond rounds × its planned steps."""
    import torch.nn.functional as F

    from consortium.client.training import LocalTraining
    from consortium.data.base import ClientData, Split
    from consortium.server import baselines

    seen: list[int] = []
    real = baselines.train_locally

    def counting(*args: Any, steps: int, **kwargs: Any) -> Any:
        seen.append(steps)
        return real(*args, steps=steps, **kwargs)

    data = ClientData(train=Split(torch.randn(20, 3), torch.randint(0, 2, (20,))),
                      test=Split(torch.randn(4, 3), torch.randint(0, 2, (4,))))
    settings = LocalTraining(epochs=1, batch_size=8)  # 3 steps a round

    def factory() -> torch.nn.Module:
        return torch.nn.Linear(3, 2)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(baselines, "train_locally", counting)
        for asked in (5, 10_000, None):
            baselines.train_alone(factory, 0, data, settings, rounds=4, loss_fn=F.cross_entropy,
                                  num_classes=2, steps=asked)
    assert seen == [5, 12, 12]
