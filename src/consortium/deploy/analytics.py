"""``consortium server --analyze``: the analysis of ``consortium analyze``, run with deployed sites.

The server is the same gRPC service as for training (:mod:`consortium.deploy.server`: mutual
TLS, sessions, stream limits, the audit log); it tells the sites at registration that the run
is an analysis, waits for them, then runs the two phases of :mod:`consortium.analytics.query`
as tasks (``AnalysisTask`` out, ``AnalysisResult`` back, canonical JSON of
:mod:`consortium.analytics.wire`), and writes what ``consortium analyze`` writes
(:func:`consortium.analytics.analysis.write`).

Every answer is checked before it is used (:class:`AnalysisExpectation`, called by the hub as
the upload arrives): a malformed, oversized or out-of-layout answer is refused with the reason
(in the site's Ack, the log and the audit), and the analysis goes on without that site, naming
it in ``analysis.json``'s ``sites.excluded``. A site that refuses under its own policy is
named there too.

Under secure aggregation the sites answer the describe phase with "ready" only; their sums
then travel masked through SecAgg+ (Bell et al. 2020; the server half of
:class:`~consortium.secagg.protocol.SecAggServer`, reached through the hub's exchanges as in
training), and the server decodes the one total (:func:`consortium.analytics.secure.decode`):
it never holds a site's sums. Sites with certificates sign their keys (the authenticated
variant with its consistency round, Bonawitz et al. 2017).
"""

from __future__ import annotations

import math
import sys
import time
import uuid
from collections.abc import Callable, Container, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from consortium.analytics.query import Query, Schema
from consortium.config import ExperimentConfig, load_config
from consortium.deploy.analysis_site import (
    ANALYSIS_ROUND,
    ANALYSIS_STAGE,
    MODULUS_BITS,
    analysis_context,
)
from consortium.deploy.codec import AnalysisResultEnvelope, AnalysisTaskEnvelope
from consortium.deploy.logsafe import peer_text
from consortium.deploy.validate import RejectedResult
from consortium.errors import ConfigError, DataError

__all__ = ["AnalysisExpectation", "RemoteAnalysis", "SiteRefusal", "serve_analysis"]

PROFILE_BYTES = 16 << 20
"""The largest columns or profile answer accepted (category lists of many columns)."""


@dataclass(frozen=True)
class SiteRefusal:
    """A site did not answer a task: it refused under its own policy, or failed."""

    reason: str
    refused: bool


@dataclass
class AnalysisExpectation:
    """What the server accepts as ``site``'s answer to one analysis task; :meth:`check` runs
    as the upload arrives (:meth:`Hub._deliver_analysis
    <consortium.deploy.hub.Hub._deliver_analysis>`)."""

    site: str
    task_id: str
    phase: str
    query: Query | None = None  # columns, profile
    schema: Schema | None = None  # describe
    size: int = 0  # describe under secure aggregation: the encoded vector's length
    limit: int = PROFILE_BYTES

    def check(self, upload: AnalysisResultEnvelope) -> Any:
        """The checked answer (column names, a Profile, an Answer, ``"ready"``) or a
        :class:`SiteRefusal`.

        Raises:
            RejectedResult: another phase, or a body that breaks the wire rules.
        """
        from consortium.analytics import wire

        if upload.phase != self.phase:
            raise self._rejected(f"a {peer_text(upload.phase, 40)!r} answer to a {self.phase} task")
        if upload.error is not None:
            return SiteRefusal(peer_text(upload.error, 900), upload.refused)
        try:
            data = wire.loads(upload.body, limit=self.limit,
                              what=f"site {self.site!r}'s {self.phase} answer")
            if self.phase == "columns":
                if not isinstance(data, dict) or set(data) != {"columns"}:
                    raise wire.WireError("a columns answer is {\"columns\": [names]}")
                return wire.table_names(data["columns"])
            if self.phase == "profile":
                assert self.query is not None
                return wire.profile_from_json(data, site=self.site, query=self.query)
            assert self.schema is not None
            if self.schema.query.secure:
                if data != {"ready": True, "size": self.size}:
                    raise wire.WireError(
                        f"under secure aggregation a describe answer is {{\"ready\": true, "
                        f"\"size\": {self.size}}} (the sums travel masked)")
                return "ready"
            return wire.answer_from_json(data, site=self.site, schema=self.schema)
        except wire.WireError as exc:
            raise self._rejected(str(exc)) from None

    def _rejected(self, why: str) -> RejectedResult:
        return RejectedResult(
            f"rejected {self.phase} answer from site {self.site!r} (task {self.task_id}): {why}",
            site=self.site, round=ANALYSIS_ROUND, task_id=self.task_id,
        )


