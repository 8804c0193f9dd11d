"""A deployed site's side of a federated analysis: it answers the server's analysis tasks with
its own raw table, under its own rules, whatever the server asks.

``consortium client`` joins a run whose server says ``purpose = "analysis"`` (``consortium
server --analyze``) with an :class:`AnalysisSite` instead of a training client. Per task (the
phases of :mod:`consortium.analytics.query`: ``columns``, ``profile``, ``describe``) the site

- reads the request as checked plain data (:mod:`consortium.analytics.wire`; never code);
- enforces its own rules before computing anything: the larger of its policy's ``min_count``
  and the query's; the protections of the experiment its operator approved (secure
  aggregation, differential privacy at the approved ε, the public bounds and categories) and
  those its policy requires; a ``where`` filter that parses (:mod:`consortium.analytics.expr`)
  and names only columns it has;
- under DP computes the noise plan itself (:func:`~consortium.analytics.dp.plan_noise` from the
  approved ε and its own reading of the schema) and charges its own ledger
  (``<state>/analytics_ledger.json``) against its own policy's ``max_epsilon``, never a budget
  the server names; the noise comes from its OS CSPRNG;
- under secure aggregation encodes its sums (:func:`~consortium.analytics.secure.encode`) and
  sends them only masked, in the SecAgg+ phases (Bell et al. 2020) that follow, signing with
  its provisioned identity when it has one (the authenticated variant, Bonawitz et al. 2017);
- sends back a refusal whose reason carries no row value or small count: a disclosure refusal,
  a filter that fails on the data, or any unexpected error is logged here in full and told to
  the server in general words.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from consortium.analytics.query import Query, Schema
from consortium.config import ExperimentConfig
from consortium.data._tables import Table
from consortium.deploy.codec import AnalysisResultEnvelope, AnalysisTaskEnvelope
from consortium.errors import ConsortiumError, PipelineError

__all__ = [
    "ANALYSIS_ROUND", "ANALYSIS_STAGE", "AnalysisSite", "analysis_context", "analysis_manifest",
    "analysis_manifest_hash", "analysis_site", "format_analysis_manifest", "ready_info",
    "review_analysis",
]

log = logging.getLogger("consortium.client")

ANALYSIS_STAGE = "analytics"
"""The stage name of the secure-aggregation exchanges of an analysis."""
ANALYSIS_ROUND = 1
"""The round of an analysis' tasks and of its one secure-aggregation round."""
PHASES = ("columns", "profile", "describe")
LEDGER_FILENAME = "analytics_ledger.json"
"""The site's analytics privacy ledger in its state folder (one file for every run)."""
MAX_REQUEST_BYTES = 64 << 20
"""The largest analysis request a site reads."""
MODULUS_BITS = 32
MAX_REASON_CHARS = 900
"""A refusal's reason is cut to this (the wire refuses ids and errors over 1,024 characters)."""


def analysis_context(run_id: str) -> bytes:
    """The SecAgg context of an analysis of run ``run_id``: binds its keys, masks and
    signatures to that run, apart from training's (``consortium.secagg.stage.secagg_context``)."""
    return b"consortium/analytics/v1/" + run_id.encode()


# ------------------------------------------------------------------------------- approval


def analysis_manifest(cfg: ExperimentConfig) -> dict[str, Any]:
    """What an analysis run asks of a site, as plain data: the ``[analysis]`` section (the
    ledger path aside: it is each party's own), the data set, the protections and what leaves
    the site. Its hash (:func:`analysis_manifest_hash`) is what an operator approves
    (``consortium manifest EXPERIMENT.toml --analyze``; ``consortium client --approve``)."""
    analysis = {k: (list(v) if isinstance(v, tuple) else v)
                for k, v in asdict(cfg.analysis).items() if k != "ledger"}
    sa = cfg.secure_aggregation
    return {
        "format": 1,
        "purpose": "analysis",
        "name": cfg.name,
        "data": {"dataset": cfg.data.dataset, "target": cfg.data.target},
        "analysis": analysis,
        "privacy": {"delta": cfg.privacy.delta},
        "secure_aggregation": {"enabled": sa.enabled, "threshold": sa.threshold,
                               "neighbours": sa.neighbours},
        "leaves_site": analysis_leaves_site(cfg),
    }


