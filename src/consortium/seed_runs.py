"""``simulate_seeds``: one experiment run once per seed, summarised as mean and 95 % t interval."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from consortium.config import ExperimentConfig
from consortium.errors import ConfigError
from consortium.intervals import T_METHOD, t_interval

__all__ = ["SeedsResult", "is_multi_seed_dir", "parse_seeds", "seed_rows", "simulate_seeds"]

_RANGE = re.compile(r"^\s*(-?\d+)\s*(?:-\s*(-?\d+)\s*)?$")


@dataclass
class SeedsResult:
    """What :func:`simulate_seeds` returns: the seeds, each run's summary, and ``seeds.json``'s
    content (``results``: section → metric → ``mean``, ``ci``, ``values``)."""

    seeds: list[int]
    summaries: dict[int, dict[str, Any]]
    report: dict[str, Any]
    out: Path


def parse_seeds(text: str) -> list[int]:
    """The seeds of ``--seeds``: ``"0-4"`` (inclusive), ``"0,3,7"``, or both (``"0-2,9"``).

    Raises:
        ConfigError: a part is not a non-negative integer or an increasing range, or a seed
            repeats.
    """
    seeds: list[int] = []
    for part in text.split(","):
        match = _RANGE.match(part)
        if match is None:
            raise ConfigError(
                f"--seeds {text!r}: {part.strip()!r} is not a seed or a range; expected e.g. "
                "--seeds 0-4 or --seeds 0,3,7"
            )
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) is not None else first
        if first < 0 or last < first:
            raise ConfigError(
                f"--seeds {text!r}: {part.strip()!r} must be a non-negative seed or a range "
                "FIRST-LAST with FIRST <= LAST"
            )
        seeds.extend(range(first, last + 1))
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise ConfigError(f"--seeds {text!r} names seed(s) {repeated} more than once")
    return seeds


def is_multi_seed_dir(path: str | Path) -> bool:
    """Whether ``path`` is (or was meant to be) a multi-seed directory: it holds
    ``seeds.json`` or a ``seed-N/`` run and no run of its own."""
    path = Path(path)
    if (path / "config.toml").exists():
        return False
    return (path / "seeds.json").exists() or any(path.glob("seed-*/config.toml"))


def simulate_seeds(
    config: ExperimentConfig | dict | str | Path | None = None,
    *,
    seeds: Sequence[int],
    out: str | Path,
    overrides: Sequence[str] = (),
    progress: bool = False,
    report: bool = True,
    on_run: Callable[[int, dict[str, Any]], None] | None = None,
) -> SeedsResult:
    """Run the experiment once per seed and summarise the spread of its results.

    Each seed's run is a normal run directory ``OUT/seed-<seed>/`` (the config's ``seed``
    replaced, everything else as given). ``OUT/seeds.json`` then holds, for ``final``,
    ``personalized`` (when the runs have it) and each baseline, per metric: the mean over
    seeds, its 95 % Student t interval (:func:`~consortium.intervals.t_interval`; ``null``
    bounds with a single seed) and the per-seed values. A seed reruns the whole experiment
    (data partition, initialisation, sampling, noise), so the interval covers all of them.

    Args:
        config: as :func:`~consortium.simulation.simulate` takes it.
        seeds: the seeds, at least one, distinct (:func:`parse_seeds` reads ``--seeds``).
        out: the multi-seed directory; it must not hold runs already.
        overrides: ``"section.key=value"`` strings; ``seed`` cannot be among them.
        progress, report: as :func:`~consortium.simulation.simulate`.
        on_run: called with (seed, summary) after each run.

    Raises:
        ConfigError: no seeds, repeated seeds, ``--set seed=…``, or ``out`` already holds runs.
        ConsortiumError: anything a single run raises.
    """
    from consortium.simulation import _resolve_config, simulate

    seeds = list(seeds)
    if not seeds:
        raise ConfigError("--seeds needs at least one seed, e.g. --seeds 0-4")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds must be distinct, got {seeds}")
    if any(o.split("=", 1)[0].strip() == "seed" for o in overrides):
        raise ConfigError("--set seed=… and --seeds both choose the seed; give --seeds only")
    out = Path(out)
    _check_out(out, seeds)
    cfg = _resolve_config(config, overrides)
    summaries: dict[int, dict[str, Any]] = {}
    for seed in seeds:
        result = simulate(
            replace(cfg, seed=seed), out=out / f"seed-{seed}", progress=progress, report=report,
        )
        summaries[seed] = result.summary
        if on_run is not None:
            on_run(seed, result.summary)
    content = {
        "name": cfg.name,
        "seeds": seeds,
        "runs": {str(s): f"seed-{s}" for s in seeds},
        "interval": T_METHOD,
        "confidence": 0.95,
        "results": summarise_seeds(summaries),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "seeds.json").write_text(json.dumps(content, indent=2), encoding="utf-8")
    return SeedsResult(seeds=seeds, summaries=summaries, report=content, out=out)


def _check_out(out: Path, seeds: Iterable[int]) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a file; give a directory for the seeds' runs")
    if (out / "seeds.json").exists() or (out / "metrics.jsonl").exists():
        raise ConfigError(
            f"{str(out)!r} already holds a run or a multi-seed run; choose another --out"
        )
    taken = [f"seed-{s}" for s in seeds if (out / f"seed-{s}" / "metrics.jsonl").exists()]
    if taken:
        raise ConfigError(
            f"{str(out)!r} already holds {', '.join(taken)}; choose another --out"
        )


def summarise_seeds(summaries: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    """``seeds.json``'s ``results``: for ``final``, ``personalized`` and ``baselines.<name>``,
    each metric that is a number in every run → ``mean``, ``ci`` ([low, high], or ``null``
    bounds for one seed) and ``values`` (per seed, in the seeds' order). A metric missing or
    not finite in some run is left out (its mean would not be over the same seeds)."""
    runs = list(summaries.values())
    sections: dict[str, list[Mapping[str, Any]]] = {
        "final": [_mapping(s.get("final")) for s in runs],
    }
    if all(_mapping(s.get("personalized")) for s in runs):
        sections["personalized"] = [_mapping(s.get("personalized")) for s in runs]
    baseline_names = [_mapping(s.get("baselines")) for s in runs]
    shared = set.intersection(*(set(b) for b in baseline_names)) if baseline_names else set()
    results: dict[str, Any] = {}
    for name, per_run in sections.items():
        results[name] = _metrics_over_seeds(per_run)
    if shared:
        results["baselines"] = {
            b: _metrics_over_seeds([_mapping(names[b]) for names in baseline_names])
            for b in sorted(shared)
        }
    return results


def _metrics_over_seeds(per_run: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for metric in per_run[0] if per_run else ():
        values = [r.get(metric) for r in per_run]
        floats = [float(v) for v in values if isinstance(v, (int, float)) and _finite(v)]
        if len(floats) != len(values):
            continue
        mean, low, high = t_interval(floats)
        out[metric] = {"mean": mean, "ci": [low, high], "values": floats}
    return out


def seed_rows(results: Mapping[str, Any]) -> list[tuple[str, str, Mapping[str, Any]]]:
    """``(model, metric, entry)`` rows for a table of ``results`` (:func:`summarise_seeds`):
    federated, personalised, then the baselines; within each, ``accuracy``,
    ``balanced_accuracy``, ``auc``, ``loss`` and ``accuracy_min`` (the worst site)."""
    wanted = ("accuracy", "balanced_accuracy", "auc", "loss", "accuracy_min")
    models: list[tuple[str, Mapping[str, Any]]] = [("federated", _mapping(results.get("final")))]
    if "personalized" in results:
        models.append(("personalised", _mapping(results["personalized"])))
    labels = {"local": "local only", "pooled": "pooled"}
    for name, metrics in _mapping(results.get("baselines")).items():
        models.append((labels.get(name, name), _mapping(metrics)))
    return [
        (model, metric, _mapping(metrics[metric]))
        for model, metrics in models for metric in wanted if metric in metrics
    ]


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
