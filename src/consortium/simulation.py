"""``simulate``: build a federation from an experiment config and run it in this process."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from consortium.aggregation.base import Pipeline
from consortium.algorithms import Algorithm
from consortium.client.evaluation import client_spread
from consortium.config import ExperimentConfig, load_config, read_toml
from consortium.data.base import FederatedDataset
from consortium.errors import CheckpointError, ConfigError, ConsortiumError
from consortium.executors import Executor
from consortium.executors.device import resolve_device
from consortium.federation import (
    Federation,
    Given,
    LossFn,
    assemble,
    local_training,
    secure_aggregation_parts,
    site_pipeline,
)
from consortium.server.baselines import BaselineSetup, Budget
from consortium.server.sampling import Sampler
from consortium.types import Parameters

__all__ = [
    "SimulationResult", "local_training", "secure_aggregation_parts", "simulate", "site_pipeline",
]


@dataclass
class SimulationResult:
    """What a simulation returns: per-round history, the summary, and the final model."""

    config: ExperimentConfig
    history: list[dict[str, Any]]
    summary: dict[str, Any]
    params: Parameters
    model: torch.nn.Module
    run_dir: Path | None = None
    per_client: dict[str, dict[str, float]] = field(default_factory=dict)


def _resolve_config(config: ExperimentConfig | dict | str | Path | None, overrides: Sequence[str]):
    if isinstance(config, ExperimentConfig):
        if overrides:
            from consortium.config import apply_overrides

            return ExperimentConfig.from_dict(apply_overrides(config.to_dict(), list(overrides)))
        return config
    if isinstance(config, dict):
        from consortium.config import apply_overrides

        return ExperimentConfig.from_dict(apply_overrides(config, list(overrides)))
    return load_config(config, list(overrides))


def simulate(
    config: ExperimentConfig | dict | str | Path | None = None,
    *,
    overrides: Sequence[str] = (),
    out: str | Path | None = None,
    resume: str | Path | None = None,
    progress: bool = False,
    dataset: FederatedDataset | None = None,
    model: Callable[[], torch.nn.Module] | None = None,
    algorithm: Algorithm | None = None,
    pipeline: Pipeline | None = None,
    sampler: Sampler | None = None,
    executor: Executor | None = None,
    loss_fn: LossFn | None = None,
    callbacks: Sequence[object] = (),
    report: bool = True,
    checkpoint_extras: Callable[[], Mapping[str, Any]] | None = None,
    on_checkpoint: Callable[[int, str], None] | None = None,
    run_id: str = "",
    on_assembled: Callable[[Any], None] | None = None,
) -> SimulationResult:
    """Run a federated simulation.

    Args:
        config: an :class:`ExperimentConfig`, a dict, a TOML path, or ``None`` for the embedded
            heart-disease default.
        overrides: ``"section.key=value"`` strings, as ``--set`` on the command line.
        out: run directory to write (``config.toml``, ``metrics.jsonl``, ``summary.json``,
            ``model.safetensors``, ``report.html``, ``checkpoint/``); ``None`` writes nothing.
        resume: a run directory to continue from its last checkpoint (its ``config.toml``
            is used; ``config`` must then be ``None``).
        dataset, model, algorithm, pipeline, sampler, executor, loss_fn: objects that replace
            what the config would build (``model`` is a zero-argument factory).
        callbacks: extra objects with ``on_run_start`` / ``on_round_end`` / ``on_run_end``.
        checkpoint_extras: called after every round; its JSON-able mapping is saved inside
            the checkpoint, atomically with it (read back with
            :func:`~consortium.server.checkpoint.load_checkpoint_extras`).
        on_checkpoint: called with (round, digest) once each checkpoint is written and before
            it takes effect (a deployment records the digest in its audit log).
        run_id: a deployment's run id (``consortium server``): secure aggregation binds its
            keys and signatures to it, and the sites refuse another run's.
        on_assembled: called with the assembled :class:`~consortium.federation.Federation`
            before round 1 (``consortium server``'s changing roster: deploy/roster.py).

    Raises:
        ConsortiumError: any configuration, data, model or checkpoint problem.
    """
    cfg, run_dir = _load(config, overrides, out, resume)
    console = _console(progress)
    try:
        with _phase(console, "loading data"):
            fed = assemble(cfg, Given(
                dataset=dataset, model=model, algorithm=algorithm, pipeline=pipeline,
                sampler=sampler, executor=executor, loss_fn=loss_fn, callbacks=callbacks,
                run_dir=run_dir, resume=resume is not None, progress=progress,
                checkpoint_extras=checkpoint_extras, on_checkpoint=on_checkpoint, run_id=run_id,
                on_assembled=on_assembled, console=console,
            ))
        state = fed.state if fed.state is not None else fed.server.init_state(fed.init)
        before_s = sum(float(r.get("wall_s") or 0.0) for r in fed.history)
        started = time.perf_counter()
        try:
            state = fed.server.run(state, rounds=cfg.rounds)
            # A resumed run adds the rounds before the stop (their wall time is in the log).
            rounds_s = before_s + (time.perf_counter() - started)
            baselines = _baselines(fed, console)  # through the run's executor, before it closes
        finally:
            fed.executor.close()
        with _phase(console, "final evaluation"):
            summary = _summarise(fed, state, rounds_s, baselines)
        final_model = fed.factory()
        state.params.load_into(final_model)
        if run_dir is not None:
            with _phase(console, "writing the report" if report else "writing the results"):
                _write_outputs(run_dir, summary, state.params, report=report)
        fed.callbacks.on_run_end(summary)
    finally:
        if console is not None:
            console.close()
    return SimulationResult(
        config=cfg, history=fed.history, summary=summary, params=state.params,
        model=final_model, run_dir=run_dir, per_client=state.per_client,
    )


def _load(
    config: ExperimentConfig | dict | str | Path | None, overrides: Sequence[str],
    out: str | Path | None, resume: str | Path | None,
) -> tuple[ExperimentConfig, Path | None]:
    """The run's config and directory: a resumed run's own ``config.toml``, else ``config``
    with ``overrides``; a new run never writes over another run's directory."""
    if resume is not None:
        if config is not None:
            raise ConfigError("give either a config or resume=RUN_DIR, not both")
        out = Path(resume)
        if not (out / "config.toml").exists():
            raise CheckpointError(f"{str(out)!r} is not a run directory: it has no config.toml")
        cfg = ExperimentConfig.from_dict(read_toml(out / "config.toml"))
        if overrides:
            raise ConfigError("--set cannot change a run that is resumed; start a new run instead")
    else:
        cfg = _resolve_config(config, overrides)
    run_dir = Path(out) if out is not None else None
    if run_dir is not None and resume is None:
        check_new_run_dir(run_dir)
    return cfg, run_dir


#: What a run (or ``consortium server``) writes into its folder before its first round ends;
#: a folder holding only these is a run stopped early and may be started again.
EARLY_RUN_FILES = frozenset({
    "config.toml", "privacy.json", "audit.jsonl", "tracking.json", "mlruns", "tensorboard",
    "checkpoint.tmp",
})


def check_new_run_dir(run_dir: Path) -> None:
    """Refuse an ``--out`` that a new run would damage: a file, a folder that holds a run, or a
    non-empty folder that is not a run (its ``summary.json``, ``plots/`` … would be written over).

    A folder is a run's when it holds ``metrics.jsonl`` or ``checkpoint/`` (resume it), or only
    what a run writes before its first round ends (:data:`EARLY_RUN_FILES`, with a
    ``config.toml`` that consortium wrote): a run stopped that early starts again in it.

    Raises:
        ConfigError: naming the folder and the fix (another ``--out``, or ``--resume``).
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(
            f"--out {str(run_dir)!r} is a file, not a folder; give a new or empty folder for "
            "the run directory"
        )
    if (run_dir / "metrics.jsonl").exists() or (run_dir / "checkpoint").is_dir():
        raise ConfigError(
            f"run directory {str(run_dir)!r} already holds a run; resume it with --resume "
            f"{run_dir} or choose another --out"
        )
    names = sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else []
    foreign = [n for n in names if n not in EARLY_RUN_FILES]
    if not foreign and "config.toml" in names and not _written_by_us(run_dir / "config.toml"):
        foreign = ["config.toml"]
    if foreign:
        shown = ", ".join(foreign[:4]) + (f" and {len(foreign) - 4} more" if len(foreign) > 4 else "")
        raise ConfigError(
            f"--out {str(run_dir)!r} is a folder that is not a run: it holds {shown}, which "
            "the run's files (config.toml, summary.json, plots/, report.html, …) could "
            f"overwrite; give a new or empty folder (e.g. --out {run_dir / 'run'}), or "
            "--resume RUN_DIR to continue a run"
        )


def _written_by_us(path: Path) -> bool:
    """Whether ``path`` is a resolved ``config.toml`` as a run writes it (not a user's file)."""
    try:
        text = path.read_text(encoding="utf-8")
        return ExperimentConfig.from_dict(read_toml(path)).to_toml() == text
    except (OSError, UnicodeDecodeError, ConsortiumError):
        return False


def _console(progress: bool) -> Any:
    """The run's console (phases on standard error), or ``None`` without progress."""
    if not progress:
        return None
    from consortium.reporting.callbacks import Console

    return Console()


def _phase(console: Any, label: str) -> Any:
    from contextlib import nullcontext

    return nullcontext() if console is None else console.phase(label)


def _baselines(fed: Federation, console: Any) -> Any:
    """``evaluation.baselines`` through the run's executor (server/baselines.py); a
    deployment's local-only baseline comes from the sites (their reports, kept by the
    executor), its pooled one cannot exist."""
    from consortium.server.baselines import run_baselines

    cfg = fed.cfg
    names = [n for n in cfg.evaluation.baselines]
    if fed.executor.name == "remote":  # each site trained its own at home and reported it
        from consortium.server.baselines import BaselineOutcome, site_reports

        if "local" not in names:
            return BaselineOutcome()
        outcome = site_reports(getattr(fed.executor, "local_reports", {}), settings=fed.settings,
                               rounds=cfg.rounds, sites=len(fed.dataset.clients),
                               budget_mode=cfg.evaluation.baseline_budget)
        for note in outcome.notes:
            print(f"consortium server: {note}", file=sys.stderr, flush=True)
        return outcome
    setup = BaselineSetup(fed.factory, fed.init, fed.settings, fed.loss_fn, cfg.rounds, cfg.seed,
                          device=resolve_device(cfg.executor.device, announce=False),
                          budget=Budget(cfg.evaluation.baseline_budget, len(fed.dataset.clients),
                                        cfg.simulation.stragglers,
                                        updates={"fedbuff": cfg.server.buffer_size,
                                                 "fedasync": 1}.get(cfg.server.mode, 0)))
    outcome = run_baselines(
        names, fed.dataset, setup, fed.executor, per_round_clients=fed.per_round,
        max_clients=cfg.evaluation.baseline_clients, max_examples=cfg.evaluation.pooled_examples,
        console=console,  # its phases, and a note when a baseline is sampled
    )
    return outcome


def _summarise(fed: Federation, state: Any, duration_s: float, outcome: Any) -> dict[str, Any]:
    """``summary.json``: final metrics, privacy spent, the baselines, and what ran.

    With a personalised evaluation (a personalised algorithm, or fine-tuning), ``personalized``
    holds its metrics under the names ``final`` uses. Each ``per_client`` entry has the global
    model's metrics (as they always were, and again as ``global_<name>``), and
    ``personalized_<name>`` and ``local_<name>`` (the local-only baseline) where those ran;
    ``client_accuracy`` states the spread of per-client accuracy (mean, worst, p10, std,
    Jain's index) for each of them. With ``data.validation`` every number is on the validation
    split and ``evaluated_on`` says ``"validation"`` (absent: the test split). Each baseline
    (``outcome``, from :func:`_baselines`) states its ``budget`` (epochs and/or steps,
    ``wall_s``) and, when trained on a sample, ``sampled`` (server/baselines.py).
    """
    cfg = fed.cfg
    baselines: dict[str, dict[str, Any]] = dict(outcome.results)
    local_per_client: dict[str, dict[str, float]] = outcome.local_per_client
    confusions: dict[str, Any] = dict(outcome.confusions)
    mine = "personalized_"
    # the spread across clients is under its own key (client_accuracy), not among the metrics
    spread_keys = {f"{p}accuracy_{s}" for p in ("", mine) for s in ("mean", "std", "jain")}
    last = {k: v for k, v in state.last_metrics.items() if k not in spread_keys}
    per_client = _per_client(state.per_client, local_per_client)
    summary: dict[str, Any] = {
        "name": cfg.name,
        "rounds": state.round,
        "final": {k: v for k, v in last.items() if not k.startswith(mine)},
        "privacy": fed.ledger.summary() if fed.ledger is not None else {
            "epsilon": None, "delta": None, "accountant": None,
        },
        "baselines": baselines,
        "per_client": per_client,
        "duration_s": duration_s,
        "algorithm": fed.algorithm.name,
        "pipeline": fed.pipeline.describe(),
        "clients": len(fed.dataset.clients),
    }
    if summary["privacy"].get("epsilon") is not None:  # how strong ε is, plainly (issue 20)
        from consortium.privacy.reading import epsilon_reading

        summary["privacy"]["reading"] = epsilon_reading(summary["privacy"]["epsilon"])
    personalized = {k[len(mine):]: v for k, v in last.items() if k.startswith(mine)}
    if personalized:
        summary["personalized"] = personalized
    describe = getattr(fed.algorithm, "summary", None)
    if describe is not None:  # what the algorithm reports of itself (IFCA: its clusters)
        summary[fed.algorithm.name] = describe(
            state.algorithm, {cid: fed.store.peek(cid) for cid in fed.dataset.client_ids}
        )
    spreads = {
        kind: client_spread([m[f"{kind}_accuracy"] for m in per_client.values()
                             if f"{kind}_accuracy" in m])
        for kind in ("global", "personalized", "local")
    }
    summary["client_accuracy"] = {kind: spread for kind, spread in spreads.items() if spread}
    clock = getattr(fed.server, "clock", None)
    if clock is not None:  # the simulated clock (server.clock)
        summary["sim_time_s"] = state.sim_time_s
        if not clock.trivial:
            summary["clock"] = clock.describe()
    if cfg.evaluation.target_accuracy:
        from consortium.server.clock import time_to_target

        summary.update(time_to_target(fed.history, cfg.evaluation.target_accuracy))
    if fed.dataset.notes.get("evaluated_on") == "validation":  # tuning, not test results
        summary["evaluated_on"] = "validation"
    if fed.threat is not None:
        summary["attack"] = fed.threat.describe()
    contribution = getattr(fed, "contribution", None)
    if contribution is not None:  # [contribution]: scores, flags and the benefit table
        summary["contribution"] = contribution.summary(per_client)
    confusions.update(getattr(fed.server.evaluator, "final_confusion", {}))
    ci = _bootstrap_intervals(cfg.seed, summary, confusions)
    if ci:
        summary["ci"] = ci
    from consortium.reporting.clinical import add_clinical, class_names

    # prevalence, majority reference, sensitivity ... per site (``clinical``, ``per_client``)
    add_clinical(summary, confusions, seed=cfg.seed,
                 scores=getattr(fed.server.evaluator, "final_scores", None),
                 classes=class_names(fed.dataset.notes, fed.dataset.num_classes))
    if cfg.evaluation.groups and fed.executor.name != "remote":  # a deployment holds no test data
        from consortium.server.groups import group_metrics

        model = fed.factory().to(resolve_device(cfg.executor.device, announce=False))
        state.params.load_into(model)
        summary["groups"] = group_metrics(model, fed.dataset, cfg.evaluation.groups)
        if "thresholds" in cfg.fairness.method:  # equalised-odds post-processing (Hardt 2016)
            from consortium.server.thresholds import equalized_odds_postprocess

            summary["groups"][cfg.fairness.column]["postprocessed"] = equalized_odds_postprocess(
                model, fed.dataset, cfg.fairness.column, tolerance=cfg.fairness.tolerance,
                anchor=cfg.fairness.anchor == "largest")
    from consortium.interpret import enabled, interpret_model

    if enabled(cfg.interpret) and fed.executor.name != "remote":  # [interpret], after the run
        model = fed.factory().to(resolve_device(cfg.executor.device, announce=False))
        state.params.load_into(model)
        summary["interpret"] = interpret_model(cfg.interpret, model, fed.dataset, seed=cfg.seed)
    return summary


def _bootstrap_intervals(
    seed: int, summary: Mapping[str, Any], confusions: Mapping[str, Mapping[str, Any]]
) -> dict[str, Any]:
    """``summary.json``'s ``ci``: 95 % percentile bootstrap intervals of accuracy and balanced
    accuracy over the test examples, resampled within each site (B = 1,000, seeded from the
    run seed; :func:`~consortium.intervals.bootstrap_ci`), for ``final``, ``personalized``
    and each baseline whose per-site predictions this process saw. An interval is left out
    when the predictions do not reproduce the reported numbers (it would not be theirs)."""
    from consortium.intervals import BOOTSTRAP_METHOD, bootstrap_ci, confusion_metrics
    from consortium.seeds import derive_seed

    out: dict[str, Any] = {}
    for kind, per_site in confusions.items():
        section, _, name = kind.partition("/")
        reported = summary.get(section) or {}
        reported = reported.get(name) or {} if name else reported
        point = confusion_metrics(per_site)
        if not point or any(
            not isinstance(reported.get(m), float) or abs(reported[m] - v) > 1e-9
            for m, v in point.items()
        ):
            continue
        interval = bootstrap_ci(per_site, seed=derive_seed(seed, "bootstrap", kind))
        if name:
            out.setdefault(section, {})[name] = interval
        else:
            out[section] = interval
    if out:
        out.update({"method": BOOTSTRAP_METHOD, "confidence": 0.95})
    return out


def _per_client(
    evaluated: Mapping[str, Mapping[str, float]], local: Mapping[str, Mapping[str, float]]
) -> dict[str, dict[str, float]]:
    """Each client's entry: the evaluation's metrics, the global ones again as ``global_*``,
    and the local-only baseline's as ``local_*``."""
    out: dict[str, dict[str, float]] = {}
    for cid in dict.fromkeys([*evaluated, *local]):
        entry = dict(evaluated.get(cid, {}))
        entry.update({
            f"global_{k}": v for k, v in evaluated.get(cid, {}).items()
            if not k.startswith("personalized_")
        })
        entry.update({f"local_{k}": v for k, v in local.get(cid, {}).items()})
        out[cid] = entry
    return out


def _write_outputs(run_dir: Path, summary: dict[str, Any], params: Parameters, *, report: bool) -> None:
    from safetensors.torch import save_file

    (run_dir / "summary.json").write_text(
        json.dumps(_finite(summary), indent=2), encoding="utf-8"
    )
    save_file({k: v.contiguous() for k, v in params.tensors().items()}, str(run_dir / "model.safetensors"))
    if report:
        from consortium.reporting.report import write_report

        write_report(run_dir)


def _finite(obj: Any) -> Any:
    import math

    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj
