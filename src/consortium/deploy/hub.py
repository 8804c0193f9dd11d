"""Where the gRPC service (an asyncio loop in its own thread) meets the round loop (the main thread).

The round loop is the simulation's, unchanged; its executor (:class:`RemoteExecutor`) hands
work to the :class:`Hub`, which queues it for the site's next ``PullTask``, and waits on futures
that ``PushResult`` / ``Exchange`` complete after validation. Everything crossing threads goes
through ``loop.call_soon_threadsafe`` (towards the service) or ``concurrent.futures.Future``
(towards the round loop).
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import dataclasses
import logging
import math
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from consortium.deploy.audit import AuditHead, AuditLog, update_digest
from consortium.deploy.codec import (
    AnalysisResultEnvelope,
    DecodeError,
    EvaluationEnvelope,
    ExchangeEnvelope,
    Finished,
    ResultEnvelope,
    TaskEnvelope,
    Wait,
)
from consortium.deploy.logsafe import MAX_REASON_CHARS, RejectionLimiter, peer_text
from consortium.deploy.shared import expand, shared_layout
from consortium.deploy.validate import (
    DEFAULT_MAX_WEIGHT,
    ExpectedTask,
    RejectedResult,
    update_norm_cap,
    validate_evaluation,
    validate_result,
)
from consortium.errors import ConsortiumError, RoundAborted
from consortium.messages import EvaluationResult, Result, Task
from consortium.types import Layout

__all__ = ["Hub", "RemoteExecutor", "SiteInfo", "SitesMissingError"]

log = logging.getLogger("consortium.server")

PRE_LAYOUT_UPLOAD_BYTES = 1 << 20
"""The largest upload accepted before the model's layout is known (no task sent yet)."""

MAX_REJECTIONS_KEPT = 1000
"""Rejection lines kept in memory for the operator's round report (the oldest go first)."""


class SitesMissingError(ConsortiumError, TimeoutError):
    """Too few sites registered and described their data before the register timeout."""


@dataclass(frozen=True)
class SiteInfo:
    """What a site told the server about its data (shapes and sizes, never the data)."""

    input_shape: tuple[int, ...]
    num_classes: int
    num_train: int
    num_test: int


def _describe(info: SiteInfo) -> str:
    return (f"{info.num_train} training and {info.num_test} test examples of shape "
            f"{list(info.input_shape)} in {info.num_classes} classes")


@dataclass
class _Site:
    name: str
    session: str
    queue: asyncio.Queue[Any]
    info: SiteInfo | None = None
    last_seen: float = field(default_factory=time.monotonic)
    pulling: int = 0  # pulls waiting for work now (a site waiting here is online)


@dataclass(frozen=True)
class _Expelled:
    """Put in an expelled site's queue: its waiting pull ends with ``reason``."""

    reason: str


@dataclass
class _Pending:
    site: str
    round: int
    kind: str  # "train", "evaluate" or "analysis"
    future: cf.Future[Any]
    expected: Any  # an ExpectedTask; an analysis task's: an object with check(upload)


