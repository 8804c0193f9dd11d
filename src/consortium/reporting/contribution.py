"""The report's "Contribution and benefit" section: each site's score, its flag and what it gained."""

from __future__ import annotations

import html
from collections.abc import Mapping
from typing import Any

__all__ = ["contribution_section"]


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _num(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _bar(value: float, scale: float) -> str:
    """A horizontal bar (CSS only): right of the axis for a positive score, left for negative."""
    width = 0 if scale <= 0 else min(50.0, 50.0 * abs(value) / scale)
    colour = "#4c78a8" if value >= 0 else "#e45756"
    left = 50.0 if value >= 0 else 50.0 - width
    return (f'<div style="position:relative;width:220px;height:12px;background:#f3f3f3">'
            f'<div style="position:absolute;left:50%;top:0;bottom:0;border-left:1px solid #999">'
            f'</div><div style="position:absolute;left:{left:.1f}%;width:{width:.1f}%;top:2px;'
            f'height:8px;background:{colour}"></div></div>')


def contribution_section(summary: Mapping[str, Any]) -> str:
    """``summary.json``'s ``contribution`` as a table (score ± standard error, a bar, the
    free-rider / low-quality flag, the benefit over local-only training); ``""`` without it."""
    c = summary.get("contribution")
    if not isinstance(c, Mapping):
        return ""
    scores = {str(k): v for k, v in (c.get("scores") or {}).items() if _num(v) is not None}
    if not scores:
        return ""
    se = c.get("standard_error") or {}
    ben = c.get("benefit") or {}
    flagged = set(c.get("flagged") or ())
    unsure = set(c.get("indistinguishable") or ())
    scale = max(abs(float(v)) for v in scores.values())
    rows = []
    for site in sorted(scores, key=lambda s: -float(scores[s])):
        s = float(scores[site])
        e = _num(se.get(site))
        b = _num(ben.get(site))
        rows.append(
            f"<tr><td>{_e(site)}</td><td class=\"num\">{s:+.4f}</td>"
            f"<td class=\"num\">{'' if not e else f'± {e:.4f}'}</td><td>{_bar(s, scale)}</td>"
            f"<td class=\"num\">{'—' if b is None else f'{b:+.3f}'}</td>"
            f"<td>{'low / free-rider' if site in flagged else 'undetermined' if site in unsure else ''}"
            "</td></tr>")
    basis = c.get("benefit_basis")
    note = (f"Method {_e(c.get('method'))} on the coalition models rebuilt from each round's "
            f"updates (utility: {_e(c.get('utility'))}); {_e(c.get('rounds'))} rounds, "
            f"{_e(c.get('evaluations'))} model evaluations. Scores add up to Σ v(N) − v(∅) = "
            f"{_num(c.get('total')) or 0.0:.4f} for exact Shapley. Flagged: a score ≤ 0, or one "
            "whose upper bound (score + 2 standard errors) is below contribution.free_rider × "
            "the fair share; undetermined: positive but within 2 standard errors of 0 (not "
            "flagged: more permutations separate it). "
            + ("Benefit: the site's accuracy with the "
               f"{'personalised' if basis == 'personalized' else 'federated'} model minus its "
               "local-only accuracy." if basis else
               "Benefit needs the local-only baseline (evaluation.baselines = [\"local\", …])."))
    head = ("<thead><tr><th>site</th><th>score</th><th>error</th><th></th><th>benefit</th>"
            "<th>flag</th></tr></thead>")
    return (f"<h2>Contribution and benefit</h2>\n<p class=\"note\">{note}</p>\n"
            f"<table>\n{head}\n<tbody>\n" + "\n".join(rows) + "\n</tbody>\n</table>")
