"""The bias and representation report (``consortium analyze --bias``): where the sites' data
differ in ways that bias a federated model, ranked, each with what to do.

Built only from the analysis' per-site sums (the same disclosure rules hold). The checks, most
important first:

- **measurement anomalies** — a numeric column constant at one site (all-zero: a "not measured"
  coded as 0, as Switzerland's cholesterol in the UCI data), or whose values lie outside every
  other site's range (a unit or coding difference);
- **label prevalence** — a site's share of positive labels far from the pooled share (a model
  fitted to the pool is miscalibrated there);
- **missingness** — a column mostly missing at a site;
- **covariate shift** — the standardised mean difference (SMD) of each column between a site
  and the other sites: ``(m₁ − m₂)/√((s₁² + s₂²)/2)`` for numbers (Cohen's d), and for a
  category share ``(p₁ − p₂)/√((p₁(1−p₁) + p₂(1−p₂))/2)`` (Austin 2009, "Balance diagnostics
  for comparing the distribution of baseline covariates", Stat Med 28:3083); 0.2 is small, 0.5
  medium, 0.8 large (Cohen 1988);
- **representation** — a subgroup (a sex, an age band) under-represented at a site compared
  with the pool.

The thresholds are conventions, stated in each finding; the heat map shows every SMD.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np

from consortium.analytics.query import Query
from consortium.config import ExperimentConfig
from consortium.data._tables import Table

__all__ = ["AGE_BANDS", "bias_html", "bias_query", "bias_query_for", "bias_report"]

AGE_BANDS = (40.0, 50.0, 60.0, 70.0)
SEX_COLUMNS = ("sex", "gender")
SMD_FLAG = 0.5
PREVALENCE_FLAG = 0.15
MISSING_FLAG = 0.5
UNDER = 0.5  # a subgroup's share at a site below half its pooled share


def _label_column(cfg: ExperimentConfig, names: set[str]) -> str | None:
    if cfg.data.dataset == "heart-disease":
        return "num"
    return cfg.data.target if cfg.data.target in names else None


def bias_query(query: Query, tables: Mapping[str, Table], cfg: ExperimentConfig) -> Query:
    """The analysis' query with what the bias report needs: an ``age_band`` column when the
    data have an ``age`` column."""
    names = set.intersection(*(set(t.names) for t in tables.values())) if tables else set()
    return bias_query_for(query, names, cfg)


def bias_query_for(query: Query, names: set[str], cfg: ExperimentConfig) -> Query:
    """:func:`bias_query` from the columns every site has (``names``), e.g. as deployed sites
    report them."""
    bands = tuple(query.bands)
    if "age" in names and not any(c == "age" for c, _ in bands):
        bands += (("age", AGE_BANDS),)
    columns = query.columns
    if columns:
        extra = [c for c in ("age_band", _label_column(cfg, names)) if c and c not in columns]
        columns = (*columns, *[c for c in extra if c == "age_band" and bands or c in names])
    return replace(query, bands=bands, columns=columns)


def _finding(site: str, column: str | None, kind: str, detail: str, score: float) -> dict[str, Any]:
    return {"site": site, "column": column, "kind": kind, "detail": detail, "_score": score}


def _numeric_stats(analysis: Any, site_index: int | None, column: str) -> tuple[float, float, float] | None:
    """(n, mean, variance) of ``column`` over one site's answer, or over every other site's
    (``site_index`` negative: all but ``-site_index - 1``); None if a site withheld it."""
    answers = analysis.answers
    chosen = ([answers[site_index]] if site_index is not None and site_index >= 0 else
              [a for i, a in enumerate(answers) if site_index is None or i != -site_index - 1])
    key = f"all|{column}"
    n = s1 = s2 = 0.0
    for a in chosen:
        if any(a.withheld[f"{key}|{p}"].any() for p in ("count", "s1", "s2")):
            return None
        n += float(a.values[f"{key}|count"])
        s1 += float(a.values[f"{key}|s1"])
        s2 += float(a.values[f"{key}|s2"])
    if n < 2:
        return None
    return n, s1 / n, max((s2 - s1 * s1 / n) / (n - 1), 0.0)


def _smd(m1: float, v1: float, m2: float, v2: float) -> float | None:
    pooled = math.sqrt((v1 + v2) / 2)
    if pooled == 0:
        return None
    return (m1 - m2) / pooled


def _share_smd(p1: float, p2: float) -> float | None:
    pooled = math.sqrt((p1 * (1 - p1) + p2 * (1 - p2)) / 2)
    return None if pooled == 0 else (p1 - p2) / pooled


def _shares(table: Mapping[str, Any], column: str) -> dict[str, float] | None:
    c = table["columns"][column]
    counts = c["counts"]
    if any(v is None for v in counts.values()):
        return None
    total = sum(counts.values())
    return {k: v / total for k, v in counts.items()} if total else None


def bias_report(analysis: Any, cfg: ExperimentConfig) -> dict[str, Any]:
    """``bias.json``'s content: ``findings`` (most important first) and the ``smd`` heat map
    (site → column → SMD against the other sites)."""
    result = analysis.result
    t1 = result["table1"]
    sites = list(t1["sites"])
    overall = t1["overall"]
    columns = list(overall["columns"])
    label = _label_column(cfg, set(columns))
    k = result["protection"]["min_count"]
    findings: list[dict[str, Any]] = []
    smd: dict[str, dict[str, float | None]] = {s: {} for s in sites}

    for i, site in enumerate(sites):
        table = t1["sites"][site]
        n = table["n"]
        for col in columns:
            c = table["columns"][col]
            spec = analysis.schema.spec(col)
            # missingness
            if n and c["missing"] is not None and c["missing"] / n >= MISSING_FLAG:
                share = c["missing"] / n
                o = overall["columns"][col]["missing"]
                elsewhere = (f"; {100 * (o - c['missing']) / max(overall['n'] - n, 1):.0f} % at "
                             "the other sites" if o is not None and overall["n"] else "")
                findings.append(_finding(
                    site, col, "mostly_missing",
                    f"{100 * share:.0f} % of {col} missing at {site}{elsewhere} — a model "
                    "imputes most of it there: drop the column, or add a per-site missing "
                    "indicator", 1 + share))
            if spec.kind == "numeric" and col != label:
                mine = _numeric_stats(analysis, i, col)
                others = _numeric_stats(analysis, -i - 1, col)
                if mine is not None and mine[0] >= k and mine[2] == 0:
                    value = mine[1] + spec.shift
                    zero = abs(value) < 1e-12
                    findings.append(_finding(
                        site, col, "all_zero" if zero else "constant",
                        f"every one of the {int(mine[0])} recorded {col} values at {site} is "
                        f"{value:g}" + (" — most likely 'not measured' recorded as 0; declare "
                                        "0 missing at this site (a [map] of \"0\" to missing in "
                                        "harmonize.toml) or leave the column out"
                                        if zero else " — a default or placeholder value; check "
                                        "how the site records it"), 3.0))
                if mine is not None and others is not None:
                    d = _smd(mine[1], mine[2], others[1], others[2])
                    smd[site][col] = d
                    if d is not None and abs(d) >= SMD_FLAG and mine[2] > 0:
                        findings.append(_finding(
                            site, col, "covariate_shift",
                            f"{col}: mean {mine[1] + spec.shift:.3g} at {site} vs "
                            f"{others[1] + spec.shift:.3g} elsewhere (SMD {d:+.2f}; ≥ 0.5 is a "
                            "medium shift) — check units and coding; expect the model to fit "
                            "this site less well", abs(d) / 2))
                _out_of_range(analysis, i, site, col, findings)
            elif spec.kind == "categorical" and col != label:
                mine_s = _shares(table, col)
                rest = _rest_shares(t1, site, col)
                if mine_s is not None and rest is not None:
                    worst = None
                    for level, p in mine_s.items():
                        d = _share_smd(p, rest.get(level, 0.0))
                        if d is not None and (worst is None or abs(d) > abs(worst[1])):
                            worst = (level, d)
                    smd[site][col] = worst[1] if worst else None
                    if worst and abs(worst[1]) >= SMD_FLAG and col not in ("age_band", *SEX_COLUMNS):
                        level, d = worst
                        findings.append(_finding(
                            site, col, "covariate_shift",
                            f"{col} = {level}: {100 * mine_s[level]:.0f} % at {site} vs "
                            f"{100 * rest.get(level, 0):.0f} % elsewhere (SMD {d:+.2f})",
                            abs(d) / 2))
        if label:
            _prevalence(t1, site, label, findings)
        for col in [c for c in (*SEX_COLUMNS, "age_band") if c in columns]:
            _representation(t1, site, col, findings)

    findings.sort(key=lambda f: -f["_score"])
    for f in findings:
        del f["_score"]
    return {"findings": findings, "smd": smd, "label": label,
            "thresholds": {"smd": SMD_FLAG, "prevalence": PREVALENCE_FLAG,
                           "missing": MISSING_FLAG, "under_represented": UNDER}}


def _rest_shares(t1: Mapping[str, Any], site: str, col: str) -> dict[str, float] | None:
    counts: dict[str, int] = {}
    for other, table in t1["sites"].items():
        if other == site:
            continue
        for level, v in table["columns"][col]["counts"].items():
            if v is None:
                return None
            counts[level] = counts.get(level, 0) + v
    total = sum(counts.values())
    return {k: v / total for k, v in counts.items()} if total else None


def _positive_share(shares: Mapping[str, float]) -> float:
    """The share of rows whose label is not the first category (0, "no", "negative")."""
    first = next(iter(shares))
    return 1.0 - shares[first]


def _prevalence(t1: Mapping[str, Any], site: str, label: str, findings: list[dict[str, Any]]) -> None:
    mine = _shares(t1["sites"][site], label)
    pooled = _shares(t1["overall"], label)
    if mine is None or pooled is None:
        return
    p, q = _positive_share(mine), _positive_share(pooled)
    if abs(p - q) >= PREVALENCE_FLAG:
        findings.append(_finding(
            site, None, "label_prevalence",
            f"{100 * p:.0f} % positive {label} at {site} vs {100 * q:.0f} % pooled "
            f"({100 * (p - q):+.0f} points) — report per-site calibration and the "
            "majority-class accuracy beside the model's; consider per-site thresholds or "
            "personalisation", 2 + abs(p - q)))


def _representation(t1: Mapping[str, Any], site: str, col: str, findings: list[dict[str, Any]]) -> None:
    mine = _shares(t1["sites"][site], col)
    pooled = _shares(t1["overall"], col)
    if mine is None or pooled is None:
        return
    for level, q in pooled.items():
        p = mine.get(level, 0.0)
        if q >= 0.1 and p < UNDER * q:
            findings.append(_finding(
                site, col, "under_represented",
                f"{col} = {level} is {100 * p:.0f} % of {site}'s patients vs {100 * q:.0f} % "
                "pooled — the model's accuracy for this group rests on the other sites; report "
                "it per subgroup", 1 + (q - p)))


def _out_of_range(analysis: Any, i: int, site: str, col: str, findings: list[dict[str, Any]]) -> None:
    profiles = analysis.profiles
    mine = profiles[i].ranges.get(col)
    others = [p.ranges[col] for j, p in enumerate(profiles) if j != i and col in p.ranges]
    if mine is None or not others:
        return
    low, high = min(r[0] for r in others), max(r[1] for r in others)
    if mine[1] < low or mine[0] > high:
        findings.append(_finding(
            site, col, "out_of_range",
            f"{col} at {site} lies in [{mine[0]:g}, {mine[1]:g}], outside the other sites' "
            f"[{low:g}, {high:g}] — a different unit or coding? Convert it with a [units] table "
            "in harmonize.toml", 2.5))


def _heatmap_png(smd: Mapping[str, Mapping[str, float | None]]) -> str | None:
    sites = list(smd)
    cols = sorted({c for row in smd.values() for c in row})
    if not sites or not cols:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = np.array([[np.nan if smd[s].get(c) is None else abs(float(smd[s][c] or 0))  # type: ignore[arg-type]
                      for c in cols] for s in sites])
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(cols)), 1 + 0.5 * len(sites)))
    im = ax.imshow(grid, cmap="Reds", vmin=0, vmax=1.5, aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=60, ha="right")
    ax.set_yticks(range(len(sites)), sites)
    for (r, c), v in np.ndenumerate(grid):
        if not np.isnan(v):
            ax.text(c, r, f"{v:.1f}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=ax, label="|SMD| vs the other sites")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def bias_html(report: Mapping[str, Any]) -> str:
    """One self-contained page: the ranked findings and the heat map (embedded)."""
    out = ["<!doctype html><html><head><meta charset='utf-8'><title>Bias report</title>",
           "<style>body{font-family:system-ui,sans-serif;margin:2em}td,th{padding:4px 8px;"
           "border-bottom:1px solid #ddd;text-align:left;vertical-align:top}</style></head><body>",
           "<h1>Bias and representation report</h1>"]
    png = _heatmap_png(report.get("smd", {}))
    if png:
        out.append(f"<img alt='SMD heat map' src='data:image/png;base64,{png}'>")
    out.append("<table><tr><th>#</th><th>site</th><th>column</th><th>kind</th><th>finding</th></tr>")
    for i, f in enumerate(report["findings"], 1):
        out.append(
            f"<tr><td>{i}</td><td>{html.escape(str(f['site']))}</td>"
            f"<td>{html.escape(str(f['column'] or ''))}</td><td>{html.escape(f['kind'])}</td>"
            f"<td>{html.escape(f['detail'])}</td></tr>"
        )
    out.append("</table></body></html>\n")
    return "\n".join(out)