def gather_answers(hub: Any, executor: Any, futures: Mapping[Any, str], task_ids: list[str], *,
                   phase: str, timeout: float, excluded: Container[str],
                   exclude: Callable[[str, str], Any], hint: str = "") -> dict[str, Any]:
    """The checked answers to one ``phase`` of analysis tasks, by site, as they arrive until
    ``timeout``: a site whose answer the checks refused, that refused or failed, that left, or
    that did not answer in time is handed to ``exclude`` with why (shared by the analytics and
    by :mod:`consortium.deploy.interpret`)."""
    out: dict[str, Any] = {}
    deadline = time.monotonic() + timeout
    for future in executor._completed(futures, deadline):
        site, value = futures[future], future.result()
        if isinstance(value, RejectedResult):
            exclude(site, f"its {phase} answer was refused: {value.reason}")
        elif isinstance(value, SiteRefusal):
            exclude(site, ("refused" if value.refused else "failed") +
                    f" the {phase}: {value.reason}")
        elif value is None:
            exclude(site, f"left before answering the {phase}")
        else:
            out[site] = value
    hub.forget(task_ids)
    for future, site in futures.items():
        if not future.done() and site not in excluded:
            exclude(site, f"no {phase} answer in {timeout:.0f} s{hint}")
    if hub.audit is not None:
        hub.audit.sync()
    return out


