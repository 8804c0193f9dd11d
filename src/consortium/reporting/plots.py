"""The PNG plots of a run's report: learning curves, training loss and privacy spent per round."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from consortium.errors import MissingExtraError

__all__ = ["CURVE_METRICS", "ROC_SITES", "write_plots", "write_roc_plot"]

#: Evaluation metrics that get a learning curve, in the order the report shows them.
CURVE_METRICS = ("accuracy", "balanced_accuracy", "auc", "loss")

# For these, lower is better: the lower tail of the client distribution holds the best
# clients, so a p10/min band would show the wrong side and is not drawn.
_LOWER_IS_BETTER = frozenset({"loss"})

_BASELINES = (("local", "local only", "tab:gray"), ("pooled", "pooled", "tab:green"))

History = Sequence[Mapping[str, Any]]


def write_plots(run_dir: Path, history: History, summary: Mapping[str, Any]) -> list[Path]:
    """Draw the run's curves into ``run_dir/plots/`` and return the PNG files written.

    One figure per evaluation metric present in ``history`` (``accuracy``,
    ``balanced_accuracy``, ``auc``, ``loss``), each with the central evaluation when recorded,
    a band from the 10th-percentile (or worst) client up to the mean when recorded, and the
    final values of the ``local`` and ``pooled`` baselines of ``summary`` as dashed lines;
    ``accuracy_time.png`` (accuracy against simulated time, with ``target_accuracy`` and the
    time it was reached) when ``summary`` holds a non-trivial ``clock``
    (:mod:`consortium.server.clock`); then ``train_loss.png``, and ``epsilon.png`` when any
    round recorded a privacy budget.
    Rounds that lack a metric, or hold null or a non-finite value, are left out of its curve.

    Args:
        run_dir: the run directory; ``plots/`` is created inside it when needed.
        history: the rows of ``metrics.jsonl``, one mapping per round.
        summary: the contents of ``summary.json`` (``baselines``, ``privacy``, ``clock``,
            ``target_accuracy`` and ``time_to_target_s`` are read).

    Returns:
        The paths written, in the order the report shows them; empty when there is nothing
        to plot (matplotlib is then not imported).

    Raises:
        MissingExtraError: matplotlib is not installed.
    """
    jobs: list[tuple[str, Callable[[Any], None]]] = []
    for metric in CURVE_METRICS:
        if _series(history, metric)[0] or _series(history, f"central_{metric}")[0]:
            jobs.append((metric, _curve_drawer(history, summary, metric=metric)))
    if summary.get("clock") and _timed(history, "accuracy")[0]:  # a non-trivial clock
        jobs.append(("accuracy_time", _time_drawer(history, summary, metric="accuracy")))
    if _series(history, "train_loss")[0]:
        jobs.append(("train_loss", _train_loss_drawer(history)))
    if _series(history, "epsilon")[0]:
        jobs.append(("epsilon", _epsilon_drawer(history, summary)))
    if not jobs:
        return []

    pyplot = _pyplot()
    out_dir = Path(run_dir) / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    return [_render(pyplot, out_dir / f"{name}.png", draw) for name, draw in jobs]


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as error:
        raise MissingExtraError("plots in the report", "plots", "matplotlib") from error
    # Selecting a backend after pyplot is loaded closes every open figure, which would wipe
    # out a notebook user's plots; in that case the caller's backend is kept.
    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    from matplotlib import pyplot

    return pyplot


def _render(pyplot: Any, path: Path, draw: Callable[[Any], None]) -> Path:
    from matplotlib.ticker import MaxNLocator

    figure, axes = pyplot.subplots(figsize=(6.4, 4.0))
    try:
        draw(axes)
        if not axes.get_xlabel():  # a drawer against simulated time names its own axis
            axes.set_xlabel("round")
            axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        if axes.get_legend_handles_labels()[1]:
            axes.legend(loc="best", fontsize="small")
        figure.tight_layout()
        figure.savefig(path, dpi=100)
    finally:
        pyplot.close(figure)
    return path


def _curve_drawer(
    history: History, summary: Mapping[str, Any], *, metric: str
) -> Callable[[Any], None]:
    def draw(axes: Any) -> None:
        rounds, values = _series(history, metric)
        if rounds:
            (line,) = axes.plot(rounds, values, **_line_style(rounds), label="federated")
            if metric not in _LOWER_IS_BETTER:
                _draw_client_band(axes, history, metric=metric, color=line.get_color())
        central_rounds, central_values = _series(history, f"central_{metric}")
        if central_rounds:
            axes.plot(
                central_rounds,
                central_values,
                **_line_style(central_rounds),
                linestyle=":",
                label="central evaluation",
            )
        for key, label, color in _BASELINES:
            value = _baseline_value(summary, key, metric=metric)
            if value is not None:
                axes.axhline(value, linestyle="--", linewidth=1.2, color=color, label=label)
        axes.set_ylabel(metric.replace("_", " "))
        axes.set_title(f"{metric.replace('_', ' ')} per round")

    return draw


def _draw_client_band(axes: Any, history: History, *, metric: str, color: str) -> None:
    band = _client_band(history, metric=metric)
    if band is None:
        return
    label, lower = band
    mean = _by_round(history, metric)
    rounds = sorted(set(lower) & set(mean))
    if rounds:
        axes.fill_between(
            rounds,
            [lower[r] for r in rounds],
            [mean[r] for r in rounds],
            color=color,
            alpha=0.2,
            linewidth=0,
            label=label,
        )


def _client_band(history: History, *, metric: str) -> tuple[str, dict[float, float]] | None:
    # The 10th percentile is steadier than the single worst client, so it is preferred.
    for suffix, label in (
        ("p10", "10th-percentile client to mean"),
        ("min", "worst client to mean"),
    ):
        lower = _by_round(history, f"{metric}_{suffix}")
        if lower:
            return label, lower
    return None


def _timed(history: History, key: str) -> tuple[list[float], list[float]]:
    """``key`` against ``sim_time_s`` (rows lacking either are left out)."""
    times: list[float] = []
    values: list[float] = []
    for row in history:
        t, value = _finite(row.get("sim_time_s")), _finite(row.get(key))
        if t is not None and value is not None:
            times.append(t)
            values.append(value)
    return times, values


def _time_drawer(
    history: History, summary: Mapping[str, Any], *, metric: str
) -> Callable[[Any], None]:
    def draw(axes: Any) -> None:
        times, values = _timed(history, metric)
        hours = max(times) > 3 * 3600
        scale, unit = (3600.0, "h") if hours else (1.0, "s")
        xs = [t / scale for t in times]
        axes.plot(xs, values, **_line_style(xs), label="federated")
        target = _finite(summary.get("target_accuracy"))
        if target is not None and metric == "accuracy":
            axes.axhline(target, linestyle="--", linewidth=1.0, color="tab:gray", label="target")
            reached = _finite(summary.get("time_to_target_s"))
            if reached is not None:
                axes.axvline(reached / scale, linestyle=":", linewidth=1.0, color="tab:gray")
        axes.set_xlabel(f"simulated time ({unit})")
        axes.set_ylabel(metric.replace("_", " "))
        axes.set_title(f"{metric.replace('_', ' ')} against simulated time")

    return draw


def _train_loss_drawer(history: History) -> Callable[[Any], None]:
    def draw(axes: Any) -> None:
        rounds, values = _series(history, "train_loss")
        axes.plot(rounds, values, **_line_style(rounds), color="tab:orange")
        axes.set_ylabel("training loss")
        axes.set_title("training loss per round")

    return draw


def _epsilon_drawer(history: History, summary: Mapping[str, Any]) -> Callable[[Any], None]:
    def draw(axes: Any) -> None:
        rounds, values = _series(history, "epsilon")
        axes.plot(rounds, values, **_line_style(rounds), color="tab:red")
        axes.set_ylabel("ε spent")
        privacy = summary.get("privacy")
        delta = _finite(privacy.get("delta")) if isinstance(privacy, Mapping) else None
        axes.set_title("privacy spent (ε)" + (f" at δ = {delta:.3g}" if delta is not None else ""))

    return draw


def _line_style(rounds: Sequence[float]) -> dict[str, Any]:
    # Markers make a handful of rounds readable and turn a long run into a smear.
    return {"marker": "o", "markersize": 3} if len(rounds) <= 50 else {}


def _series(history: History, key: str) -> tuple[list[float], list[float]]:
    rounds: list[float] = []
    values: list[float] = []
    for index, row in enumerate(history):
        value = _finite(row.get(key))
        if value is not None:
            round_number = _finite(row.get("round"))
            rounds.append(round_number if round_number is not None else float(index + 1))
            values.append(value)
    return rounds, values


def _by_round(history: History, key: str) -> dict[float, float]:
    return dict(zip(*_series(history, key), strict=True))


def _baseline_value(summary: Mapping[str, Any], key: str, *, metric: str) -> float | None:
    baselines = summary.get("baselines")
    if not isinstance(baselines, Mapping):
        return None
    results = baselines.get(key)
    return _finite(results.get(metric)) if isinstance(results, Mapping) else None


def _finite(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


#: At most this many sites get their own ROC curve (more would be unreadable).
ROC_SITES = 8


def write_roc_plot(run_dir: Path, summary: Mapping[str, Any]) -> Path | None:
    """Draw ``plots/roc.png``: the federated model's ROC curve over all test cases together
    and at each site (up to :data:`ROC_SITES`), each with the model's own operating point
    (class 1 when its log-odds > 0) and its AUC in the legend, from ``summary["clinical"]``
    (:mod:`consortium.reporting.clinical`). ``None`` (nothing written, matplotlib not
    imported) when the summary has no ROC curve.

    Raises:
        MissingExtraError: matplotlib is not installed.
    """
    clinical = summary.get("clinical")
    final = clinical.get("final") if isinstance(clinical, Mapping) else None
    if not isinstance(final, Mapping):
        return None
    curves: list[tuple[str, Mapping[str, Any], float | None]] = []
    overall = final.get("overall")
    if isinstance(overall, Mapping) and isinstance(overall.get("roc"), Mapping):
        curves.append(("all sites", overall["roc"], _finite(overall.get("auc"))))
    sites = final.get("sites")
    if isinstance(sites, Mapping) and len(sites) <= ROC_SITES:
        curves += [(str(site), e["roc"], _finite(e.get("auc"))) for site, e in sites.items()
                   if isinstance(e, Mapping) and isinstance(e.get("roc"), Mapping)]
    if not curves:
        return None

    def draw(axes: Any) -> None:
        axes.plot([0, 1], [0, 1], linestyle=":", color="tab:gray", linewidth=1, label="chance")
        for index, (name, roc, auc) in enumerate(curves):
            fpr, tpr = roc.get("fpr") or [], roc.get("tpr") or []
            label = name + (f" (AUC {auc:.2f})" if auc is not None else "")
            (line,) = axes.plot(fpr, tpr, label=label,
                                linewidth=2.2 if index == 0 else 1.2,
                                color="black" if index == 0 else None)
            point = roc.get("operating_point")
            if isinstance(point, Sequence) and len(point) == 2:
                axes.plot([point[0]], [point[1]], marker="o", color=line.get_color())
        axes.set_xlabel("1 − specificity (false-positive rate)")
        axes.set_ylabel("sensitivity (true-positive rate)")
        axes.set_xlim(-0.01, 1.01)
        axes.set_ylim(-0.01, 1.01)
        axes.set_title("ROC of the federated model (dot: its decisions)")

    pyplot = _pyplot()
    out_dir = Path(run_dir) / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    return _render(pyplot, out_dir / "roc.png", draw)
