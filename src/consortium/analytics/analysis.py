"""``consortium analyze``: run a query across the sites and write what it found.

The sites' side (:mod:`consortium.analytics.site`) and the server's side
(:mod:`consortium.analytics.server`) exchange only plain data — profiles, a schema, answers —
through a :data:`SiteCall` seam: in process here; any transport that can call a function at a
site (Ray, the deployment's gRPC) plugs in at the same place.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, TypeVar

from consortium.analytics.query import Query, Schema
from consortium.analytics.server import agree, combine
from consortium.analytics.site import Answer, Profile, SiteData, describe, profile
from consortium.config import ExperimentConfig
from consortium.data._tables import Table
from consortium.errors import ConfigError

__all__ = ["Analysis", "DPRequest", "SiteCall", "analyze", "in_process", "on_ray", "run_query"]

T = TypeVar("T")

#: Runs ``fn`` at every site on its own data and returns the answers in site order.
SiteCall = Callable[[Callable[[SiteData], Any]], list[Any]]


def in_process(
    tables: Mapping[str, Table], query: Query, *, budgets: Mapping[str, Any] | None = None
) -> SiteCall:
    """The sites as tables in this process (simulation); ``budgets``: each site's
    :class:`~consortium.analytics.dp.Budget` for DP queries."""
    data = [SiteData(t, query, budget=(budgets or {}).get(s)) for s, t in tables.items()]

    def call(fn: Callable[[SiteData], T]) -> list[T]:
        return [fn(d) for d in data]

    return call


def _at_site(fn: Callable[[SiteData], T], data: SiteData) -> T:
    return fn(data)


def on_ray(
    tables: Mapping[str, Table], query: Query, *, budgets: Mapping[str, Any] | None = None,
    address: str = "", workers: int = 0,
) -> SiteCall:
    """The sites as Ray tasks (``executor.kind = "ray"``): each site's table goes to the object
    store once; every phase runs as one task per site on the cluster (``address``) or on a
    local Ray started here (``workers`` CPUs). Needs ``pip install 'consortium[ray]'``."""
    from consortium.executors.ray import RayExecutor

    connector = RayExecutor(address=address, workers=workers)
    connector._connect()  # the executor's own start-up (a private local Ray, or the cluster)
    ray = connector._ray
    refs = [ray.put(SiteData(t, query, budget=(budgets or {}).get(s))) for s, t in tables.items()]
    remote = ray.remote(num_cpus=1)(_at_site)

    def call(fn: Callable[[SiteData], T]) -> list[T]:
        return list(ray.get([remote.remote(fn, ref) for ref in refs]))

    return call


@dataclass(frozen=True)
class DPRequest:
    """What a DP analysis asks: ε per query, the mechanism, δ and the public schema."""

    epsilon: float
    delta: float
    mechanism: Literal["gaussian", "laplace"]
    bounds: Mapping[str, tuple[float, float]]
    categories: Mapping[str, tuple[Any, ...]]


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
    threshold: float = 0.5, neighbours: int = 0, dp: DPRequest | None = None,
) -> Analysis:
    """Both phases over ``call``'s sites: profile, agree, describe, combine."""
    if dp is not None:  # the public declaration alone: nothing data-dependent outside the noise
        query, schema = dp_schema(query, dp, call(lambda d: d.names)[0])
        profiles: list[Profile] = []
    else:
        profiles = call(profile)
        schema = agree(profiles, query)
    answers: list[Answer] = call(lambda d: describe(d, schema))
    sites = len(answers)
    if query.secure:  # the server half of SecAgg+ sees masked vectors and one total
        from consortium.analytics.secure import secure_total

        answers = [secure_total(answers, threshold=threshold, neighbours=neighbours)]
    return report(schema, profiles, answers, names=names, sites=sites)


def dp_schema(query: Query, dp: DPRequest, names: Sequence[str]) -> tuple[Query, Schema]:
    """The query with its noise plan and the schema from the public declarations under DP
    (``names``: the first site's columns, whose order a query of every column follows)."""
    from consortium.analytics import dp as dpm

    schema = dpm.declared_schema(query, dp.bounds, dp.categories, names)
    cols = list(query.columns) or [n for n in names if n in schema.columns]
    plan = dpm.plan_noise(schema, cols, epsilon=dp.epsilon, delta=dp.delta,
                          mechanism=dp.mechanism)
    query = replace(query, dp=plan, columns=tuple(cols))
    return query, replace(schema, query=query)