class Hub:
    """Registered sites, their work queues, and the tasks and exchanges awaiting an answer.

    Args:
        loop: the event loop the gRPC service runs in.
        config_toml: the experiment, sent to every site at registration.
        run_id: names the run in replies and logs.
        max_result_bytes: the largest upload accepted before the model's layout is known; then
            :meth:`upload_limit` (a few times the model's size) applies.
        audit: the run's hash-chained audit log (every task, result and rejection).
        summaries_expected: how many sites' data summaries make the merged encoding.
        registry: a checkpointed :meth:`registry` to resume with (its roster and encoding).
        signer: the server's key (:class:`~consortium.deploy.receipts.HeadSigner`): every task
            carries the audit log's head signed with it; None (``--insecure``): unsigned.
        purpose: ``""`` (training) or ``"analysis"`` (``consortium server --analyze``), told to
            every site at registration.
        secure_encoding: the sites' summary sums travel through SecAgg+
            (:mod:`consortium.deploy.secure_encoding`): once every expected clear summary is in,
            ``summaries_in`` is set instead of merging, and the driver's
            :meth:`finish_secure_merge` fixes the encoding.
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, *, config_toml: str, run_id: str,
        max_result_bytes: int, audit: AuditLog | None = None, summaries_expected: int = 0,
        registry: Mapping[str, Any] | None = None, signer: Any = None, purpose: str = "",
        secure_encoding: bool = False, open_roster: bool = True,
    ) -> None:
        self.loop = loop
        # sites that come and go (deploy/roster.py): a site that describes its data after the
        # roster is fixed waits in ``joining`` until the round loop admits it; with
        # ``open_roster`` False (``consortium server --closed-roster``) it is refused
        self.open_roster = open_roster
        self.joining: dict[str, SiteInfo] = {}
        self.closed_reason = ""  # why this experiment admits no late site ("": it does)
        self.joined: dict[str, int] = {}  # site -> the round from which it was sampled
        # a site neither waiting for work nor heard from for this long is offline (serve sets
        # three heartbeats; inf: every registered site counts as online, as before)
        self.offline_after_s = math.inf
        self.secure_encoding = secure_encoding
        self.summaries_in = threading.Event()  # secure_encoding: every expected summary is in
        self.purpose = purpose
        # the largest analysis answer due (set by the analysis driver); 0: none
        self.answer_bytes = 0
        self.config_toml = config_toml
        self.run_id = run_id
        self.max_result_bytes = max_result_bytes
        self.audit = audit
        self.signer = signer
        self.layout: Layout | None = None
        self._lock = threading.Lock()
        self._sites: dict[str, _Site] = {}
        self._sessions: dict[str, str] = {}
        self._pending: dict[str, _Pending] = {}
        self._exchanges: dict[tuple[str, str, str, int], cf.Future[Any]] = {}
        self._seen: set[str] = set()
        # per-client downlink compression: each open task's whole-model form, sent instead
        # when its site cannot rebuild the model from its reference (see deliver)
        self._full: dict[str, TaskEnvelope] = {}
        self._resent_bytes = 0  # the whole models sent so, not yet in a round's bytes_down
        self._described = threading.Condition(self._lock)
        # the latest rejections written in full, for the round report; bounded, as a site can
        # send garbage for as long as the run lasts (rejected_total counts them all)
        self.rejected: deque[str] = deque(maxlen=MAX_REJECTIONS_KEPT)
        self.rejected_total = 0
        self.rejected_logged = 0  # how many were written in full (appended to rejected)
        self.rejections = RejectionLimiter()
        self.summaries_expected = summaries_expected
        self._summaries: dict[str, Any] = {}
        self._summary_rows: dict[str, int] = {}  # site -> the most values its summary counts
        # sites excluded for their data statistics whom the merge or the start waited for:
        # the run starts with that many fewer (see _exclude)
        self.excluded: dict[str, str] = {}
        self.merged: Any = None  # the merged SiteSummary once every expected site sent its own
        self.schema: Any = None  # the merged TableSchema (sites reading their own table files)
        self.merge_error: str | None = None  # why the merged summary cannot be used
        # columns whose codes may differ between sites ([check] allow of data.harmonize)
        from consortium.deploy.summary import harmonize_allow

        self.allow_codes = harmonize_allow(config_toml)
        # the run's sites, fixed when round 1 starts (or restored from the checkpoint); None
        # before. A site outside it is refused; one inside must describe the same data again.
        self.roster: dict[str, SiteInfo] | None = None
        self.counts: dict[str, dict[str, int]] = {}  # site -> results / rejected / last_round
        self.expelled: dict[str, str] = {}  # site -> why (revoked during the run)
        self._expelled_sessions: dict[str, str] = {}  # an expelled site's last session -> why
        if registry is not None:
            self.restore(registry)

    # -- the service's side (event-loop thread) --------------------------------------------------

    def register(self, site: str) -> str:
        """A new session for ``site`` (a restarted client gets a fresh one; the old is dropped).

        Raises:
            PermissionError: the site was expelled from this run.
        """
        if site in self.expelled:
            raise PermissionError(self.expelled[site])
        session = uuid.uuid4().hex
        with self._lock:
            old = self._sites.get(site)
            if old is not None:
                self._sessions.pop(old.session, None)
            self._sites[site] = _Site(site, session, asyncio.Queue())
            self._sessions[session] = site
            self._described.notify_all()  # the start's progress line
        if old is not None:  # its queue and whatever it was working on are gone with it
            self._fail_open(site, f"site {site!r} registered again (restarted or reconnected) "
                                  "during the round; the task it held was lost")
        self._log("register", site=site)
        log.info("site %r registered", site)
        return session

    def describe(self, session: str, info: SiteInfo) -> str | None:
        """Record the site's data description; why it is refused, or None if accepted.

        Once the run has its roster, a site must be on it and describe the data it described
        when the run started (a resumed run must train on the same sites and sizes). A site
        whose data summary counted more values in a column than the training examples it now
        declares lied in one of them: it is excluded (:meth:`_exclude`)."""
        with self._described:
            site = self._site_of(session)
            rows = self._summary_rows.get(site.name, 0)
        if rows > info.num_train:
            return self._exclude(site.name, (
                f"site {site.name!r} is excluded from the run: its data summary counts {rows} "
                f"values in a column, but it declares {info.num_train} training examples"))
        with self._described:
            if self.roster is not None:
                known = self.roster.get(site.name)
                if known is None:
                    from consortium.deploy.roster import late_refusal

                    why = late_refusal(site.name, info, self.roster, open_roster=self.open_roster,
                                       why_closed=self.closed_reason)
                    if why is not None:
                        self._log("refused_join", site=site.name, reason=why)
                        return why
                    self.joining[site.name] = info  # admitted by the round loop (roster.py)
                    known = info
                if known != info:
                    return (f"site {site.name!r} now describes {_describe(info)}, but the run "
                            f"started with {_describe(known)}: its data changed; restore it or "
                            "start a new run")
            site.info = info
            log.info("site %r: %d training, %d test examples", site.name, info.num_train,
                     info.num_test)  # before the round loop hears of it
            self._described.notify_all()
        return None

    def fix_roster(self, sites: Mapping[str, SiteInfo]) -> None:
        """The run's sites from now on (called when round 1 starts)."""
        with self._lock:
            self.roster = dict(sites)
            for name in self.roster:
                self.counts.setdefault(name, {"results": 0, "rejected": 0, "last_round": 0})

    def registry(self) -> dict[str, Any]:
        """The site registry as JSON, saved in every checkpoint: the roster with each site's
        description and counts, and the merged data encoding (a resumed run reuses both)."""
        import base64

        from consortium.deploy.summary import summary_to_pb

        with self._lock:
            sites = {
                name: {"input_shape": list(info.input_shape), "num_classes": info.num_classes,
                       "num_train": info.num_train, "num_test": info.num_test,
                       **self.counts.get(name, {}),
                       **({"joined": self.joined[name]} if name in self.joined else {})}
                for name, info in sorted((self.roster or {}).items())
            }
            encoding = None
            if self.merged is not None:
                raw = summary_to_pb(self.merged, schema=self.schema).SerializeToString()
                encoding = base64.b64encode(raw).decode("ascii")
        return {"format": 1, "run_id": self.run_id, "sites": sites, "encoding": encoding}

    def restore(self, registry: Mapping[str, Any]) -> None:
        """Take back a checkpointed :meth:`registry` (``--resume``).

        Raises:
            CheckpointError: a registry this version cannot read.
        """
        import base64

        from consortium.deploy.proto import consortium_pb2 as pb
        from consortium.deploy.summary import schema_from_pb, summary_from_pb
        from consortium.errors import CheckpointError

        if registry.get("format") != 1:
            raise CheckpointError(f"unknown site registry format {registry.get('format')!r}")
        try:
            roster = {
                str(name): SiteInfo(tuple(int(v) for v in e["input_shape"]), int(e["num_classes"]),
                                    int(e["num_train"]), int(e["num_test"]))
                for name, e in registry["sites"].items()
            }
            counts = {str(name): {k: int(e.get(k, 0)) for k in ("results", "rejected", "last_round")}
                      for name, e in registry["sites"].items()}
            joined = {str(name): int(e["joined"]) for name, e in registry["sites"].items()
                      if "joined" in e}
            merged = schema = None
            if registry.get("encoding"):
                msg = pb.DataSummary.FromString(base64.b64decode(registry["encoding"]))
                merged, schema = summary_from_pb(msg), schema_from_pb(msg)
        except (KeyError, TypeError, ValueError, AttributeError, DecodeError) as exc:
            raise CheckpointError(f"the checkpoint's site registry is damaged: {exc}") from exc
        with self._lock:
            self.roster, self.counts = roster, counts
            self.joined = joined
            self.merged, self.schema = merged, schema
            self.run_id = str(registry.get("run_id") or self.run_id)

    def _count(self, site: str, key: str, rnd: int) -> None:
        with self._lock:
            entry = self.counts.setdefault(site, {"results": 0, "rejected": 0, "last_round": 0})
            entry[key] += 1
            if key == "results":
                entry["last_round"] = max(entry["last_round"], rnd)

    def submit_summary(self, session: str, summary: Any, schema: Any = None) -> str | None:
        """A site's data summary (and its table's schema, for a site's own file); once
        ``summaries_expected`` sites sent theirs, merge them in site-name order (the
        simulation's order). Returns why the site's summary is refused, or None.

        A summary that cannot describe real rows (:func:`~consortium.deploy.summary.
        implausible_summary`: sums of 1e300, a negative variance ...) excludes its site from
        the run (:meth:`_exclude`): the others merge without it and start without it.
        """
        from consortium.deploy.summary import coding_error, implausible_summary, merge_schemas
        from consortium.errors import DataError

        site = self.site_of(session)
        with self._lock:
            first = next(iter(self._summaries.values()), None)
            if first is None and self.merged is not None:  # a late site after --resume
                first = self.merged
        why = implausible_summary(summary, schema=schema)
        if why is None and first is not None and len(first.categories) != len(summary.categories):
            why = (f"its data summary has {len(summary.categories)} columns, the others' "
                   f"{len(first.categories)}")
        if why is not None:
            return self._exclude(site, f"site {site!r} is excluded from the run: {why}")
        with self._lock:
            if (schema is None) != (self.schema is None) and self._summaries:
                return (f"site {site!r} sent a {'table' if schema else 'built-in'} data "
                        "summary, the others did not; every site must read the same data set")
            try:
                if schema is not None and self.schema is not None:
                    merged_schema = merge_schemas(self.schema, schema, site=site)
                    others = {k: v for k, v in self._summaries.items() if k != site}
                    clash = coding_error(schema, {**others, site: summary}, allow=self.allow_codes)
                    if clash is not None:  # a column coded differently here than elsewhere
                        return clash
                    if self.merged is None:  # the encoding is fixed once merged
                        self.schema = merged_schema
                elif schema is not None:
                    self.schema = schema
            except DataError as exc:
                return str(exc)
            self._summary_rows[site] = int(summary.count.max(initial=0))
            if self.merged is None:
                self._summaries[site] = summary
                self._merge_if_complete()
        self._log("summary", site=site)
        return None

    def _merge_if_complete(self) -> None:
        """Merge the summaries once ``summaries_expected`` are in (under the lock)."""
        from consortium.data.files import label_order
        from consortium.data.preprocess import merge_summaries

        if self.merged is not None or not self._summaries:
            return
        if len(self._summaries) < self.summaries_expected:
            return
        if self.secure_encoding:  # the sums come from SecAgg+: finish_secure_merge
            self.summaries_in.set()
            return
        self.merged = merge_summaries([self._summaries[k] for k in sorted(self._summaries)])
        if self.schema is not None and len(label_order(self.schema.labels)) < 2:
            self.merge_error = (
                f"the sites' files hold only the label {sorted(self.schema.labels)}; "
                "a classifier needs at least two label values"
            )

    def clear_summaries(self) -> dict[str, Any]:
        """The sites' clear summaries (categories only, under ``secure_encoding``), by site."""
        with self._lock:
            return dict(self._summaries)

    def finish_secure_merge(self, merged: Any, *, error: str | None = None,
                            dropped: Sequence[str] = ()) -> None:
        """Fix the encoding from the SecAgg+ total ``merged`` (a ``SiteSummary``), or fail the
        merge with ``error``. The implausible-summary checks apply to the total (no site's own
        sums are seen); a site ``dropped`` from the secure round is expelled."""
        from consortium.data.files import label_order
        from consortium.deploy.summary import implausible_summary

        if merged is not None and error is None:
            why = implausible_summary(merged, schema=self.schema)
            if why is not None:
                error = (f"the sites' summed data summaries cannot describe real rows ({why}); "
                         "under secure aggregation no single site's sums can be checked: ask "
                         "the sites' operators to check their data")
        for site in dropped:
            self.expel(site, f"site {site!r} dropped out of the encoding's secure aggregation")
        with self._described:
            if error is not None:
                self.merge_error = error
            else:
                self.merged = merged
                if self.schema is not None and len(label_order(self.schema.labels)) < 2:
                    self.merge_error = (
                        f"the sites' files hold only the label {sorted(self.schema.labels)}; "
                        "a classifier needs at least two label values"
                    )
            self._described.notify_all()
        self._log("secure_encoding", sites=len(self._summaries) - len(dropped),
                  error=error or "")

    def _exclude(self, site: str, reason: str) -> str:
        """Expel ``site`` for its data statistics (named in the operator's log and the audit)
        and go on without it: if the merge or the start was waiting for it, both now wait for
        one site fewer, and the merge happens at once if the others are in. Returns
        ``reason``, the refusal the site is told."""
        with self._described:
            counted = site in self._summaries or (self.merged is None and site not in self.excluded)
            if counted and site not in self.excluded:
                self.excluded[site] = reason
                self._summaries.pop(site, None)
                if self.merged is None:
                    self.summaries_expected = max(self.summaries_expected - 1, 0)
                    self._merge_if_complete()
            self._described.notify_all()
        self.expel(site, reason)
        return reason

    async def merged_summary(self, wait_s: float) -> Any:
        deadline = time.monotonic() + wait_s
        while self.merged is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.merged

    def expel(self, site: str, reason: str) -> None:
        """Drop ``site`` from the run (revoked while it runs): its session ends, its open tasks
        and exchanges fail at once with ``reason``, and later tasks are not sent to it."""
        with self._lock:
            self.expelled[site] = reason
            old = self._sites.get(site)
            if old is not None:
                self._sessions.pop(old.session, None)
                self._expelled_sessions[old.session] = reason
        if old is not None:
            # wake a pull that waits for work: the site hears the reason now, not after the
            # run (a run that ends before the site's next call left it retrying a closed port)
            self.loop.call_soon_threadsafe(old.queue.put_nowait, _Expelled(reason))
        self._fail_open(site, reason)
        log.warning("%s; its session is closed", reason)
        self._log("expelled", site=site, reason=reason)

    def _fail_open(self, site: str, reason: str) -> None:
        """Answer the site's open tasks and exchanges with ``reason`` (the round stops waiting)."""
        with self._lock:
            open_tasks = [t for t, p in self._pending.items() if p.site == site]
            exchanges = [k for k in self._exchanges if k[0] == site]
        for task_id in open_tasks:
            with self._lock:
                pending = self._pending.get(task_id)
            if pending is not None:
                self._finish(task_id, Result(pending.round, site, None, error=reason)
                             if pending.kind == "train" else None)
        for key in exchanges:
            with self._lock:
                future = self._exchanges.pop(key, None)
            if future is not None and not future.done():
                future.set_result(ExchangeEnvelope(key[1], key[2], key[3], site, None, reason))

    def silent(self, max_age_s: float) -> dict[str, float]:
        """Sites with open tasks or exchanges that have made no call (a pull, a result, a
        heartbeat) for more than ``max_age_s`` seconds: site -> seconds since. A crashed site
        stops calling; a working one sends heartbeats."""
        now = time.monotonic()
        with self._lock:
            busy = {p.site for p in self._pending.values()} | {k[0] for k in self._exchanges}
            return {s: now - self._sites[s].last_seen for s in busy
                    if s in self._sites and now - self._sites[s].last_seen > max_age_s}

    def fail_silent(self, max_age_s: float) -> None:
        """Fail the open tasks of :meth:`silent` sites at once instead of at the deadline."""
        for site, age in self.silent(max_age_s).items():
            log.warning("site %r: no call for %.0f s (crashed or cut off); its task fails now",
                        site, age)
            self._fail_open(site, f"site {site!r} went silent (no call for {age:.0f} s)")

    def upload_limit(self) -> int:
        """The largest result accepted: room for the delta and up to three extras of the
        model's size (SCAFFOLD's control variate) plus 1 MiB of metadata, never more than
        ``max_result_bytes`` — so a site cannot make the server buffer gigabytes for a small
        model. Before round 1 no task was sent, so no update can be due: only
        :data:`PRE_LAYOUT_UPLOAD_BYTES` (an evaluation's metrics fit many times over)."""
        if self.layout is None:
            return min(self.max_result_bytes, max(PRE_LAYOUT_UPLOAD_BYTES, self.answer_bytes))
        return min(self.max_result_bytes, 4 * self.layout.size * 4 + (1 << 20))

    def site_of(self, session: str) -> str:
        with self._lock:
            site = self._site_of(session)
            site.last_seen = time.monotonic()
            return site.name

    def site_named(self, session: str) -> str | None:
        """The site of ``session`` (None: unknown), without counting this as its call."""
        with self._lock:
            return self._sessions.get(session)

    def expelled_reason(self, session: str) -> str | None:
        """Why the site that held ``session`` was expelled (None: it was not)."""
        with self._lock:
            return self._expelled_sessions.get(session)

    def _site_of(self, session: str) -> _Site:
        name = self._sessions.get(session)
        if name is None:
            raise KeyError("unknown or expired session; register again")
        return self._sites[name]

    async def next_work(self, session: str, wait_s: float) -> Any:
        """The site's next work item, or :class:`Wait` after ``wait_s`` without one."""
        with self._lock:
            entry = self._site_of(session)
            entry.pulling += 1
        try:
            item = await asyncio.wait_for(entry.queue.get(), timeout=wait_s)
        except asyncio.TimeoutError:
            return Wait(seconds=0.0)
        finally:  # it was waiting here, connected, until now
            entry.last_seen = time.monotonic()
            entry.pulling -= 1
        if isinstance(item, _Expelled):
            raise PermissionError(item.reason)
        if isinstance(item, TaskEnvelope):
            item = dataclasses.replace(item, head=self.signed_head(entry.name, item))
        return item

    @property
    def server_certificate(self) -> bytes:
        """The certificate the sites check audit heads with (empty: unsigned heads)."""
        return bytes(getattr(self.signer, "certificate", b""))

    def signed_head(self, site: str, item: TaskEnvelope) -> AuditHead | None:
        """The audit log's head as the task leaves (its own "task" entry is in it), signed
        together with the task: the site keeps it as a receipt (see
        :mod:`consortium.deploy.receipts`). None without an audit log."""
        if self.audit is None:
            return None
        from consortium.deploy.receipts import head_message

        head = self.audit.head()
        if self.signer is None:
            return head
        message = head_message(
            run_id=self.run_id, site=site, round=item.task.round, task_id=item.task_id,
            kind="evaluate" if item.evaluate else "train", seq=head.seq, hash=head.hash,
        )
        return dataclasses.replace(head, signature=self.signer.sign(message))

    def deliver(
        self, session: str, upload: ResultEnvelope | EvaluationEnvelope | AnalysisResultEnvelope,
    ) -> tuple[bool, str]:
        """Validate an upload and hand it to the waiting round; ``(accepted, reason)``."""
        site = self.site_of(session)
        with self._lock:
            pending = self._pending.get(upload.task_id)
        if pending is None or pending.site != site:
            return self.reject(site, upload.task_id,
                               getattr(getattr(upload, "result", None), "round", -1),
                               "no such task open for this site (unknown, answered, or late)")
        if pending.kind == "analysis" or isinstance(upload, AnalysisResultEnvelope):
            return self._deliver_analysis(site, pending, upload)
        declared = self._declared(site)
        if isinstance(upload, EvaluationEnvelope):
            r = upload.result
            if pending.kind != "evaluate" or r.client_id != site or r.round != pending.round:
                # the task is closed like every other refusal: the round does not wait for a
                # second answer until its deadline
                self._finish(upload.task_id, Result(pending.round, site, None, error="rejected")
                             if pending.kind == "train" else None)
                return self.reject(site, upload.task_id, pending.round, "not the evaluation asked for")
            try:  # no more test examples than the site declared; metrics finite and in range
                validate_evaluation(
                    upload, expected=pending.expected, max_bytes=self.upload_limit(),
                    seen_task_ids=self._seen,
                    max_examples=declared.num_test if declared is not None else DEFAULT_MAX_WEIGHT,
                )
            except RejectedResult as exc:
                self._finish(upload.task_id, None)
                return self.reject(site, upload.task_id, pending.round, str(exc))
            self._finish(upload.task_id, EvaluationResult(r.round, site, r.num_examples, r.metrics))
            return True, ""
        if pending.kind != "train":
            self._finish(upload.task_id, None)
            return self.reject(site, upload.task_id, pending.round,
                               "a training result for an evaluation task")
        if self._resync(site, pending, upload):
            return True, ""
        try:
            assert self.layout is not None
            decoded = validate_result(
                upload, expected=pending.expected, layout=self.layout,
                max_bytes=self.upload_limit(), seen_task_ids=self._seen,
                # a site's weight is its number of training examples: never more than it
                # declared at Describe (a weight of 1e9 replaced the model in one round)
                max_weight=max(1.0, float(declared.num_train)) if declared is not None
                else DEFAULT_MAX_WEIGHT,
            )
        except RejectedResult as exc:
            self._finish(upload.task_id, Result(pending.round, site, None, error=f"rejected: {exc}"))
            return self.reject(site, upload.task_id, pending.round, str(exc))
        result = upload.result
        if result.update is not None:
            # a compressed update is logged by the delta it decodes to (the pipeline's
            # compression stage decodes it again before aggregation)
            digest, norm = update_digest(result.update.delta if decoded is None else decoded)
            self._log("result", site=site, round=pending.round, task_id=upload.task_id,
                      update_sha256=digest, norm=norm, weight=result.update.weight)
            self._count(site, "results", pending.round)
            shared = getattr(pending.expected, "shared", None)
            if upload.parts is not None and shared is not None:
                # the personal coordinates never came: zeros there, as a simulated client sends
                full = expand(result.update.delta, self.layout, shared)
                result = dataclasses.replace(
                    result, update=dataclasses.replace(result.update, delta=full))
        else:
            self._log("result", site=site, round=pending.round, task_id=upload.task_id,
                      error=result.error, refused=result.refused)
        self._finish(upload.task_id, result)
        return True, ""

    def offer_full(self, task_id: str, envelope: TaskEnvelope) -> None:
        """Keep ``envelope`` (the task ``task_id`` with its whole model) for :meth:`_resync`."""
        with self._lock:
            self._full[task_id] = envelope

    def take_resent_bytes(self) -> int:
        """The bytes of whole models re-sent since the last call (the round's ``bytes_down``)."""
        with self._lock:
            n, self._resent_bytes = self._resent_bytes, 0
        return n

    def _resync(self, site: str, pending: _Pending, upload: Any) -> bool:
        """A site that cannot rebuild its task's model from its downlink reference (it
        restarted without its state, missed a task, or the server restarted) answers with an
        error that starts with :data:`~consortium.compression.downlink.RESYNC`: the same task
        goes again, once, with the whole model (the one the site's reference would have given:
        it trains from the same model). Whether that happened (the upload is then answered)."""
        from consortium.compression.downlink import RESYNC

        r = getattr(upload, "result", None)
        if (not isinstance(upload, ResultEnvelope) or r is None or r.update is not None
                or not (r.error or "").startswith(RESYNC) or r.client_id != site
                or r.round != pending.round):
            return False
        with self._lock:
            full = self._full.pop(upload.task_id, None)
            if full is not None:
                self._resent_bytes += full.task.nbytes
        if full is None:
            return False
        log.warning("site %r: %s; sending it the whole model", site, peer_text(r.error, 300))
        self._log("resync", site=site, round=pending.round, task_id=upload.task_id,
                  reason=peer_text(r.error, MAX_REASON_CHARS))
        self.send(site, full)
        return True

    def _deliver_analysis(self, site: str, pending: _Pending, upload: Any) -> tuple[bool, str]:
        """An analysis answer, checked by its task's ``expected.check`` (the analysis driver's,
        :mod:`consortium.deploy.analytics`), which returns what the driver waits for or raises
        :class:`RejectedResult`; a refused answer completes the task with that exception."""
        import hashlib

        if pending.kind != "analysis" or not isinstance(upload, AnalysisResultEnvelope):
            why = (f"an analysis answer for a {pending.kind} task" if pending.kind != "analysis"
                   else f"a {type(upload).__name__} for an analysis task")
            self._finish(upload.task_id, Result(pending.round, site, None, error="rejected")
                         if pending.kind == "train" else None if pending.kind == "evaluate"
                         else RejectedResult(why, site=site, round=pending.round,
                                             task_id=upload.task_id))
            return self.reject(site, upload.task_id, pending.round, why)
        try:
            value = pending.expected.check(upload)
        except RejectedResult as exc:
            self._finish(upload.task_id, exc)
            return self.reject(site, upload.task_id, pending.round, str(exc))
        self._log("result", site=site, round=pending.round, task_id=upload.task_id,
                  analysis=upload.phase, body_sha256=hashlib.sha256(upload.body).hexdigest(),
                  refused=upload.refused)
        self._finish(upload.task_id, value)
        return True, ""

    def _declared(self, site: str) -> SiteInfo | None:
        """What ``site`` declared at Describe (the roster's record once the run started)."""
        with self._lock:
            if self.roster is not None and site in self.roster:
                return self.roster[site]
            entry = self._sites.get(site)
        return entry.info if entry is not None else None

    def max_weight(self, site: str) -> float:
        """The largest weight ``site`` may claim: its declared training examples (a site that
        has not described its data: :data:`DEFAULT_MAX_WEIGHT`)."""
        declared = self._declared(site)
        return max(1.0, float(declared.num_train)) if declared is not None else DEFAULT_MAX_WEIGHT

    def deliver_exchange(self, session: str, envelope: ExchangeEnvelope) -> tuple[bool, str]:
        site = self.site_of(session)
        key = (site, envelope.stage, envelope.phase, envelope.round)
        with self._lock:
            future = self._exchanges.pop(key, None)
        if future is None or envelope.client_id != site:
            return self.reject(site, "-", envelope.round, f"unexpected {envelope.phase!r} reply")
        if not future.done():
            future.set_result(envelope)
        return True, ""

    def _finish(self, task_id: str, value: Any) -> None:
        with self._lock:  # under the lock: once forget() returns, no open task completes
            pending = self._pending.pop(task_id, None)
            self._full.pop(task_id, None)
            if pending is not None and not pending.future.done():
                pending.future.set_result(value)

    def reject(self, site: str, task_id: str, rnd: int, reason: str) -> tuple[bool, str]:
        """Log, audit and count a refused upload; ``(False, reason line)`` for the Ack.

        Every rejection is counted; the first few of each site per minute are logged and
        audited in full (the reason sanitised and cut to :data:`MAX_REASON_CHARS`), the rest
        only counted and reported by one ``suppressed`` audit entry per site and minute
        (:class:`~consortium.deploy.logsafe.RejectionLimiter`), so that a site sending
        garbage in a loop cannot grow the logs without bound.
        """
        task_id = peer_text(task_id, 80)
        line = f"rejected result from site {site!r} (round {rnd}, task {task_id!r}): {reason}"
        if not reason.startswith("rejected result"):
            reason = line
        reason = peer_text(reason, MAX_REASON_CHARS)
        self._count(site, "rejected", rnd)
        with self._lock:
            self.rejected_total += 1
            full, ended = self.rejections.admit(site, reason)
        if ended is not None:
            self._suppressed(*ended)
        if full:
            log.warning("%s", reason)
            with self._lock:  # the round report reads it from the main thread
                self.rejected.append(reason)
                self.rejected_logged += 1
            self._log("rejected", site=site, round=rnd, task_id=task_id, reason=reason)
        return False, reason

    def latest_rejections(self) -> tuple[int, int, list[str]]:
        """(rejections counted, written in full, the latest of those) — a consistent snapshot
        for the round report in the main thread."""
        with self._lock:
            return self.rejected_total, self.rejected_logged, list(self.rejected)

    def flush_rejections(self, *, final: bool = False) -> None:
        """Report the rejections counted but not written in windows that ended (the server
        calls this every minute, so a site that stopped sending is reported too); ``final``:
        in every window, ended or not (the run is over)."""
        with self._lock:
            ended = self.rejections.flush(math.inf if final else None)
        for entry in ended:
            self._suppressed(*entry)

    def _suppressed(self, site: str, count: int, sample: str) -> None:
        window = self.rejections.window_s
        log.warning("suppressed %d more rejections from site %r in %.0f s; the latest: %s",
                    count, site, window, sample)
        self._log("suppressed", site=site, rejections=count, window_s=window, sample=sample)

    def _log(self, kind: str, **fields: Any) -> None:
        if self.audit is not None:
            self.audit.append(kind, **fields)

    def _offline(self, site: str) -> str | None:
        """Why ``site`` counts as offline (None: online or unknown), under the lock or not."""
        entry = self._sites.get(site)
        if entry is None or entry.pulling or math.isinf(self.offline_after_s):
            return None
        age = time.monotonic() - entry.last_seen
        if age <= self.offline_after_s:
            return None
        return f"site {site!r} is offline (went silent: no call for {age:.0f} s)"

    def online(self) -> set[str]:
        """The roster's sites (and those joining) that are connected now: registered, described,
        not expelled, and waiting for work or heard from within ``offline_after_s``."""
        with self._lock:
            return {s.name for s in self._sites.values()
                    if s.info is not None and s.name not in self.expelled
                    and self._offline(s.name) is None}

    def take_joining(self) -> dict[str, SiteInfo]:
        """The sites that described their data after the roster was fixed, since the last call
        (those expelled meanwhile left out)."""
        with self._lock:
            out, self.joining = self.joining, {}
            return {k: v for k, v in out.items() if k not in self.expelled}

    def admit(self, site: str, info: SiteInfo, rnd: int) -> None:
        """Put ``site`` on the roster from round ``rnd`` on (audited as ``admitted``)."""
        with self._lock:
            assert self.roster is not None, "admit() after fix_roster()"
            self.roster[site] = info
            self.counts.setdefault(site, {"results": 0, "rejected": 0, "last_round": 0})
            self.joined[site] = rnd
        self._log("admitted", site=site, round=rnd, num_train=info.num_train,
                  num_test=info.num_test)

    def log_event(self, kind: str, **fields: Any) -> None:
        """An entry in the run's audit log (departures and returns: deploy/roster.py)."""
        self._log(kind, **fields)

    # -- the round loop's side (main thread) -----------------------------------------------------

    def wait_for_sites(
        self, names: Sequence[str] | int, timeout_s: float, *,
        on_ready: Callable[[str, str, int, int], None] | None = None,
    ) -> dict[str, SiteInfo]:
        """Block until the named sites (or that many sites) have described their data.

        A site expelled while the server waits (revoked, or excluded for its data statistics)
        is not waited for. ``on_ready(site, state, count, needed)`` is called once for each
        site as it connects (``state`` "connected") and once as it has described its data
        ("ready"; sites reading table files describe only after every site sent its data
        summary), with how many are that far, so the operator sees the federation assemble
        (it runs under the hub's lock: it must not call the hub).

        Raises:
            SitesMissingError: ``timeout_s`` passed first; the message names the sites that
                are missing (with named sites: which never connected and which connected but
                did not describe their data).
        """
        deadline = time.monotonic() + timeout_s
        announced: dict[str, set[str]] = {"connected": set(), "ready": set()}

        def needed() -> int:
            if isinstance(names, int):  # a site excluded for its statistics is not waited for
                return max(names - len(self.excluded), 0)
            return sum(n not in self.expelled for n in names)

        def described() -> list[str]:
            return [s.name for s in self._sites.values()
                    if s.info is not None and s.name not in self.expelled]

        def announce(state: str, sites: list[str]) -> None:
            for site in sites:
                if on_ready is not None and site not in announced[state]:
                    announced[state].add(site)
                    on_ready(site, state, len(announced[state]), needed())

        def ready() -> bool:
            have = described()
            announce("connected", [s for s in self._sites if s not in self.expelled])
            announce("ready", have)
            if isinstance(names, int):
                return len(have) >= needed()
            return all(n in have or n in self.expelled for n in names)

        with self._described:
            while not ready():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise SitesMissingError(self._missing_message(names, timeout_s, described()))
                self._described.wait(timeout=min(left, 1.0))
            return {s.name: s.info for s in self._sites.values()
                    if s.info is not None and s.name not in self.expelled}

    def _missing_message(self, names: Sequence[str] | int, timeout_s: float, have: list[str]) -> str:
        """Why the start gave up: who is ready, who is missing, and what the operator can do
        (under the lock)."""
        if isinstance(names, int):
            return (f"waited {timeout_s:.0f} s for {names} sites; {len(have)} ready: "
                    f"{sorted(have)}. Start the missing clients (consortium client ...) or "
                    "lower --min-sites")
        missing = sorted(n for n in names if n not in have and n not in self.expelled)
        never = [n for n in missing if n not in self._sites]
        silent = [n for n in missing if n in self._sites]
        why = "; ".join(part for part in (
            f"never connected: {never}" if never else "",
            f"connected but did not describe their data: {silent}" if silent else "",
        ) if part)
        return (f"waited {timeout_s:.0f} s for the {len(missing) + len(have)} provisioned sites; "
                f"ready: {sorted(have)}; missing: {missing} ({why}). Start the missing sites' "
                "clients (consortium client ...), revoke those that will not come (consortium "
                "provision --revoke SITE), or start with fewer: --min-sites N")

    def connected(self) -> list[str]:
        with self._lock:
            return sorted(s.name for s in self._sites.values() if s.info is not None)

    def send(self, site: str, item: Any) -> None:
        with self._lock:
            entry = self._sites.get(site)
        if entry is None or site in self.expelled:
            return  # its task was answered at once (see expect)
        with self._lock:
            queue = entry.queue
        self.loop.call_soon_threadsafe(queue.put_nowait, item)

    def expect(self, site: str, rnd: int, task_id: str, kind: str,
               expected: ExpectedTask | Any) -> cf.Future[Any]:
        future: cf.Future[Any] = cf.Future()
        gone = self.expelled.get(site) or (
            None if site in self._sites else f"site {site!r} is not connected"
        ) or self._offline(site)
        if gone is not None:  # answered at once: the round does not wait for it
            future.set_result(Result(rnd, site, None, error=gone) if kind == "train" else None)
            return future
        with self._lock:
            self._pending[task_id] = _Pending(site, rnd, kind, future, expected)
        self._log("task", site=site, round=rnd, task_id=task_id, task_kind=kind)
        return future

    def expect_exchange(self, site: str, stage: str, phase: str, rnd: int) -> cf.Future[Any]:
        future: cf.Future[Any] = cf.Future()
        gone = self.expelled.get(site) or (
            None if site in self._sites else f"site {site!r} is not connected"
        )
        if gone is not None:
            future.set_result(ExchangeEnvelope(stage, phase, rnd, site, None, gone))
            return future
        with self._lock:
            self._exchanges[(site, stage, phase, rnd)] = future
        return future

    def forget(self, task_ids: Sequence[str]) -> None:
        """Close tasks past their deadline: a late answer is refused as unknown."""
        with self._lock:
            for t in task_ids:
                self._pending.pop(t, None)
                self._full.pop(t, None)

    def finish_all(self, reason: str) -> None:
        with self._lock:
            sites = list(self._sites)
        for site in sites:
            self.send(site, Finished(reason))


class RemoteExecutor:
    """An :class:`~consortium.executors.base.Executor` whose clients are sites reached over gRPC.

    Each task goes to its site's queue; results are awaited until ``round_timeout`` seconds
    after the round's tasks went out, and a site that has not answered by then is dropped from
    the round (its late answer is refused). Exchanges (secure aggregation's phases) wait at most
    ``phase_timeout`` seconds per phase. With ``silence_s`` > 0 a site that has made no call
    (sites send heartbeats while they work) for that long fails its task at once instead of at
    the deadline. A training round with fewer than ``min_results``
    results is aborted (:class:`~consortium.errors.RoundAborted`: the model and every state
    stay, the run goes on); the sites that failed are reported with their reasons. With
    ``over_select`` = x > 0 the round's sites are an over-selection (Bonawitz et al., "Towards
    Federated Learning at Scale", SysML 2019): it closes as soon as ceil(n / (1 + x)) of its n
    tasks have good results, and the slowest sites' answers are refused as late.

    ``round_errors``: what the sites send is another institution's, so any error while a round
    aggregates it ends that round (the model and every state stay, ``aborted`` names the round
    and the cause), never the run (see ``Server.run_round``).
    """

    name = "remote"
    round_errors: tuple[type[BaseException], ...] = (Exception,)

    def __init__(
        self, hub: Hub, *, round_timeout: float = 600.0, phase_timeout: float = 120.0,
        min_results: int = 1, over_select: float = 0.0, silence_s: float = 0.0,
    ) -> None:
        if min_results < 1:
            raise ValueError(f"min_results must be >= 1, got {min_results}")
        if not 0 <= over_select <= 10:
            raise ValueError(f"over_select must be in [0, 10], got {over_select}")
        self.over_select = over_select
        self.silence_s = silence_s  # > 0: fail the tasks of sites silent this long
        self.hub = hub
        self.round_timeout = round_timeout
        self.phase_timeout = phase_timeout
        self.min_results = min_results
        self.local_reports: dict[str, tuple[int, dict[str, float]]] = {}
        """Site → (test examples, its local-only baseline's metrics), as the site reported
        them (``local_<name>`` in its last evaluation; server/baselines.py)."""

    def _checks(self, task: Task, clients: Mapping[str, Any]) -> dict[str, Any]:
        """What every training task of a round is checked against, computed once from one of
        its tasks (they share the model): secure aggregation, the update-norm cap, the shared
        layout of a personalised algorithm, the uplink compression."""
        from consortium.compression.stage import Compress

        self.hub.layout = task.parameters.layout
        # behind secure aggregation an update's values come through the protocol, not the result
        stages = getattr(getattr(clients, "pipeline", None), "stages", ())
        return {
            "secure": any(getattr(s, "name", "") == "secure_aggregation" for s in stages),
            "max_norm": update_norm_cap(_model_norm(task)),
            # a personalised algorithm's sites send only the shared tensors (deploy/shared.py)
            "shared": shared_layout(getattr(clients, "algorithm", None), task.parameters.layout),
            # under uplink compression the sites send encodings, decoded while validated
            "compression": next((s for s in stages if isinstance(s, Compress)), None),
        }

    def _send(self, task: Task, clients: Mapping[str, Any],
              checks: Mapping[str, Any]) -> tuple[str, cf.Future[Any]]:
        task_id = uuid.uuid4().hex
        expected = ExpectedTask(
            site=task.client_id, round=task.round, task_id=task_id, extras=_expected_extras(
                clients, task.parameters.layout, self.hub.max_weight(task.client_id)),
            **checks,
        )
        future = self.hub.expect(task.client_id, task.round, task_id, "train", expected)
        # the cohort's size stays at the server: a deployed site counts its peers from
        # signed secure-aggregation keys, and the realised size of a secret sample is
        # itself something the sites should not learn
        if task.downlink is not None:  # the whole model, should the site not rebuild it
            self.hub.offer_full(task_id, TaskEnvelope(task_id, dataclasses.replace(
                task, cohort_size=0, downlink=None, model_nbytes=None)))
        self.hub.send(task.client_id, TaskEnvelope(task_id, dataclasses.replace(task, cohort_size=0)))
        return task_id, future

    def fit(self, tasks: Sequence[Task], clients: Mapping[str, Any]) -> Iterator[Result]:
        futures: dict[cf.Future[Any], tuple[str, Task]] = {}
        checks = self._checks(tasks[0], clients) if tasks else {}
        for task in tasks:
            task_id, future = self._send(task, clients, checks)
            futures[future] = (task_id, task)
        enough = math.ceil(len(tasks) / (1 + self.over_select)) if self.over_select else 0
        good = 0
        for result in self._collect(futures, lambda t: Result(
            t.round, t.client_id, None,
            error=f"no result before the round's deadline ({self.round_timeout:.0f} s)",
        ), enough=enough, cut=lambda t: Result(
            t.round, t.client_id, None,
            error=f"over-selected: the round closed with the first {enough} results",
        )):
            good += result.error is None
            yield result
        if tasks and good < self.min_results:  # the loop discards what was folded so far
            raise RoundAborted(
                f"{good} of {len(tasks)} sites sent an update; a round needs at least "
                f"{self.min_results} (--min-results)"
            )

    def start(self, task: Task, clients: Mapping[str, Any]) -> tuple[str, cf.Future[Any]]:
        """Send one training task now: ``(task id, future)``, the future completed by the
        site's validated :class:`Result` (checked as :meth:`fit` checks a round's: sender,
        round, task id, update bound, declared extras, audit entry) or by an error. The
        asynchronous modes' dispatch (:mod:`consortium.deploy.asynchronous`); the task is
        open until answered or :meth:`Hub.forget`."""
        return self._send(task, clients, self._checks(task, clients))

    def evaluate(self, tasks: Sequence[Task], clients: Mapping[str, Any]) -> Iterator[EvaluationResult]:
        futures: dict[cf.Future[Any], tuple[str, Task]] = {}
        for task in tasks:
            task_id = uuid.uuid4().hex
            expected = ExpectedTask(site=task.client_id, round=task.round, task_id=task_id)
            future = self.hub.expect(task.client_id, task.round, task_id, "evaluate", expected)
            futures[future] = (task_id, task)
            self.hub.send(task.client_id, TaskEnvelope(task_id, task, evaluate=True))
        for value in self._collect(futures, lambda t: None):
            if value is not None:
                yield _keep_local_report(value, self.local_reports)

    def _collect(
        self, futures: dict[cf.Future[Any], tuple[str, Task]], missing: Any,
        enough: int = 0, cut: Any = None,
    ) -> Iterator[Any]:
        """The answers in the order the tasks were sent, each as soon as it and every earlier
        one is in: a streaming aggregator folds them while the rest arrive (the round holds one
        update at a time, not N), and the aggregate does not depend on which site answered
        first, so a resumed run reproduces an uninterrupted one bit for bit (not with
        ``enough`` > 0: the round then closes once that many good results are in and the rest
        are answered by ``cut``, which depends on timing). Tasks still open at the deadline
        are answered by ``missing``; their late answers are refused. The audit log is synced
        before the last answer is given, so every result is on disk before the round's
        aggregate exists."""
        order = list(futures)
        given = 0
        good = 0
        closing = missing
        for future in self._completed(futures, time.monotonic() + self.round_timeout):
            good += getattr(future.result(), "error", None) is None
            if enough and good >= enough:
                closing = cut
                break
            while given < len(order) - 1 and order[given].done():  # the last waits for the sync
                given += 1
                value = order[given - 1].result()
                if value is not None:
                    yield value
        open_ = [(tid, t) for f, (tid, t) in futures.items() if not f.done()]
        self.hub.forget([tid for tid, _ in open_])  # from here on a late answer is refused
        if closing is missing:
            for _, task in open_:
                log.warning("site %r: no answer in round %d before the deadline", task.client_id, task.round)
        if self.hub.audit is not None:
            self.hub.audit.sync()
        for future in order[given:]:
            value = future.result() if future.done() else closing(futures[future][1])
            if value is not None:
                yield value

    def exchange(
        self, stage_name: str, phase: str, messages: Mapping[str, Any], clients: Mapping[str, Any],
        *, round: int,
    ) -> Iterator[tuple[str, Any]]:
        futures = {}
        for cid, message in messages.items():
            futures[self.hub.expect_exchange(cid, stage_name, phase, round)] = cid
            self.hub.send(cid, ExchangeEnvelope(stage_name, phase, round, cid, message))
        # replies as they come; a silent site is given up on before the phase's timeout
        for future in self._completed(futures, time.monotonic() + self.phase_timeout):
            envelope: ExchangeEnvelope = future.result()
            if envelope.error is None:
                yield futures[future], envelope.message

    def _completed(self, futures: Iterable[cf.Future[Any]], deadline: float) -> Iterator[cf.Future[Any]]:
        """``futures`` as they complete, until all have or ``deadline`` (monotonic) passes;
        every ``silence_s / 3`` seconds the sites silent for ``silence_s`` are failed. O(n) for
        n futures (``cf.wait`` in a loop re-registers on every pending future each time)."""
        done: queue.SimpleQueue[cf.Future[Any]] = queue.SimpleQueue()
        remaining = 0
        for future in futures:
            future.add_done_callback(done.put)
            remaining += 1
        every = max(self.silence_s / 3, 0.1) if self.silence_s else math.inf
        check = time.monotonic() if self.silence_s else math.inf
        while remaining:
            now = time.monotonic()
            if now >= deadline:
                return
            if now >= check:
                self.hub.fail_silent(self.silence_s)
                check = now + every
            try:
                future = done.get(timeout=max(min(deadline, check) - now, 0.001))
            except queue.Empty:
                continue
            remaining -= 1
            yield future

    def take_resent_bytes(self) -> int:
        """Whole models re-sent to sites that could not rebuild theirs (per-client downlink
        compression) since the last call: the round loop adds them to ``bytes_down``."""
        return self.hub.take_resent_bytes()

    def close(self) -> None:
        pass