def analysis_leaves_site(cfg: ExperimentConfig) -> list[str]:
    """What leaves the site in an analysis, in words an operator can check."""
    a, secure = cfg.analysis, cfg.secure_aggregation.enabled
    if a.epsilon > 0:
        return [
            "its column names (to order the query's columns)",
            f"per query, its sums over the public schema (analysis.bounds, analysis.categories) "
            f"with {a.mechanism} noise for ε = {a.epsilon:g} added by the site from its own "
            "randomness, charged to its own ledger"
            + ("; only masked, the server learning the total across sites (secure aggregation)"
               if secure else ""),
        ]
    profile = ("per query, per column: whether it holds numbers or few integer codes, the "
               "categories held at least min_count times and a coarsened range (the "
               "min_count-th smallest and largest value, two significant digits)")
    if secure:
        return [profile + "; no row count",
                "its sums over the agreed schema, only masked (secure aggregation): the server "
                "learns the total across sites, in which small totals are withheld"]
    return [profile + "; the cohort's size when at least min_count",
            "its sums over the agreed schema, each count below min_count withheld"]


def analysis_manifest_hash(cfg: ExperimentConfig) -> str:
    """SHA-256 of :func:`analysis_manifest` as canonical JSON (as training's manifests)."""
    from consortium.client.approval import manifest_hash

    return manifest_hash(analysis_manifest(cfg))


def format_analysis_manifest(manifest: dict[str, Any]) -> str:
    """The analysis manifest for a person to read, with its hash on the last line."""
    from consortium.client.approval import manifest_hash

    lines = [f"analysis {manifest['name']!r} of data set {manifest['data']['dataset']!r}"]
    for key in ("analysis", "privacy", "secure_aggregation"):
        values = ", ".join(f"{k}={v}" for k, v in manifest[key].items())
        lines.append(f"  {key}: {values}")
    lines.append("  what leaves the site:")
    lines += [f"    - {item}" for item in manifest["leaves_site"]]
    lines.append(f"manifest sha256: {manifest_hash(manifest)}")
    return "\n".join(lines)


def review_analysis(
    cfg: ExperimentConfig, policy: Any, *, approved: Collection[str] = (), can_sign: bool = False,
) -> str | None:
    """Why this site refuses to take part in the analysis ``cfg``, or ``None`` if it does.

    The policy's ``require_dp`` asks for ``analysis.epsilon > 0``, ``require_secure_aggregation``
    for ``secure_aggregation.enabled``, ``min_sites`` for secure aggregation with certificates
    (the peers are counted from their signed keys); then the operator must have approved the
    analysis manifest's hash (``--approve``, the policy's ``approve``, or ``approve =
    "matching"``)."""
    from consortium.privacy.policy import SitePolicy

    rules = policy or SitePolicy()
    if rules.require_dp and not cfg.analysis.epsilon > 0:
        return ("this site's policy requires differential privacy and the analysis has none "
                "(analysis.epsilon = 0)")
    if rules.require_secure_aggregation and not cfg.secure_aggregation.enabled:
        return "this site's policy requires secure aggregation and the analysis does not use it"
    if rules.min_sites and not (cfg.secure_aggregation.enabled and can_sign):
        return (f"this site's policy requires at least {rules.min_sites} other sites in every "
                "total, which a site can count only from its peers' signed keys in secure "
                "aggregation: the analysis needs secure_aggregation.enabled = true and the site "
                "its provisioned certificate (--certs)")
    digest = analysis_manifest_hash(cfg)
    if digest in set(approved) or rules.approve == "matching" or digest in set(rules.approve):
        return None
    return (
        f"this site has not approved analysis {cfg.name!r} (manifest sha256 {digest}). Review "
        "what it asks with `consortium manifest EXPERIMENT.toml --analyze`, then start the "
        f"site with --approve {digest}, or list the hash under approve in the site policy"
    )


# ------------------------------------------------------------------------------------ the site


class Refusal(ConsortiumError):
    """The site refuses a task under its own rules; the message goes to the server as it is
    (it names rules and columns, never a row value)."""


