"""``consortium analyze``: run a query across the sites and write what it found.

The sites' side (:mod:`consortium.analytics.site`) and the server's side
(:mod:`consortium.analytics.server`) exchange only plain data — profiles, a schema, answers —
through a :data:`SiteCall` seam: in process here; any transport that can call a function at a
site (Ray, the deployment's gRPC) plugs in at the same place.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from consortium.analytics.query import Query, Schema
from consortium.analytics.server import agree, combine
from consortium.analytics.site import Answer, Profile, SiteData, describe, profile
from consortium.config import ExperimentConfig
from consortium.data._tables import Table
from consortium.errors import ConfigError

__all__ = ["Analysis", "SiteCall", "analyze", "in_process", "run_query"]

T = TypeVar("T")

#: Runs ``fn`` at every site on its own data and returns the answers in site order.
SiteCall = Callable[[Callable[[SiteData], Any]], list[Any]]


def in_process(tables: Mapping[str, Table], query: Query) -> SiteCall:
    """The sites as tables in this process (simulation)."""
    data = [SiteData(t, query) for t in tables.values()]

    def call(fn: Callable[[SiteData], T]) -> list[T]:
        return [fn(d) for d in data]

    return call


@dataclass
class Analysis:
    """What an analysis found: ``result`` is ``analysis.json``'s content; ``bias`` is
    ``bias.json``'s (with ``--bias``)."""

    result: dict[str, Any]
    schema: Schema
    profiles: list[Profile]
    answers: list[Answer]
    bias: dict[str, Any] | None = None


def run_query(
    call: SiteCall, query: Query, *, names: Sequence[str] | None = None,
    threshold: float = 0.5, neighbours: int = 0,
) -> Analysis:
    """Both phases over ``call``'s sites: profile, agree, describe, combine."""
    profiles: list[Profile] = call(profile)
    schema = agree(profiles, query)
    answers: list[Answer] = call(lambda d: describe(d, schema))
    if query.secure:  # the server half of SecAgg+ sees masked vectors and one total
        from consortium.analytics.secure import secure_total

        answers = [secure_total(answers, threshold=threshold, neighbours=neighbours)]
    wanted = list(names or query.columns or schema.columns)
    result = combine(answers, schema, wanted)
    result["query"] = _query_json(query)
    result["protection"] = {
        "min_count": query.min_count,
        "suppress": query.suppress,
        "secure_aggregation": query.secure,
        "differential_privacy": None,
        "per_site_tables": not query.secure,
        "rule": (
            "every released count is 0 or at least min_count; means and variances over at "
            "least min_count values; no raw minimum or maximum; histograms coarsened until "
            "every bin holds 0 or at least min_count values"
        ),
    }
    return Analysis(result, schema, profiles, answers)


def _query_json(q: Query) -> dict[str, Any]:
    return {
        "columns": list(q.columns), "where": q.where, "group_by": q.group_by,
        "categorical": list(q.categorical), "max_levels": q.max_levels, "bins": q.bins,
        "quantiles": list(q.quantiles), "crosstabs": ["*".join(p) for p in q.crosstabs],
        "correlation": list(q.correlation),
        "survival": list(q.survival) if q.survival else None,
    }


def analyze(
    cfg: ExperimentConfig,
    *,
    tables: Mapping[str, Table] | None = None,
    out: str | Path | None = None,
    bias: bool = False,
) -> Analysis:
    """Run ``cfg``'s ``[analysis]`` over its ``[data]`` sites and (with ``out``) write
    ``analysis.json``, ``table1.csv`` and ``analysis.html`` (plus ``bias.json`` and
    ``bias.html`` with ``bias``) into ``out``.

    Args:
        cfg: the experiment; ``[data]`` says where the sites' tables are, ``[analysis]`` what
            to compute.
        tables: the sites' tables instead of reading ``cfg.data`` (site id → table).
        out: the directory to write into (created).
        bias: also build the bias and representation report.

    Raises:
        ConfigError: a setting this version cannot honour (DP for analytics: not yet; the
            bias report under secure aggregation).
        DataError: a data or disclosure problem, naming the site and column.
    """
    from consortium.analytics.sources import site_tables

    secure = cfg.secure_aggregation.enabled
    if secure and bias:
        raise ConfigError(
            "--bias compares the sites with each other, and under secure aggregation the "
            "server sees only totals across sites; run the bias report without "
            "secure_aggregation.enabled (each site still withholds its small cells)"
        )
    if cfg.privacy.mode != "none":
        raise ConfigError(
            f"consortium analyze with privacy.mode = {cfg.privacy.mode!r} is not available yet; "
            "statistics are released without noise (set privacy.mode = \"none\")"
        )
    tables = dict(tables) if tables is not None else site_tables(cfg.data)
    query = Query.from_config(cfg.analysis, secure=secure)
    if bias:
        from consortium.analytics.bias import bias_query

        query = bias_query(query, tables, cfg)
    sa = cfg.secure_aggregation
    result = run_query(in_process(tables, query), query, threshold=sa.threshold,
                       neighbours=sa.neighbours)
    if bias:
        from consortium.analytics.bias import bias_report

        result.bias = bias_report(result, cfg)
    if out is not None:
        write(result, Path(out))
    return result


def write(analysis: Analysis, out: Path) -> None:
    """``analysis.json``, ``table1.csv``, ``analysis.html`` (and the bias files) in ``out``."""
    from consortium.analytics.report import table1_csv, table1_html

    out.mkdir(parents=True, exist_ok=True)
    (out / "analysis.json").write_text(json.dumps(analysis.result, indent=2) + "\n")
    (out / "table1.csv").write_text(table1_csv(analysis.result))
    (out / "analysis.html").write_text(table1_html(analysis.result))
    if analysis.bias is not None:
        from consortium.analytics.bias import bias_html

        (out / "bias.json").write_text(json.dumps(analysis.bias, indent=2) + "\n")
        (out / "bias.html").write_text(bias_html(analysis.bias))