def _model_norm(task: Task) -> float:
    """The L2 norm of the global model a round's tasks carry (in float64: no overflow)."""
    from consortium.aggregation.bound import update_norm

    return update_norm(task.parameters.vector)


def _expected_extras(clients: Any, layout: Layout, max_weight: float) -> dict[str, Any] | None:
    """The extras an honest site sends in this run: its algorithm's declaration
    (``expected_extras``) as the pipeline's client halves change it
    (:meth:`~consortium.aggregation.base.Pipeline.client_extras`). ``None`` (names and shapes
    unchecked; dtype, finiteness and magnitude still are) when the executor is not given the
    run's client pool or the algorithm declares nothing."""
    algorithm = getattr(clients, "algorithm", None)
    pipeline = getattr(clients, "pipeline", None)
    settings = getattr(clients, "settings", None)
    declare = getattr(algorithm, "expected_extras", None)
    if declare is None or pipeline is None or settings is None:
        return None
    return dict(pipeline.client_extras(declare(layout, settings, max_weight), layout))


LOCAL_BASELINE = "local_"
"""A deployed site's local-only baseline's metrics in its last evaluation (its own model,
trained alone at home; only the metrics leave)."""


def _keep_local_report(
    value: EvaluationResult, reports: dict[str, tuple[int, dict[str, float]]]
) -> EvaluationResult:
    """``value`` without its ``local_<name>`` metrics, which go into ``reports`` (they are a
    baseline's, not the global model's: they must not enter the federated averages)."""
    local = {k[len(LOCAL_BASELINE):]: v for k, v in value.metrics.items()
             if k.startswith(LOCAL_BASELINE)}
    if not local:
        return value
    reports[value.client_id] = (value.num_examples, local)
    return dataclasses.replace(value, metrics={
        k: v for k, v in value.metrics.items() if not k.startswith(LOCAL_BASELINE)
    })