class AnalysisSite:
    """One site's answers to analysis tasks (see the module docstring).

    Args:
        site: the site's name (its provisioned identity).
        cfg: the experiment the server sent, which the operator approved.
        table: the site's raw table (harmonised), read once.
        run_id: the run; binds the secure-aggregation round.
        policy: the site's :class:`~consortium.privacy.policy.SitePolicy` (None: defaults).
        state_dir: where its analytics ledger lives; None: it refuses DP queries.
        identity: its :class:`~consortium.secagg.identity.SiteIdentity` (None: unsigned SecAgg).
        floor: its :class:`~consortium.secagg.floor.SecAggFloor`.
    """

    def __init__(
        self, *, site: str, cfg: ExperimentConfig, table: Table, run_id: str, policy: Any = None,
        state_dir: Path | None = None, identity: Any = None, floor: Any = None,
    ) -> None:
        from consortium.privacy.policy import SitePolicy

        self.site = site
        self.cfg = cfg
        self.table = table
        self.run_id = run_id
        self.policy = policy if policy is not None else SitePolicy()
        self.state_dir = state_dir
        self.identity = identity
        self.floor = floor
        from consortium.deploy.secure_total import SecureTotalSite

        # one secure total per run: a masked input left this site, never a second one
        self._total = SecureTotalSite(
            site, stage=ANALYSIS_STAGE, round=ANALYSIS_ROUND, context=analysis_context(run_id),
            modulus_bits=MODULUS_BITS, what="an analysis' secure total", identity=identity,
            floor=floor,
        )

    # -- tasks -----------------------------------------------------------------------------

    def answer(self, task: AnalysisTaskEnvelope) -> AnalysisResultEnvelope:
        """The site's answer to ``task``: its body, or a refusal with a reason safe to send."""
        from consortium.analytics import wire
        from consortium.analytics.dp import BudgetError
        from consortium.analytics.site import DisclosureError

        try:
            if task.phase not in PHASES:
                raise Refusal(f"unknown analysis phase {task.phase[:40]!r}; expected one of "
                              f"{', '.join(PHASES)}")
            data = wire.loads(task.request, limit=MAX_REQUEST_BYTES,
                              what=f"the server's {task.phase} request")
            body = getattr(self, f"_{task.phase}")(data)
            return AnalysisResultEnvelope(task.task_id, task.phase, wire.dumps(body))
        except (Refusal, wire.WireError, BudgetError) as exc:
            log.warning("refused the %s: %s", task.phase, exc)
            reason, refused = str(exc), True
        except DisclosureError as exc:  # its message names the small count: it stays here
            log.warning("refused the %s: %s", task.phase, exc)
            reason, refused = (
                f"site {self.site!r} refuses the query: a count falls below its min_count "
                "and the query asks to refuse rather than suppress (suppress = \"refuse\")"), True
        except ConsortiumError as exc:
            log.warning("could not answer the %s: %s", task.phase, exc)
            reason, refused = (
                f"site {self.site!r} could not answer the {task.phase}: {type(exc).__name__} "
                "on its data (the details stay in the site's log)"), False
        except Exception:
            log.exception("answering the %s failed", task.phase)
            reason, refused = (f"site {self.site!r} could not answer the {task.phase} (an "
                               "unexpected error; the details stay in the site's log)"), False
        return AnalysisResultEnvelope(task.task_id, task.phase, error=reason[:MAX_REASON_CHARS],
                                      refused=refused)

    def _columns(self, data: Any) -> dict[str, Any]:
        from consortium.analytics import wire

        query = self._query(wire.query_from_json(data), names_only=True)
        return {"columns": list(self._data(query).names)}

    def _profile(self, data: Any) -> dict[str, Any]:
        from consortium.analytics import wire
        from consortium.analytics.site import profile

        query = self._query(wire.query_from_json(data))
        if query.dp is not None or self.cfg.analysis.epsilon > 0:
            raise Refusal(
                f"site {self.site!r} refuses the profile: under differential privacy the schema "
                "is the public declaration and no profile (data-dependent facts outside the "
                "noise) leaves the site"
            )
        return wire.profile_to_json(profile(self._data(query)))

    def _describe(self, data: Any) -> dict[str, Any]:
        from consortium.analytics import secure, wire
        from consortium.analytics.site import describe

        schema = wire.schema_from_json(data)
        query = self._query(schema.query)
        schema = self._checked_schema(replace(schema, query=query))
        query = schema.query
        budget = self._budget() if query.dp is not None else None
        answer = describe(self._data(query, budget=budget), schema)
        if not query.secure:
            return wire.answer_to_json(answer)
        keys = secure.layout(answer)
        if keys != wire.expected_layout(schema):  # our own invariant: the server decodes by it
            raise PipelineError("this site's answer does not have the layout its schema implies")
        if self._total.masked:
            raise Refusal(f"site {self.site!r} refuses a second secure total in run "
                          f"{self.run_id!r}: two totals over different sites would reveal its sums")
        vector = secure.encode(answer, keys)
        self._total.load(vector)
        return {"ready": True, "size": int(vector.numel())}

    # -- the site's own rules --------------------------------------------------------------

    def _query(self, query: Query, *, names_only: bool = False) -> Query:
        """``query`` under this site's rules (see the module docstring), or :class:`Refusal`.
        ``names_only``: the ``columns`` phase, which releases column names alone (no
        protection of the sums is at stake)."""
        from consortium.analytics.expr import parse

        if not names_only:
            self._protections(query)
        if query.where:
            try:
                expr = parse(query.where)
            except ConsortiumError as exc:  # the server's own text: safe to quote
                raise Refusal(f"site {self.site!r} refuses the query's filter: {exc}") from None
            unknown = sorted(expr.columns - set(self._names(query)))
            if unknown:
                raise Refusal(f"site {self.site!r} has no column {unknown[0]!r} for the query's "
                              "filter; harmonise the names with a [rename] table in harmonize.toml")
        names = set(self._names(query))
        for name in (*query.columns, *query.needed()):
            if name not in names:
                raise Refusal(f"site {self.site!r} has no column {name!r}; harmonise the names "
                              "with a [rename] table in harmonize.toml, or ask for other columns")
        return replace(query, min_count=max(query.min_count, self.policy.min_count))

    def _protections(self, query: Query) -> None:
        """Refuse a query weaker than the approved analysis or this site's policy."""
        approved = self.cfg
        if (approved.secure_aggregation.enabled or self.policy.require_secure_aggregation) \
                and not query.secure:
            raise Refusal(f"site {self.site!r} refuses a query without secure aggregation: "
                          "the analysis it approved (or its policy) requires it")
        if query.dp is None and (approved.analysis.epsilon > 0 or self.policy.require_dp):
            raise Refusal(f"site {self.site!r} refuses a query without differential privacy: "
                          "the analysis it approved (or its policy) requires it")
        if query.dp is not None and not approved.analysis.epsilon > 0:
            raise Refusal(f"site {self.site!r} refuses differential privacy the approved "
                          "analysis does not declare (analysis.epsilon = 0)")

    def _names(self, query: Query) -> list[str]:
        """The site's columns, with the query's derived band columns."""
        for column, _ in query.bands:
            if column not in self.table.columns:
                raise Refusal(f"site {self.site!r} has no column {column!r} to band")
        return [*self.table.names, *(f"{c}_band" for c, _ in query.bands)]

    def _checked_schema(self, schema: Schema) -> Schema:
        """Under DP: the schema must be the approved public declaration, and the noise the
        site's own plan for the approved ε (the server's plan is only compared)."""
        q = schema.query
        if q.dp is None:
            return schema
        from consortium.analytics import dp as dpm

        a = self.cfg.analysis
        declared = dpm.declared_schema(replace(q, dp=None), dpm.parse_bounds(a.bounds),
                                       dpm.parse_categories(a.categories), list(q.columns))
        if dict(declared.columns) != dict(schema.columns) or declared.groups != schema.groups:
            raise Refusal(f"site {self.site!r} refuses the schema: under differential privacy "
                          "it must be the approved public declaration (analysis.bounds, "
                          "analysis.categories)")
        plan = dpm.plan_noise(schema, list(q.columns), epsilon=a.epsilon,
                              delta=self.cfg.privacy.delta, mechanism=a.mechanism)
        if plan != q.dp:
            raise Refusal(
                f"site {self.site!r} refuses the noise plan: it computes {plan.mechanism} noise "
                f"for ε = {plan.epsilon:g} over {plan.statistics} statistics per row "
                f"(multiplier {plan.noise_multiplier:.6g}), the server asks "
                f"{q.dp.mechanism} for ε = {q.dp.epsilon:g} over {q.dp.statistics} "
                f"(multiplier {q.dp.noise_multiplier:.6g})"
            )
        return replace(schema, query=replace(q, dp=plan))

    def _budget(self) -> Any:
        from consortium.analytics.dp import Budget

        if self.state_dir is None:
            raise Refusal(f"site {self.site!r} answers a DP query only with a ledger of its "
                          "releases: start it with --state DIR")
        return Budget(self.site, self.policy.max_epsilon, self.policy.delta,
                      self.state_dir / LEDGER_FILENAME)

    def _data(self, query: Query, *, budget: Any = None) -> Any:
        from consortium.analytics.site import SiteData

        return SiteData(self.table, query, budget=budget)

    # -- secure aggregation ----------------------------------------------------------------

    def respond(self, stage: str, phase: str, message: Any, *, round: int) -> Any:
        """The site's side of one SecAgg+ phase of the analysis' secure total
        (:meth:`SecureTotalSite.respond <consortium.deploy.secure_total.SecureTotalSite.respond>`)."""
        return self._total.respond(stage, phase, message, round=round)


def analysis_site(
    cfg: ExperimentConfig, *, site: str, data: Path, run_id: str, policy: Any,
    state_dir: Path | None, identity: Any, floor: Any, harmonize: Any = None,
) -> AnalysisSite:
    """The site's :class:`AnalysisSite` for ``cfg``: its file read now (a bad file fails before
    the site says it is ready)."""
    from consortium.analytics.sources import site_table

    table = site_table(cfg.data, data, site, harmonize)
    log.info("analysis: %s holds %d columns (%d rows stay here)", site, len(table.names),
             table.rows)
    return AnalysisSite(site=site, cfg=cfg, table=table, run_id=run_id, policy=policy,
                        state_dir=state_dir, identity=identity, floor=floor)



def ready_info() -> Any:
    """What an analysis site tells the server's ``Describe``: that it is ready, declaring no
    sizes (a one-feature shape, two classes and no examples: nothing about its data)."""
    from consortium.deploy.proto import consortium_pb2 as pb

    return pb.SiteInfo(input_shape=[1], num_classes=2, num_train=0, num_test=0)