def report(
    schema: Schema, profiles: list[Profile], answers: list[Answer], *,
    names: Sequence[str] | None = None, sites: int,
) -> Analysis:
    """The analysis from the phase-2 answers (one secure total under secure aggregation):
    the statistics (:func:`~consortium.analytics.server.combine`), the query, the protection
    in force and, under DP, each statistic's noise; ``sites``: how many sites answered."""
    query = schema.query
    wanted = list(names or query.columns or schema.columns)
    result = combine(answers, schema, wanted)
    result["query"] = _query_json(query)
    result["protection"] = {
        "min_count": query.min_count,
        "suppress": query.suppress,
        "secure_aggregation": query.secure,
        "differential_privacy": None if query.dp is None else {
            "epsilon": query.dp.epsilon, "delta": query.dp.delta,
            "mechanism": query.dp.mechanism, "statistics_per_row": query.dp.statistics,
            "noise_multiplier": query.dp.noise_multiplier,
            "guarantee": "each site's rows are (ε, δ)-DP per query: the site adds the noise to "
                         "everything it releases, from its own OS randomness, before it leaves",
        },
        "per_site_tables": not query.secure,
        "rule": (
            "every released count is 0 or at least min_count; means and variances over at "
            "least min_count values; no raw minimum or maximum; histograms coarsened until "
            "every bin holds 0 or at least min_count values"
        ),
    }
    if query.dp is not None:
        from consortium.analytics.dp import noise_sd

        result["noise_sd"] = noise_sd(schema, query.dp, wanted, sites, result)
    return Analysis(result, schema, profiles, answers)


def _query_json(q: Query) -> dict[str, Any]:
    return {
        "columns": list(q.columns), "where": q.where, "group_by": q.group_by,
        "categorical": list(q.categorical), "max_levels": q.max_levels, "bins": q.bins,
        "quantiles": list(q.quantiles), "crosstabs": ["*".join(p) for p in q.crosstabs],
        "correlation": list(q.correlation),
        "survival": list(q.survival) if q.survival else None,
    }


def check_analysis_config(cfg: ExperimentConfig, *, bias: bool) -> None:
    """Refuse what an analysis cannot honour, in process or deployed: the bias report under
    secure aggregation (it compares sites; the server sees only totals) and training's DP
    settings (analytics has its own: ``analysis.epsilon``)."""
    if cfg.secure_aggregation.enabled and bias:
        raise ConfigError(
            "--bias compares the sites with each other, and under secure aggregation the "
            "server sees only totals across sites; run the bias report without "
            "secure_aggregation.enabled (each site still withholds its small cells)"
        )
    if cfg.privacy.mode != "none":
        raise ConfigError(
            f"privacy.mode = {cfg.privacy.mode!r} is training's; for analytics set "
            "analysis.epsilon (each site adds noise to what it releases) and leave "
            "privacy.mode = \"none\""
        )


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
    check_analysis_config(cfg, bias=bias)
    tables = dict(tables) if tables is not None else site_tables(cfg.data)
    findings = _schema_findings(tables, cfg)
    query = Query.from_config(cfg.analysis, secure=secure)
    if bias:
        from consortium.analytics.bias import bias_query

        query = bias_query(query, tables, cfg)
    sa = cfg.secure_aggregation
    dp, budgets = _dp_parts(cfg, tables, out)
    ex = cfg.executor
    sites = (on_ray(tables, query, budgets=budgets, address=ex.address, workers=ex.workers)
             if ex.kind == "ray" else in_process(tables, query, budgets=budgets))
    result = run_query(sites, query, threshold=sa.threshold, neighbours=sa.neighbours, dp=dp)
    result.result["harmonisation"] = findings
    if bias:
        from consortium.analytics.bias import bias_report

        result.bias = bias_report(result, cfg)
    if out is not None:
        write(result, Path(out))
    return result


def _schema_findings(tables: Mapping[str, Table], cfg: ExperimentConfig) -> list[dict[str, Any]]:
    """The cross-site schema check (:mod:`consortium.data.schema_check`): a column coded
    differently at two sites is an error naming both codings (map them in harmonize.toml);
    the warnings (numbers here, text there; an empty column; a unit-like ratio of means) go
    into ``analysis.json`` under ``harmonisation``."""
    if len(tables) < 2:
        return []
    from consortium.data.schema_check import check_schemas, raise_for_errors

    allow: tuple[str, ...] = ()
    if cfg.data.harmonize:
        from consortium.data.harmonize import load_harmonization

        allow = tuple(load_harmonization(cfg.data.harmonize).allow)
    findings = check_schemas(tables, allow=allow)
    raise_for_errors(findings)
    return [{"kind": f.kind, "column": f.column, "sites": list(f.sites), "detail": f.detail,
             "severity": f.severity} for f in findings]


def _dp_parts(
    cfg: ExperimentConfig, tables: Mapping[str, Table], out: str | Path | None
) -> tuple[DPRequest | None, dict[str, Any] | None]:
    """The DP request and each site's budget (its policy from ``privacy.site_policies``, its
    ledger ``analysis.ledger`` or ``OUT/analytics_ledger.json``)."""
    a = cfg.analysis
    if a.epsilon <= 0:
        return None, None
    from consortium.analytics.dp import Budget, parse_bounds, parse_categories

    policies: dict[str, Any] = {}
    if cfg.privacy.site_policies:
        from consortium.privacy.policy import load_policies

        policies = load_policies(cfg.privacy.site_policies)
    ledger = Path(a.ledger) if a.ledger else (Path(out) / "analytics_ledger.json" if out else None)
    budgets = {}
    for site in tables:
        policy = policies.get(site, policies.get("*"))
        budgets[site] = Budget(
            site, policy.max_epsilon if policy else float("inf"),
            policy.delta if policy else cfg.privacy.delta, ledger,
        )
    request = DPRequest(a.epsilon, cfg.privacy.delta, a.mechanism, parse_bounds(a.bounds),
                        parse_categories(a.categories))
    return request, budgets


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