@dataclass
class RemoteAnalysis:
    """The server's side of one analysis with the deployed sites of ``hub``'s roster.

    Args:
        hub: the running hub (:class:`~consortium.deploy.hub.Hub`), its roster fixed.
        executor: the :class:`~consortium.deploy.hub.RemoteExecutor` whose exchanges carry the
            SecAgg+ phases and whose completion loop fails silent sites.
        cfg: the experiment (``[analysis]``, ``[secure_aggregation]``, ``privacy.delta``).
        timeout: seconds each phase waits for the sites' answers.
    """

    hub: Any
    executor: Any
    cfg: ExperimentConfig
    timeout: float = 600.0
    excluded: dict[str, str] = field(default_factory=dict)
    secure_info: dict[str, Any] = field(default_factory=dict)

    @property
    def sites(self) -> list[str]:
        return sorted(s for s in self.hub.roster or () if s not in self.excluded)

    def run(self, *, bias: bool = False) -> Any:
        """Profile, agree, describe, combine (as :func:`~consortium.analytics.analysis.run_query`
        does in process); the :class:`~consortium.analytics.analysis.Analysis`.

        Raises:
            DataError: too few sites answered, or the secure total failed.
        """
        from consortium.analytics import wire
        from consortium.analytics.analysis import dp_schema, report
        from consortium.analytics.server import agree

        cfg = self.cfg
        self.hub.answer_bytes = PROFILE_BYTES  # column lists and profiles, until the schema
        query = Query.from_config(cfg.analysis, secure=cfg.secure_aggregation.enabled)
        columns: dict[str, tuple[str, ...]] = {}
        dp = _dp_request(cfg)
        if bias or dp is not None:
            columns = self._ask("columns", wire.dumps(wire.query_to_json(query)), query=query)
        if bias:
            from consortium.analytics.bias import bias_query_for

            shared = set.intersection(*(set(c) for c in columns.values())) if columns else set()
            query = bias_query_for(query, shared, cfg)
        if dp is not None:
            query, schema = dp_schema(query, dp, columns[min(columns)] if columns else [])
            profiles = []
        else:
            answered = self._ask("profile", wire.dumps(wire.query_to_json(query)), query=query)
            profiles = [answered[s] for s in sorted(answered)]
            schema = agree(profiles, query)
        request = wire.dumps(wire.schema_to_json(schema))
        keys = wire.expected_layout(schema)
        values = sum(math.prod(shape) for _, shape in keys)
        self.hub.answer_bytes = 64 * values + (1 << 20)  # JSON floats, or the masked digits
        if query.secure:
            from consortium.analytics.secure import LIMBS

            self.hub.answer_bytes = max(self.hub.answer_bytes, 8 * LIMBS * values + (1 << 20))
            ready = self._ask("describe", request, schema=schema, size=values * LIMBS)
            answers = [self._secure_total(sorted(ready), schema)]
            sites = len(self.secure_info["contributors"])
        else:
            got = self._ask("describe", request, schema=schema)
            answers = [got[s] for s in sorted(got)]
            sites = len(answers)
        analysis = report(schema, profiles, answers, sites=sites)
        analysis.result["harmonisation"] = []  # see notes: the profile phase checks the schema
        analysis.result["notes"].append(
            "deployed sites: the cross-site schema check is the profile phase's (columns and "
            "kinds must agree); value-level harmonisation findings need `consortium analyze`"
        )
        analysis.result["sites"] = {
            "answered": sorted(self.secure_info.get("contributors", ())) if query.secure
            else [a.site for a in answers],
            "excluded": dict(sorted(self.excluded.items())),
            **({"secure_aggregation": self.secure_info} if query.secure else {}),
        }
        if bias:
            from consortium.analytics.bias import bias_report

            analysis.bias = bias_report(analysis, cfg)
        return analysis

    # -- one phase -------------------------------------------------------------------------

    def _ask(self, phase: str, request: bytes, *, query: Query | None = None,
             schema: Schema | None = None, size: int = 0) -> dict[str, Any]:
        """Send ``phase`` to every site still in; their checked answers by site. A site that
        refuses, fails, sends what the checks refuse or does not answer in time is excluded
        from the rest of the analysis (named, with why).

        Raises:
            DataError: no site (two under secure aggregation) is left to answer.
        """
        futures: dict[Any, str] = {}
        task_ids = []
        for site in self.sites:
            task_id = uuid.uuid4().hex
            expected = AnalysisExpectation(site, task_id, phase, query=query, schema=schema,
                                           size=size, limit=max(PROFILE_BYTES,
                                                                self.hub.answer_bytes))
            futures[self.hub.expect(site, ANALYSIS_ROUND, task_id, "analysis", expected)] = site
            task_ids.append(task_id)
            self.hub.send(site, AnalysisTaskEnvelope(task_id, phase, request))
        out = gather_answers(self.hub, self.executor, futures, task_ids, phase=phase,
                             timeout=self.timeout, excluded=self.excluded, exclude=self._exclude,
                             hint=" (--round-timeout)")
        least = 2 if self.cfg.secure_aggregation.enabled else 1
        if len(out) < least:
            raise DataError(
                f"{len(out)} site(s) answered the {phase} (at least {least} needed); excluded: "
                + "; ".join(f"{s}: {why}" for s, why in sorted(self.excluded.items()))
            )
        return out

    def _exclude(self, site: str, why: str) -> None:
        self.excluded[site] = why
        print(f"consortium server: site {site!r} is left out of the analysis: {why}",
              file=sys.stderr, flush=True)

    # -- the secure total ------------------------------------------------------------------

    def _secure_total(self, ready: Sequence[str], schema: Schema) -> Any:
        """SecAgg+ over the ``ready`` sites; the decoded total (the sums of the contributors).

        Raises:
            DataError: the protocol aborted, fewer than two sites contributed, or the total
                is not one honest sites could produce.
        """
        from consortium.analytics import wire
        from consortium.analytics.secure import LIMBS, decode
        from consortium.deploy.secure_total import secure_total

        keys = wire.expected_layout(schema)
        size = sum(math.prod(shape) for _, shape in keys) * LIMBS
        total_of = secure_total(
            self.hub, self.executor, self.cfg.secure_aggregation, list(ready), size=size,
            stage=ANALYSIS_STAGE, round=ANALYSIS_ROUND, context=analysis_context(self.hub.run_id),
            modulus_bits=MODULUS_BITS, what="the analysis' secure total",
        )
        self.secure_info = {
            "contributors": total_of.contributors, "dropped": total_of.dropped,
            "authenticated": total_of.authenticated,
            **({"corrupted_shares": total_of.corrupted_shares} if total_of.corrupted_shares
               else {}),
        }
        total = decode(total_of.sum, keys, len(total_of.contributors))
        try:
            wire.check_total(total, schema)
        except wire.WireError as exc:
            raise DataError(
                f"the secure total is not one honest sites could produce ({exc}); a site put "
                "values outside the honest range into its masked sums (no per-site range proofs)"
            ) from None
        return total


