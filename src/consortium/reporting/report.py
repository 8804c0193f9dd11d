"""The HTML report of a run: results beside baselines, curves, per-client and per-round tables."""

from __future__ import annotations

import base64
import html
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from consortium.reporting.clinical_report import (
    brief_section,
    clinical_section,
    pooled_note,
    privacy_section,
)
from consortium.reporting.contribution import contribution_section
from consortium.reporting.interpret import interpret_figures, interpret_sections
from consortium.reporting.plots import write_plots, write_roc_plot

__all__ = ["format_interval", "format_value", "result_intervals", "results_table_rows", "write_report"]

# The metrics a reader looks for first; any others follow alphabetically.
_LEADING_METRICS = ("accuracy", "balanced_accuracy", "auc", "loss")

ResultsRow = tuple[str, float | None, float | None, float | None]

_CSS = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; color: #222;
       max-width: 1000px; margin: 2em auto; padding: 0 1em; }
h1 { margin-bottom: 0.2em; }
.meta, .note { color: #666; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border-bottom: 1px solid #ddd; padding: 0.25em 0.8em; text-align: left; }
thead th { border-bottom: 2px solid #999; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.figures { display: flex; flex-wrap: wrap; gap: 1em; }
figure { margin: 0; }
figure img { max-width: 100%; width: 480px; border: 1px solid #eee; }
details { margin: 1em 0; }
summary { cursor: pointer; font-weight: 600; }
.scroll { overflow-x: auto; }
pre { background: #f6f8fa; padding: 1em; overflow-x: auto; }
table.confusion { margin: 0 0 1em; }
table.confusion caption { font-weight: 600; text-align: left; }
table.confusion th { font-weight: normal; color: #555; }
"""


def write_report(run_dir: str | Path, *, plots: bool = True) -> Path:
    """Write ``report.html`` (and its ``plots/``) for a run directory and return its path.

    Reads ``config.toml``, ``metrics.jsonl`` and ``summary.json`` (see DESIGN.md §4). A
    missing or empty ``metrics.jsonl`` or a missing ``summary.json`` gives a report that says
    so; lines of ``metrics.jsonl`` that are not JSON objects (a run killed mid-write leaves a
    truncated last line) are skipped and counted. Every value read from the files is escaped.
    The page is one self-contained file: its figures are drawn into ``plots/`` and inlined
    as base64 PNG (each ``<img>`` keeps its file's name in ``data-source``), and it links to
    nothing, so it opens offline and can be sent on its own.

    Args:
        run_dir: the run directory written by ``consortium run``.
        plots: draw the curves with matplotlib; ``False`` writes the tables only.

    Raises:
        FileNotFoundError: ``run_dir`` is not a directory.
        ValueError: ``summary.json`` exists but is not a JSON object.
        MissingExtraError: ``plots`` is true and matplotlib is not installed.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(
            f"run directory {str(run_dir)!r} does not exist; pass the directory that "
            "`consortium run` wrote (its --out, by default runs/<name>-<timestamp>)"
        )
    history, skipped = _read_history(run_dir / "metrics.jsonl")
    summary = _read_summary(run_dir / "summary.json")
    config = _read_text(run_dir / "config.toml")
    images = write_plots(run_dir, history, summary) if plots else []
    roc = write_roc_plot(run_dir, summary) if plots else None
    figures = interpret_figures(run_dir, summary) if plots else {}
    page = _render_page(
        run_dir, history=history, skipped=skipped, summary=summary, config=config, images=images,
        figures=figures, roc=roc,
    )
    path = run_dir / "report.html"
    path.write_text(page, encoding="utf-8")
    return path


def results_table_rows(summary: Mapping[str, Any]) -> list[ResultsRow]:
    """Rows ``(metric, federated, local only, pooled)`` of a run's results table.

    Metrics come from ``summary["final"]`` and both baselines; they are ordered
    ``accuracy``, ``balanced_accuracy``, ``auc``, ``loss``, then the others alphabetically.
    A value that is missing, null or not a number is ``None``; a ``summary`` without
    ``baselines`` gives ``None`` in both baseline columns.
    """
    final = _mapping(summary.get("final"))
    baselines = _mapping(summary.get("baselines"))
    local = _mapping(baselines.get("local"))
    pooled = _mapping(baselines.get("pooled"))
    names = sorted({*final, *local, *pooled}, key=_metric_order)
    return [
        (name, _number(final.get(name)), _number(local.get(name)), _number(pooled.get(name)))
        for name in names
    ]


def format_value(value: object) -> str:
    """Format one metric or counter for a table, as plain (unescaped) text.

    ``None`` is an em dash; integers get thousands separators; floats four decimals, or three
    significant digits when very small or very large (``1e-05``, ``2.5e+06``).
    """
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value == 0 or 1e-3 <= abs(value) < 1e6:
            return f"{value:.4f}"
        return f"{value:.3g}"
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def result_intervals(summary: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """The bootstrap intervals of ``summary["ci"]`` by results column: ``federated``,
    ``personalised``, ``local only``, ``pooled`` → metric → ``[low, high]``; ``{}`` for a
    run without them."""
    ci = _mapping(summary.get("ci"))
    baselines = _mapping(ci.get("baselines"))
    columns = {
        "federated": _mapping(ci.get("final")),
        "personalised": _mapping(ci.get("personalized")),
        "local only": _mapping(baselines.get("local")),
        "pooled": _mapping(baselines.get("pooled")),
    }
    return {column: values for column, values in columns.items() if values}


def format_interval(interval: object, *, digits: int = 2) -> str:
    """``" [0.80, 0.89]"`` for a ``[low, high]`` pair of numbers, ``""`` for anything else."""
    if not isinstance(interval, (list, tuple)) or len(interval) != 2:
        return ""
    low, high = (_number(v) for v in interval)
    if low is None or high is None:
        return ""
    return f" [{low:.{digits}f}, {high:.{digits}f}]"


def _metric_order(name: str) -> tuple[int, str]:
    if name in _LEADING_METRICS:
        return (_LEADING_METRICS.index(name), "")
    return (len(_LEADING_METRICS), name)


def _read_history(path: Path) -> tuple[list[dict[str, Any]], int]:
    if not path.is_file():
        return [], 0
    rows: list[dict[str, Any]] = []
    skipped = 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            skipped += 1
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            skipped += 1
    return rows, skipped


def _read_summary(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path} is not valid JSON ({error}); it is written at the end of a run, so the "
            "run may have been interrupted while writing it; delete it to report the rounds only"
        ) from error
    if not isinstance(summary, dict):
        raise ValueError(
            f"{path} should hold a JSON object (name, rounds, final, ...), "
            f"found a {type(summary).__name__}"
        )
    return summary


def _read_text(path: Path) -> str | None:
    return path.read_text(encoding="utf-8", errors="replace") if path.is_file() else None


def _render_page(
    run_dir: Path,
    *,
    history: Sequence[Mapping[str, Any]],
    skipped: int,
    summary: Mapping[str, Any],
    config: str | None,
    images: Sequence[Path],
    figures: Mapping[str, Path] | None = None,
    roc: Path | None = None,
) -> str:
    name = str(summary.get("name") or run_dir.name)
    sections = [
        f"<h1>{_e(name)}</h1>",
        f'<p class="meta">{_e(_meta_line(history, summary))}</p>',
        brief_section(summary),
        _results_section(summary),
        pooled_note(summary),
        f"<p><strong>Privacy:</strong> {_e(_privacy_line(summary))}</p>",
        privacy_section(summary, config),
        _rounds_notice(history, skipped),
        clinical_section(summary, roc_figure=_roc_figure(run_dir, roc)),
        _figures_section(run_dir, images),
        _per_client_section(summary),
        _groups_section(summary),
        contribution_section(summary),
        interpret_sections(run_dir, summary, figures or {}),
        _rounds_section(history),
        _config_section(config),
    ]
    body = _inline_images(run_dir, "\n".join(section for section in sections if section))
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{_e(name)} — consortium report</title>\n"
        f"<style>{_CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )


def _meta_line(history: Sequence[Mapping[str, Any]], summary: Mapping[str, Any]) -> str:
    rounds = summary.get("rounds")
    parts = [f"{format_value(rounds if isinstance(rounds, int) else len(history))} rounds"]
    duration = _number(summary.get("duration_s"))
    if duration is not None:
        parts.append(f"{duration:.1f} s")
    return " · ".join(parts)


def _results_section(summary: Mapping[str, Any]) -> str:
    # a row without a number (a baseline's budget) is not a result
    rows = [row for row in results_table_rows(summary) if any(v is not None for v in row[1:])]
    if not rows:
        return '<h2>Results</h2>\n<p class="note">No final results were recorded.</p>'
    # the spread across sites (worst, 10th percentile, median ...) after the headline metrics
    spread = [row for row in rows if row[0].endswith(_SPREAD)]
    rows = [row for row in rows if not row[0].endswith(_SPREAD)]
    personalized = _mapping(summary.get("personalized"))
    intervals = result_intervals(summary)

    def cell(column: str, metric: str, value: float | None) -> str:
        interval = _mapping(intervals.get(column)).get(metric)
        return format_value(value) + (format_interval(interval, digits=3) if value is not None else "")

    if personalized:  # each client's own model, beside the global one
        table = _table(
            ("metric", "federated", "personalised", "local only", "pooled"),
            [[metric, cell("federated", metric, fed),
              cell("personalised", metric, _number(personalized.get(metric))),
              cell("local only", metric, local), cell("pooled", metric, pooled)]
             for metric, fed, local, pooled in rows],
            numeric_from=1,
        )
    else:
        table = _table(
            ("metric", "federated", "local only", "pooled"),
            [[metric, cell("federated", metric, fed), cell("local only", metric, local),
              cell("pooled", metric, pooled)]
             for metric, fed, local, pooled in rows],
            numeric_from=1,
        )
    note = ""
    if intervals:
        ci = _mapping(summary.get("ci"))
        confidence = _number(ci.get("confidence"))
        level = f"{confidence:.0%}" if confidence is not None else "95%"
        note = (
            f'\n<p class="note">[low, high]: {_e(level)} confidence interval, '
            f"{_e(ci.get('method') or 'bootstrap')} (Efron &amp; Tibshirani 1993).</p>"
        )
    if spread:
        spread_table = _table(
            ("metric", "federated", "local only", "pooled"),
            [[metric, format_value(fed), format_value(local), format_value(pooled)]
             for metric, fed, local, pooled in spread],
            numeric_from=1,
        )
        note += ("\n<details>\n<summary>Spread across sites (worst, 10th percentile, median "
                 f"site)</summary>\n{spread_table}\n</details>")
    return f"<h2>Results</h2>\n{table}{note}{_budget_note(summary)}"


def _budget_note(summary: Mapping[str, Any]) -> str:
    """How long each baseline trained (``baselines.<name>.budget``, server/baselines.py)."""
    parts = []
    for name, label in (("local", "local only"), ("pooled", "pooled")):
        budget = _mapping(_mapping(_mapping(summary.get("baselines")).get(name)).get("budget"))
        if not budget:
            continue
        value = budget.get("epochs", budget.get("steps"))
        shown = f"{value:g}" if isinstance(value, float) else format_value(value)
        amount = f"{shown} {'epochs' if 'epochs' in budget else 'steps'}"
        rule = f" ({budget['rule']})" if isinstance(budget.get("rule"), str) else ""
        mode = f"{budget['mode']}, " if isinstance(budget.get("mode"), str) else ""
        parts.append(f"{label}: {mode}{amount}{rule}")
    if not parts:
        return ""
    return ('\n<p class="note">Baselines\' budget (evaluation.baseline_budget): '
            + _e("; ".join(parts)) + ".</p>")


_SPREAD = ("_min", "_p10", "_median", "_se", "_mean", "_std", "_jain")
"""Suffixes of a metric's spread across sites (``summarise_clients``, ``client_spread``)."""


def _privacy_line(summary: Mapping[str, Any]) -> str:
    if "privacy" not in summary:
        return "not recorded (summary.json is missing or has no privacy entry)."
    privacy = _mapping(summary.get("privacy"))
    epsilon = _number(privacy.get("epsilon"))
    if epsilon is None:
        return "no differential privacy (no ε was accounted for this run)."
    delta = _number(privacy.get("delta"))
    guarantee = f"(ε = {format_value(epsilon)}, δ = {format_value(delta)})"
    if delta is None:
        guarantee = f"ε = {format_value(epsilon)}"
    accountant = privacy.get("accountant")
    suffix = f", accounted with {accountant}" if accountant else ""
    return f"{guarantee}-differential privacy{suffix}."


def _rounds_notice(history: Sequence[Mapping[str, Any]], skipped: int) -> str:
    notes = []
    if not history:
        notes.append("No rounds were recorded (metrics.jsonl is missing or empty).")
    if skipped:
        notes.append(f"{skipped} line(s) of metrics.jsonl were not JSON objects and were skipped.")
    return "\n".join(f'<p class="note">{_e(note)}</p>' for note in notes)


def _figures_section(run_dir: Path, images: Sequence[Path]) -> str:
    if not images:
        return ""
    figures = []
    for image in images:
        source = image.relative_to(run_dir).as_posix()
        caption = image.stem.replace("_", " ")
        figures.append(
            f'<figure><img src="{_e(source)}" alt="{_e(caption)} per round">'
            f"<figcaption>{_e(caption)}</figcaption></figure>"
        )
    return '<h2>Curves</h2>\n<div class="figures">\n' + "\n".join(figures) + "\n</div>"


def _roc_figure(run_dir: Path, roc: Path | None) -> str:
    if roc is None:
        return ""
    source = roc.relative_to(run_dir).as_posix()
    return (f'<figure><img src="{_e(source)}" alt="ROC curves of the federated model">'
            "<figcaption>ROC curves (sensitivity against 1 − specificity)</figcaption></figure>")


_IMG_SRC = re.compile(r'<img src="([^"]+)"')


def _inline_images(run_dir: Path, body: str) -> str:
    """Each ``<img src="relative/path.png">`` of a figure inside ``run_dir`` becomes a
    ``data:`` URI (its file name kept in ``data-source``), so the page is one self-contained
    file; an image that cannot be read is dropped to its alt text rather than linked."""
    root = run_dir.resolve()

    def inline(match: re.Match[str]) -> str:
        source = html.unescape(match.group(1))
        if source.startswith("data:"):
            return match.group(0)
        path = (run_dir / source).resolve()
        kind = {".png": "image/png", ".svg": "image/svg+xml"}.get(path.suffix.lower())
        if kind is None or not path.is_relative_to(root) or not path.is_file():
            return f'<img data-source="{_e(source)}" src="data:," title="missing figure"'
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        return f'<img data-source="{_e(source)}" src="data:{kind};base64,{data}"'

    return _IMG_SRC.sub(inline, body)


_KINDS = (("global", "global"), ("personalized", "personalised"), ("local", "local only"))
"""Per-client model kinds in ``summary.json`` (``<kind>_<metric>``) and their column names."""


def _per_client_section(summary: Mapping[str, Any]) -> str:
    per_client = _mapping(summary.get("per_client"))
    if not per_client:
        return ""
    results = {str(client): _mapping(values) for client, values in per_client.items()}
    prefixes = tuple(f"{kind}_" for kind, _ in _KINDS)
    metrics = sorted(
        {m for values in results.values() for m in values if not m.startswith(prefixes)},
        key=_metric_order,
    )
    rows = [
        [client, *(format_value(values.get(metric)) for metric in metrics)]
        for client, values in results.items()
    ]
    table = _table(("client", *metrics), rows, numeric_from=1)
    return (
        f"{_comparison_section(summary, results)}"
        f'<h2>Per client</h2>\n<div class="scroll">{table}</div>'
    )


def _comparison_section(summary: Mapping[str, Any], results: Mapping[str, Mapping[str, Any]]) -> str:
    """Each client's global / personalised / local-only accuracy side by side, and their
    spread across clients (``client_accuracy``), when more than the global model was
    evaluated per client."""
    kinds = [(k, label) for k, label in _KINDS
             if any(f"{k}_accuracy" in values for values in results.values())]
    if not any(k != "global" for k, _ in kinds):
        return ""
    metrics = [m for m in ("accuracy", "balanced_accuracy")
               if any(f"{k}_{m}" in v for k, _ in kinds for v in results.values())]
    header = ["client", *(f"{label} {m.replace('_', ' ')}" for m in metrics for _, label in kinds)]
    rows = [
        [client, *(format_value(_number(values.get(f"{k}_{m}"))) for m in metrics for k, _ in kinds)]
        for client, values in results.items()
    ]
    out = (
        "<h2>Per client: global, personalised and local-only models</h2>\n"
        '<p class="note">Each client evaluates on its own test split: the global model, its own '
        "(personalised or fine-tuned) model, and the model it trains alone.</p>\n"
        f'<div class="scroll">{_table(header, rows, numeric_from=1)}</div>'
    )
    spread = _mapping(summary.get("client_accuracy"))
    stats = ("mean", "worst", "p10", "std", "jain")
    spread_rows = [
        [label, *(format_value(_number(_mapping(spread.get(k)).get(s))) for s in stats)]
        for k, label in _KINDS if k in spread
    ]
    if spread_rows:
        out += (
            "\n<h3>Accuracy across clients</h3>\n"
            + _table(("model", "mean", "worst", "10th percentile", "std", "Jain's index"),
                     spread_rows, numeric_from=1)
        )
    return out + "\n"


_GROUP_RATES = (("n", "n"), ("accuracy", "accuracy"), ("tpr", "TPR"), ("fpr", "FPR"),
                ("positive_rate", "positive rate"), ("mean_predicted", "mean predicted"),
                ("observed_rate", "observed rate"), ("ece", "ECE"))
_GROUP_GAPS = (("equalized_odds", "equalised odds"), ("demographic_parity", "demographic parity"),
               ("accuracy", "accuracy"), ("calibration", "calibration"), ("ece", "ECE"))


def _groups_section(summary: Mapping[str, Any]) -> str:
    """``summary.json``'s ``groups`` (``evaluation.groups``): per group column, the final
    model's rates per group over every site's test split, and the gaps overall and per site."""
    groups = _mapping(summary.get("groups"))
    if not groups:
        return ""
    out = ["<h2>Groups</h2>",
           '<p class="note">The final global model per group, pooled over the sites\' test '
           "splits; gaps are the largest difference between groups (the group "
           "<em>missing</em> left out); calibration: mean predicted probability minus the "
           "observed positive rate.</p>"]
    for column, body in groups.items():
        overall = _mapping(_mapping(body).get("overall"))
        by_group = _mapping(overall.get("groups"))
        rates = [key for key, _ in _GROUP_RATES
                 if any(key in _mapping(g) for g in by_group.values())]
        rows = [[str(label), *(format_value(_number(_mapping(g).get(k))) for k in rates)]
                for label, g in by_group.items()]
        head = ["group", *(name for key, name in _GROUP_RATES if key in rates)]
        gap_rows = [["overall", *(format_value(_number(_mapping(overall.get("gaps")).get(k)))
                                  for k, _ in _GROUP_GAPS)]]
        gap_rows += [[str(site), *(format_value(_number(_mapping(_mapping(v).get("gaps")).get(k)))
                                   for k, _ in _GROUP_GAPS)]
                     for site, v in _mapping(_mapping(body).get("sites")).items()]
        out += [f"<h3>{_e(column)}</h3>", _table(head, rows, numeric_from=1),
                _table(("gap", *(name for _, name in _GROUP_GAPS)), gap_rows, numeric_from=1)]
        post = _mapping(_mapping(body).get("postprocessed"))
        if post:
            out.append(_postprocessed(post))
    return "\n".join(out)


def _postprocessed(post: Mapping[str, Any]) -> str:
    """The equalised-odds thresholds' block (``[fairness] method = "thresholds"``): each
    group's threshold, the post-processed rates and gaps beside the plain model's, and the
    accuracy cost."""
    overall = _mapping(post.get("overall"))
    by_group = _mapping(overall.get("groups"))
    thresholds = _mapping(post.get("thresholds"))
    rates = [key for key, _ in _GROUP_RATES
             if any(key in _mapping(g) for g in by_group.values())]
    rows = [[str(label), format_value(_number(thresholds.get(label))),
             *(format_value(_number(_mapping(g).get(k))) for k in rates)]
            for label, g in by_group.items()]
    head = ["group", "threshold", *(name for key, name in _GROUP_RATES if key in rates)]
    plain = _mapping(post.get("plain"))
    cost = [["accuracy", format_value(_number(plain.get("accuracy"))),
             format_value(_number(post.get("accuracy"))),
             format_value(_number(post.get("accuracy_cost")))],
            ["balanced accuracy", format_value(_number(plain.get("balanced_accuracy"))),
             format_value(_number(post.get("balanced_accuracy"))),
             format_value(_number(post.get("balanced_accuracy_cost")))]]
    gaps = [["post-processed", *(format_value(_number(_mapping(overall.get("gaps")).get(k)))
                                 for k, _ in _GROUP_GAPS)]]
    return "\n".join([
        f"<h4>Equalised-odds thresholds ({_e(str(post.get('method', '')))})</h4>",
        _table(head, rows, numeric_from=1),
        _table(("gap", *(name for _, name in _GROUP_GAPS)), gaps, numeric_from=1),
        _table(("", "plain", "post-processed", "cost"), cost, numeric_from=1),
    ])


def _rounds_section(history: Sequence[Mapping[str, Any]]) -> str:
    if not history:
        return ""
    columns = list(dict.fromkeys(key for row in history for key in row))
    columns.sort(key=lambda key: key != "round")  # stable: round first, the rest as logged
    rows = [[format_value(row.get(column)) for column in columns] for row in history]
    table = _table(columns, rows, numeric_from=0)
    return (
        f"<details>\n<summary>Per-round metrics ({len(history)} rounds)</summary>\n"
        f'<div class="scroll">{table}</div>\n</details>'
    )


def _config_section(config: str | None) -> str:
    if config is None:
        return '<h2>Configuration</h2>\n<p class="note">config.toml was not found.</p>'
    return f"<h2>Configuration</h2>\n<pre>{_e(config)}</pre>"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], *, numeric_from: int) -> str:
    """An HTML table of plain-text cells; columns from ``numeric_from`` on are right-aligned."""
    head = "".join(f"<th>{_e(cell)}</th>" for cell in header)
    body = "\n".join(
        "<tr>"
        + "".join(
            f'<td class="num">{_e(cell)}</td>' if index >= numeric_from else f"<td>{_e(cell)}</td>"
            for index, cell in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>"


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)
