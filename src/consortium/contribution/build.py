"""The ``[contribution]`` builder: wraps the aggregator to record updates and adds the scoring callback."""

from __future__ import annotations

import copy
from typing import Any

from consortium.aggregation.base import Pipeline
from consortium.contribution.recording import (
    ContributionRecorder,
    ModelUtility,
    RecordingAggregator,
    Settings,
    validation_data,
)
from consortium.contribution.shapley import MAX_EXACT_PLAYERS
from consortium.errors import ConfigError

__all__ = ["build_contribution", "check_contribution"]


def check_contribution(cfg: Any, *, per_round: int, remote: bool, mode: str = "sync") -> None:
    """What refuses ``[contribution]`` once the run's parts are known.

    Raises:
        ConfigError: a deployment, an asynchronous server, or exact Shapley over a cohort of
            more than 10 sites, each with the reason and what works instead.
    """
    method = cfg.contribution.method
    if remote and cfg.contribution.validation == "server":
        raise ConfigError(
            "contribution.validation = \"server\" in a deployment: the server holds no test "
            "rows; use \"sites\" (the sites evaluate the coalition models on their own test "
            "splits after the last round)"
        )
    if mode != "sync":
        raise ConfigError(
            f"contribution.method = {method!r} values each synchronous round's cohort; with "
            f"server.mode = {mode!r} there are no rounds to value. Set server.mode = \"sync\" "
            'or contribution.method = "none"'
        )
    if method == "exact-shapley" and per_round > MAX_EXACT_PLAYERS:
        raise ConfigError(
            f"contribution.method = \"exact-shapley\" with {per_round} clients per round needs "
            f"2^{per_round} model evaluations per round; it is offered up to "
            f"{MAX_EXACT_PLAYERS}. Use \"gtg-shapley\" or \"tmc-shapley\" (sampled, with a "
            'standard error) or "leave-one-out"'
        )


def build_contribution(f: Any) -> None:
    """``[contribution]``: ``f.contribution`` is a :class:`ContributionRecorder` (or ``None``);
    the pipeline's aggregator is wrapped by :class:`RecordingAggregator` — inside a simulated
    model attack's wrapper, so the attacker's update is the one recorded — and the recorder
    is the first callback. Runs after ``build_callbacks`` and before ``build_server``."""
    c = f.cfg.contribution
    f.contribution = None
    if c.method == "none":
        return
    check_contribution(f.cfg, per_round=f.per_round, remote=f.executor.name == "remote",
                       mode=f.cfg.server.mode)
    run_dir = f.given.run_dir
    start = f.state.params if f.state is not None else f.init
    remote = f.executor.name == "remote"
    # a deployment holds no test rows: its sites evaluate the coalition models after the
    # last round (consortium.deploy.interpret.deployed_contribution)
    evaluate = (_no_local_data if remote else ModelUtility(
        f.factory, f.init, validation_data(f.dataset, c.validation), utility=c.utility))
    recorder = ContributionRecorder(
        Settings.of(c, seed=f.cfg.seed), evaluate,
        start=start.vector.detach().clone(), sites=list(f.dataset.client_ids),
        directory=run_dir / "contribution" if run_dir is not None else None, record=c.record,
        kept=[] if remote else None,
    )
    if f.state is not None:
        recorder.resume(f.state.round)
    p = f.pipeline
    agg = p.aggregator
    if hasattr(agg, "attack") and hasattr(agg, "inner"):  # a simulated attacker's wrapper
        agg = copy.copy(agg)
        agg.inner = RecordingAggregator(agg.inner, recorder.sink)
    else:
        agg = RecordingAggregator(agg, recorder.sink)
    f.pipeline = Pipeline(p.stages, aggregator=agg, optimizer=p.optimizer)
    # first: a round is scored (and logged) before its checkpoint, so a resumed run that
    # restarts after round t finds round t's scores in rounds.jsonl
    f.callbacks.callbacks.insert(0, recorder)
    f.contribution = recorder


def _no_local_data(vector: Any) -> float:
    raise AssertionError("a deployment's coalition models are evaluated at the sites")