def _dp_request(cfg: ExperimentConfig) -> Any:
    a = cfg.analysis
    if a.epsilon <= 0:
        return None
    from consortium.analytics.analysis import DPRequest
    from consortium.analytics.dp import parse_bounds, parse_categories

    return DPRequest(a.epsilon, cfg.privacy.delta, a.mechanism, parse_bounds(a.bounds),
                     parse_categories(a.categories))


def check_analysis_config(cfg: ExperimentConfig, *, bias: bool) -> None:
    """Refuse what a deployed analysis cannot honour, before anything listens.

    Raises:
        ConfigError: the bias report under secure aggregation, training's DP, site policies
            in the server's file, or a data set analysis does not read.
    """
    from consortium.analytics.analysis import check_analysis_config

    check_analysis_config(cfg, bias=bias)
    if cfg.privacy.site_policies:
        raise ConfigError(
            "privacy.site_policies is for simulation; in a deployment each site enforces its "
            "own policy: remove it here and start each site with `consortium client --policy FILE`"
        )
    if cfg.data.dataset not in ("heart-disease", "csv", "parquet"):
        raise ConfigError(
            f"an analysis reads tables; data.dataset = {cfg.data.dataset!r} is generated "
            "features. Use heart-disease, csv or parquet"
        )


def serve_analysis(
    config: str | Path | None,
    *,
    listen: str,
    certs: str | Path | None,
    out: str | Path,
    bias: bool = False,
    min_sites: int | None = None,
    overrides: Sequence[str] = (),
    register_timeout: float = 300.0,
    round_timeout: float = 600.0,
    heartbeat_s: int = 30,
    stream_idle_timeout: float = 30.0,
    stream_min_rate: float = 16 * 1024,
    on_listening: Callable[[int], None] | None = None,
) -> Any:
    """Run ``config``'s ``[analysis]`` with the sites that connect; write ``analysis.json``,
    ``table1.csv``, ``analysis.html`` (and ``bias.json``, ``bias.html`` with ``bias``),
    ``config.toml`` and ``audit.jsonl`` into ``out``; return the
    :class:`~consortium.analytics.analysis.Analysis`.

    The flags are :func:`~consortium.deploy.server.serve`'s: ``certs`` None is ``--insecure``;
    the server waits for every provisioned, unrevoked site (``--min-sites N``: that many);
    ``round_timeout`` is how long each phase waits for the sites.

    Raises:
        ConfigError: see :func:`check_analysis_config`.
        SitesMissingError: the sites did not all come within ``register_timeout``.
        DataError: too few sites answered, or the secure total failed.
    """
    import torch

    from consortium.analytics.analysis import write
    from consortium.deploy.audit import AUDIT_FILENAME, AuditLog
    from consortium.deploy.hub import RemoteExecutor
    from consortium.deploy.receipts import HeadSigner
    from consortium.deploy.server import (
        MAX_RESULT_BYTES,
        StreamLimits,
        _announce_ready,
        _raise_file_limit,
        _ServerThread,
        _waiting_for,
        sites_to_wait_for,
        tune_malloc,
    )

    limits = StreamLimits(idle_timeout_s=stream_idle_timeout, min_rate=stream_min_rate)
    if not heartbeat_s >= 1:
        raise ConfigError(f"--heartbeat {heartbeat_s}: give the seconds between site heartbeats (>= 1)")
    cfg = load_config(config, list(overrides))
    check_analysis_config(cfg, bias=bias)
    if cfg.secure_aggregation.enabled:
        from consortium.secagg.floor import SecAggFloor

        floor = SecAggFloor()
        if cfg.secure_aggregation.threshold < floor.min_threshold:
            print(f"consortium server: WARNING secure_aggregation.threshold = "
                  f"{cfg.secure_aggregation.threshold:g} is below {floor.min_threshold:.3g}, the "
                  "least sites accept by default against a malicious server: they will refuse "
                  "the secure total; set secure_aggregation.threshold = 0.67", file=sys.stderr)
    if certs is None:
        print("consortium server: WARNING --insecure: no TLS, no authentication; any process "
              "that reaches the port can claim to be any site. Local experiments only.",
              file=sys.stderr)
    torch.set_num_threads(1)
    tune_malloc()
    run_dir = Path(out)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_text(cfg.to_toml())
    wait_for = sites_to_wait_for(cfg, min_sites=min_sites, certs=certs)
    _raise_file_limit(wait_for if isinstance(wait_for, int) else len(wait_for))
    audit = AuditLog(run_dir / AUDIT_FILENAME, recover=True, fsync=False)
    signer = HeadSigner.from_certs(certs) if certs else None
    thread = _ServerThread(listen, certs=Path(certs) if certs else None, hub_args={
        "config_toml": cfg.to_toml(), "run_id": f"{run_dir.name}-{uuid.uuid4().hex[:8]}",
        "registry": None, "max_result_bytes": MAX_RESULT_BYTES, "audit": audit,
        "summaries_expected": 0, "signer": signer, "purpose": "analysis",
        "open_roster": False,  # an analysis's phases ask the sites that started it
    }, heartbeat_s=heartbeat_s, limits=limits)
    hub = thread.start()
    audit.append("run", run_id=hub.run_id, resumed=False, signed=signer is not None,
                 purpose="analysis")
    finished = "the analysis stopped at the server (its log says why)"
    try:
        if on_listening is not None:
            on_listening(thread.port)
        print(f"consortium server: listening on {listen} (port {thread.port}); analysis; "
              f"waiting for {_waiting_for(wait_for)}", file=sys.stderr, flush=True)
        sites = hub.wait_for_sites(wait_for, register_timeout, on_ready=_announce_ready)
        hub.fix_roster(sites)
        print(f"consortium server: sites {sorted(sites)} ready; analysing", file=sys.stderr,
              flush=True)
        executor = RemoteExecutor(hub, round_timeout=round_timeout, phase_timeout=round_timeout,
                                  silence_s=3 * heartbeat_s)
        analysis = RemoteAnalysis(hub, executor, cfg, timeout=round_timeout).run(bias=bias)
        write(analysis, run_dir)
        audit.append("analysis", sites=analysis.result["sites"]["answered"],
                     excluded=sorted(analysis.result["sites"]["excluded"]))
        finished = "the analysis is complete"
        return analysis
    finally:
        hub.finish_all(finished)
        time.sleep(0.5)  # let the sites pull their Finished
        thread.stop()
        hub.flush_rejections(final=True)
        audit.close()
