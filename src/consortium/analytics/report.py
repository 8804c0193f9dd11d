"""Table 1 as people read it: the terminal, ``table1.csv`` and one self-contained HTML page."""

from __future__ import annotations

import csv
import html
import io
from typing import Any

__all__ = ["survival_rows", "table1_csv", "table1_html", "table1_rows", "table1_text"]

WITHHELD = "<5"


def _num(v: float | None, digits: int = 1) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _cell_numeric(c: dict[str, Any], stat: str) -> str:
    if stat == "mean ± sd":
        if c["mean"] is None:
            return "withheld"
        return f"{_num(c['mean'])} ± {_num(c['sd'])}"
    if c["median"] is None:
        return "withheld" if c["mean"] is None else "–"
    return f"{_num(c['median'])} [{_num(c['q1'])}, {_num(c['q3'])}]"


def _count(v: int | None, total: int | None, k: int) -> str:
    if v is None:
        return "withheld"
    if not total:
        return str(v)
    return f"{v} ({100 * v / total:.1f} %)"


def table1_rows(result: dict[str, Any]) -> list[list[str]]:
    """The table: a header row, then one row per statistic or category, one column per
    table (overall, each site, each group)."""
    t1 = result["table1"]
    k = int(result.get("protection", {}).get("min_count", 5))
    tables: list[tuple[str, dict[str, Any]]] = [("overall", t1["overall"])]
    tables += [(site, t) for site, t in t1["sites"].items()]
    if "groups" in result:
        g = result["groups"]
        tables += [(f"{g['column']} = {v}", t) for v, t in g["tables"].items()]

    def n_of(t: dict[str, Any]) -> str:
        return "withheld" if t["n"] is None else str(t["n"])

    rows = [["characteristic", ""] + [f"{name} (n = {n_of(t)})" for name, t in tables]]
    for col, first in t1["overall"]["columns"].items():
        if "counts" in first:
            rows.append([col, "n (%)"] + [""] * len(tables))
            for level in first["counts"]:
                row = [f"  {level}", ""]
                for _, t in tables:
                    c = t["columns"][col]
                    present = _present(c, t["n"])
                    row.append(_count(c["counts"].get(level, 0), present, k))
                rows.append(row)
        else:
            for stat in ("mean ± sd", "median [IQR]"):
                rows.append([col, stat] + [_cell_numeric(t["columns"][col], stat) for _, t in tables])
        rows.append([f"  {col} missing", ""] + [
            _count(t["columns"][col]["missing"], None, k) for _, t in tables
        ])
    return rows


def _present(c: dict[str, Any], n: int | None) -> int | None:
    if n is None or c["missing"] is None:
        return None
    return n - c["missing"]


def survival_rows(result: dict[str, Any], limit: int = 12) -> list[list[str]]:
    """Kaplan–Meier: time, then per group S(t) [95 % CI] and the number at risk; at most
    ``limit`` evenly spaced times (the JSON holds every one)."""
    sv = result.get("survival")
    if not sv or sv.get("withheld"):
        return []
    times = sv["time"]
    pick = sorted({round(i * (len(times) - 1) / max(limit - 1, 1)) for i in range(limit)}) if times else []
    head = ["time"] + [f"{g}: S(t) [95 % CI]" for g in sv["groups"]] + [f"{g}: at risk" for g in sv["groups"]]
    rows = [head]
    for j in pick:
        row = [f"{times[j]:g}"]
        for i in range(len(sv["groups"])):
            row.append(f"{sv['survival'][i][j]:.3f} [{sv['ci_lower'][i][j]:.3f}, {sv['ci_upper'][i][j]:.3f}]")
        row += [f"{sv['at_risk'][i][j]:g}" for i in range(len(sv["groups"]))]
        rows.append(row)
    medians = ", ".join(f"{g}: {'not reached' if m is None else f'{m:g}'}"
                        for g, m in zip(sv["groups"], sv["median"]))
    rows.append([f"median survival — {medians}"])
    if "logrank" in sv:
        lr = sv["logrank"]
        rows.append([f"log-rank test: χ² = {lr['chi2']:.3f}, {lr['dof']} df, p = {lr['p_value']:.3g}"])
    return rows


def _align(rows: list[list[str]]) -> str:
    width = max(len(r) for r in rows)
    widths = [max((len(r[i]) for r in rows if len(r) == width and i < len(r)), default=0)
              for i in range(width)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip()
                     if len(r) == width else r[0] for r in rows)


def table1_text(result: dict[str, Any]) -> str:
    text = _align(table1_rows(result))
    surv = survival_rows(result)
    if surv:
        text += "\n\nKaplan–Meier\n" + _align(surv)
    return text


def table1_csv(result: dict[str, Any]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(table1_rows(result))
    return buf.getvalue()


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; font-size: 14px; }
th, td { padding: 4px 10px; border-bottom: 1px solid #ddd; text-align: left; }
th { background: #f3f3f3; }
td.sub { padding-left: 2em; color: #444; }
p.note { color: #555; max-width: 60em; }
"""


def table1_html(result: dict[str, Any]) -> str:
    """One self-contained page (no external files): the Table 1 and what protected it."""
    rows = table1_rows(result)
    p = result.get("protection", {})
    out = ["<!doctype html><html><head><meta charset='utf-8'><title>Table 1</title>",
           f"<style>{_STYLE}</style></head><body><h1>Table 1</h1>"]
    q = result.get("query", {})
    if q.get("where"):
        out.append(f"<p>Cohort: <code>{html.escape(q['where'])}</code></p>")
    out.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in rows[0]) + "</tr>")
    for r in rows[1:]:
        cls = " class='sub'" if r[0].startswith("  ") else ""
        out.append("<tr>" + f"<td{cls}>{html.escape(r[0].strip())}</td>"
                   + "".join(f"<td>{html.escape(c)}</td>" for c in r[1:]) + "</tr>")
    out.append("</table>")
    surv = survival_rows(result, limit=40)
    if surv:
        out.append("<h2>Kaplan–Meier</h2><table><tr>"
                   + "".join(f"<th>{html.escape(c)}</th>" for c in surv[0]) + "</tr>")
        for r in surv[1:]:
            span = f" colspan='{len(surv[0])}'" if len(r) == 1 else ""
            out.append("<tr>" + "".join(f"<td{span}>{html.escape(c)}</td>" for c in r) + "</tr>")
        out.append("</table>")
    out.append(
        "<p class='note'>Computed from per-site sums; no row left a site. Disclosure control at "
        f"each site: {html.escape(str(p.get('rule', '')))} (min_count = {p.get('min_count')}). "
        "A withheld cell makes every total it enters unknown. Medians and quartiles come from "
        "histograms: analysis.json's <code>quantile_bounds</code> gives each one's largest "
        "possible error.</p>"
    )
    for note in result.get("notes", []):
        out.append(f"<p class='note'>{html.escape(note)}</p>")
    out.append("</body></html>\n")
    return "\n".join(out)
