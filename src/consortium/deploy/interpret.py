"""``consortium server``'s side of ``[interpret]`` and ``[contribution]`` after the last round.

Once the run has trained (the sites hold the final model from the last evaluation task), the
server asks every site for its interpretation sums (:mod:`consortium.deploy.interpret_site`
says what a site computes and releases) and combines them with the simulation's functions
(:func:`~consortium.interpret.importance.aggregate_importance`,
:func:`~consortium.interpret.shap_summary.aggregate_shap`,
:func:`~consortium.interpret.calibration.calibration_summary`) into ``summary.json``'s
``interpret``, the same sections as ``consortium run`` writes. Under secure aggregation the
sums travel through SecAgg+ (:func:`~consortium.deploy.secure_total.secure_total`) and only
their total is read: per-site importances and differences are then not available (the summary
says so).

Contribution (GTG-Shapley's reconstruction, Liu et al., ACM TIST 2022; the estimators of
:mod:`consortium.contribution.shapley`): the server recorded every round's updates (it sees
them without secure aggregation); the coalition models each estimator needs are evaluated by
the sites in batches (:class:`RemoteUtility`), each site returning per model its loss and
correct-count sums on its test split, so ``v(S)`` is the pooled loss or accuracy over the
sites' test rows — what ``validation = "sites"`` computes in simulation.

Every answer is checked as it arrives (:class:`InterpretExpectation`,
:class:`ContributionExpectation`): a malformed, oversized, inconsistent or out-of-range
answer is refused with the reason and its site is left out (named in the summary).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import math
import sys
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from consortium.deploy.codec import AnalysisResultEnvelope, AnalysisTaskEnvelope
from consortium.deploy.interpret_site import (
    CONTRIBUTION_PHASE,
    INTERPRET_PHASE,
    INTERPRET_ROUND,
    INTERPRET_STAGE,
    MAX_CONTRIBUTION_MODELS,
    WORST_LOSS,
    interpret_context,
    model_digest,
    secure_keys,
)
from consortium.deploy.logsafe import peer_text
from consortium.deploy.validate import RejectedResult
from consortium.errors import ConsortiumError, DataError

__all__ = [
    "ContributionExpectation", "InterpretExpectation", "RemoteUtility", "deployed_contribution",
    "deployed_interpret", "finish_deployed_run",
]

MAX_ANSWER_BYTES = 16 << 20
MAX_ROWS = 10**9
MAX_LOSS_PER_ROW = 1e6
BATCH_BYTES = 32 << 20  # raw model bytes per contribution request (the site's task limit: 64 MiB+)
TOLERANCE = 1e-6


class _Bad(Exception):
    """An answer breaks the rules (the message says how)."""


@dataclass(frozen=True)
class SiteRefusal:
    reason: str
    refused: bool


def _int(v: Any, where: str, low: int, high: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
        raise _Bad(f"{where} must be an integer in [{low}, {high}], found {str(v)[:40]}")
    return v


def _float(v: Any, where: str, low: float, high: float) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
            or not low - TOLERANCE <= v <= high + TOLERANCE:
        raise _Bad(f"{where} must be a number in [{low:g}, {high:g}], found {str(v)[:40]}")
    return float(v)


def _obj(v: Any, where: str, keys: Sequence[str]) -> dict[str, Any]:
    if not isinstance(v, dict) or set(v) != set(keys):
        found = sorted(v)[:8] if isinstance(v, dict) else type(v).__name__
        raise _Bad(f"{where} must be an object with the fields {sorted(keys)}, found {found}")
    return v


def _per_feature(v: Any, where: str, features: Sequence[str], low: float, high: float,
                 *, integer: bool = False) -> dict[str, Any]:
    d = _obj(v, where, features)
    if integer:
        return {f: _int(d[f], f"{where}[{f!r}]", int(low), int(high)) for f in features}
    return {f: _float(d[f], f"{where}[{f!r}]", low, high) for f in features}


def _columns(body: Mapping[str, Any]) -> tuple[list[str] | None, int]:
    width = _int(body.get("width"), "width", 1, 1 << 24)
    cols = body.get("columns")
    if cols is None:
        return None, width
    if not isinstance(cols, list) or len(cols) != width or not all(
            isinstance(c, str) and 0 < len(c) <= 200 for c in cols):
        raise _Bad(f"columns must be null or {width} names of 1–200 characters")
    return list(cols), width


@dataclass
class InterpretExpectation:
    """What the server accepts as ``site``'s interpret answer; :meth:`check` runs as the upload
    arrives (the hub's analysis delivery) and returns the checked sums, ``"ready"`` (secure
    aggregation: ``(columns, width)``), or a :class:`SiteRefusal`."""

    site: str
    task_id: str
    parts: Mapping[str, bool]
    repeats: int
    secure: bool
    bins: int = 10

    def check(self, upload: AnalysisResultEnvelope) -> Any:
        from consortium.analytics import wire

        if upload.phase != INTERPRET_PHASE:
            raise self._rejected(f"a {peer_text(upload.phase, 40)!r} answer to an interpret task")
        if upload.error is not None:
            return SiteRefusal(peer_text(upload.error, 900), upload.refused)
        try:
            body = wire.loads(upload.body, limit=MAX_ANSWER_BYTES,
                              what=f"site {self.site!r}'s interpret answer")
            if not isinstance(body, dict):
                raise _Bad("an interpret answer is a JSON object")
            if self.secure:
                _obj(body, "a secure interpret answer", ["ready", "size", "columns", "width"])
                columns, width = _columns(body)
                return ("ready", columns, width, body["ready"] is True and body["size"])
            return self._sums(body)
        except (_Bad, wire.WireError) as exc:
            raise self._rejected(str(exc)) from None

    def _sums(self, body: dict[str, Any]) -> dict[str, Any]:
        from consortium.interpret.importance import feature_groups

        want = ["n", "columns", "width"] + [p for p, on in self.parts.items() if on]
        _obj(body, "the interpret answer", want)
        columns, width = _columns(body)
        features = list(feature_groups(columns, width))
        n = _int(body["n"], "n", 1, MAX_ROWS)
        out: dict[str, Any] = {"n": n, "columns": columns, "width": width, "features": features}
        if self.parts.get("permutation"):
            p = _obj(body["permutation"], "permutation",
                     ["n", "repeats", "base_loss", "base_correct", "loss", "correct"])
            if _int(p["n"], "permutation.n", n, n) != n or \
                    _int(p["repeats"], "permutation.repeats", 1, 1000) != self.repeats:
                raise _Bad(f"permutation sums must be over the site's {n} rows and the "
                           f"requested {self.repeats} repeats")
            shuffled = n * self.repeats
            out["permutation"] = {
                "n": n, "repeats": self.repeats,
                "base_loss": _float(p["base_loss"], "permutation.base_loss", 0.0,
                                    MAX_LOSS_PER_ROW * n),
                "base_correct": _int(p["base_correct"], "permutation.base_correct", 0, n),
                "loss": _per_feature(p["loss"], "permutation.loss", features, 0.0,
                                     MAX_LOSS_PER_ROW * shuffled),
                "correct": _per_feature(p["correct"], "permutation.correct", features, 0,
                                        shuffled, integer=True),
            }
        if self.parts.get("shap"):
            s = _obj(body["shap"], "shap", ["n", "abs_sum", "sum"])
            m = _int(s["n"], "shap.n", 1, n)
            # explained outputs are probabilities: each row's |φ| add up to at most about 1
            # per class, so a sum beyond the rows is not one an honest site computes
            abs_sum = _per_feature(s["abs_sum"], "shap.abs_sum", features, 0.0, 2.0 * m)
            signed = _per_feature(s["sum"], "shap.sum", features, -2.0 * m, 2.0 * m)
            if any(abs(signed[f]) > abs_sum[f] + TOLERANCE for f in features):
                raise _Bad("shap.sum exceeds shap.abs_sum in magnitude")
            out["shap"] = {"n": m, "abs_sum": abs_sum, "sum": signed}
        if self.parts.get("calibration"):
            c = _obj(body["calibration"], "calibration",
                     ["n", "bin_n", "bin_p", "bin_y", "suppressed"])
            bins = self.bins
            for key in ("bin_n", "bin_p", "bin_y"):
                if not isinstance(c[key], list) or len(c[key]) != bins:
                    raise _Bad(f"calibration.{key} must list {bins} bins")
            bin_n = [_int(v, "calibration.bin_n", 0, n) for v in c["bin_n"]]
            total = _int(c["n"], "calibration.n", 0, n)
            if sum(bin_n) != total:
                raise _Bad("calibration.n is not the sum of its bins' counts")
            bin_p = [_float(v, "calibration.bin_p", b / bins * k, (b + 1) / bins * k)
                     for b, (v, k) in enumerate(zip(c["bin_p"], bin_n))]
            bin_y = [_float(v, "calibration.bin_y", 0.0, k) for v, k in zip(c["bin_y"], bin_n)]
            if not isinstance(c["suppressed"], list) or len(c["suppressed"]) > bins:
                raise _Bad("calibration.suppressed must list bin numbers")
            suppressed = sorted({_int(b, "calibration.suppressed", 0, bins - 1)
                                 for b in c["suppressed"]})
            out["calibration"] = {"n": total, "correct": 0, "bin_n": np.asarray(bin_n),
                                  "bin_p": np.asarray(bin_p), "bin_y": np.asarray(bin_y),
                                  "suppressed": suppressed}
        return out

    def _rejected(self, why: str) -> RejectedResult:
        return RejectedResult(
            f"rejected interpret answer from site {self.site!r} (task {self.task_id}): {why}",
            site=self.site, round=INTERPRET_ROUND, task_id=self.task_id)


@dataclass
class ContributionExpectation:
    """What the server accepts as ``site``'s answer to one batch of ``count`` coalition models:
    ``{"n", "loss": [count], "correct": [count]}`` with ``0 ≤ loss ≤ 100 · n`` and
    ``0 ≤ correct ≤ n`` (:meth:`check`)."""

    site: str
    task_id: str
    count: int

    def check(self, upload: AnalysisResultEnvelope) -> Any:
        from consortium.analytics import wire

        if upload.phase != CONTRIBUTION_PHASE:
            raise self._rejected(
                f"a {peer_text(upload.phase, 40)!r} answer to a contribution task")
        if upload.error is not None:
            return SiteRefusal(peer_text(upload.error, 900), upload.refused)
        try:
            body = _obj(wire.loads(upload.body, limit=64 * self.count + (1 << 20),
                                   what=f"site {self.site!r}'s contribution answer"),
                        "the contribution answer", ["n", "loss", "correct"])
            n = _int(body["n"], "n", 1, MAX_ROWS)
            loss, correct = body["loss"], body["correct"]
            if not isinstance(loss, list) or not isinstance(correct, list) or \
                    len(loss) != self.count or len(correct) != self.count:
                raise _Bad(f"loss and correct must list the batch's {self.count} models")
            return (n, np.asarray([_float(v, "loss", 0.0, WORST_LOSS * n) for v in loss]),
                    np.asarray([_int(v, "correct", 0, n) for v in correct], dtype=np.float64))
        except (_Bad, wire.WireError) as exc:
            raise self._rejected(str(exc)) from None

    def _rejected(self, why: str) -> RejectedResult:
        return RejectedResult(
            f"rejected contribution answer from site {self.site!r} (task {self.task_id}): {why}",
            site=self.site, round=INTERPRET_ROUND, task_id=self.task_id)


@dataclass
class _Asker:
    """Sends one phase's tasks to the sites still in and collects their checked answers."""

    hub: Any
    executor: Any
    timeout: float
    excluded: dict[str, str] = field(default_factory=dict)

    def sites(self) -> list[str]:
        return sorted(s for s in self.hub.roster or () if s not in self.excluded)

    def ask(self, phase: str, requests: Mapping[str, bytes],
            expect: Callable[[str, str], Any], *, answer_bytes: int) -> dict[str, Any]:
        futures: dict[Any, str] = {}
        task_ids = []
        self.hub.answer_bytes = max(answer_bytes, 1 << 20)
        for site, request in requests.items():
            task_id = uuid.uuid4().hex
            futures[self.hub.expect(site, INTERPRET_ROUND, task_id, "analysis",
                                    expect(site, task_id))] = site
            task_ids.append(task_id)
            self.hub.send(site, AnalysisTaskEnvelope(task_id, phase, request))
        from consortium.deploy.analytics import gather_answers

        return gather_answers(self.hub, self.executor, futures, task_ids, phase=phase,
                              timeout=self.timeout, excluded=self.excluded, exclude=self.exclude)

    def exclude(self, site: str, why: str) -> None:
        self.excluded[site] = why
        print(f"consortium server: site {site!r} is left out: {why}", file=sys.stderr,
              flush=True)


# -- interpretation ----------------------------------------------------------------------------


def interpret_request(cfg: Any, params: Any) -> tuple[bytes, dict[str, bool]]:
    """The interpret request (configuration only) and the parts it asks for."""
    from consortium.analytics import wire
    from consortium.interpret.calibration import BINS

    it = cfg.interpret
    parts = {"permutation": it.importance == "permutation", "shap": bool(it.shap),
             "calibration": bool(it.calibration)}
    return wire.dumps({
        **parts, "repeats": it.repeats, "sample": it.sample, "background": it.background,
        "bins": BINS, "model_sha256": model_digest(params.vector),
        "secure": bool(cfg.secure_aggregation.enabled),
    }), parts


def deployed_interpret(hub: Any, executor: Any, cfg: Any, params: Any, factory: Callable[[], Any],
                       *, num_classes: int, timeout: float = 600.0) -> dict[str, Any]:
    """``summary.json``'s ``interpret`` from the deployed sites' sums (see the module docstring);
    a site that refuses or fails is left out, named in ``deployed.excluded`` with why.

    Raises:
        DataError: under secure aggregation, fewer than two sites ready, or the secure total
            failed.
    """
    from consortium.interpret.importance import (
        SiteImportance,
        aggregate_importance,
        feature_groups,
        site_differences,
    )
    from consortium.interpret.shap_summary import SiteShap, aggregate_shap

    it = cfg.interpret
    secure = bool(cfg.secure_aggregation.enabled)
    asker = _Asker(hub, executor, timeout)
    out: dict[str, Any] = {}
    request, parts = interpret_request(cfg, params)
    answers: dict[str, Any] = {}
    if any(parts.values()):
        answers = asker.ask(
            INTERPRET_PHASE, dict.fromkeys(asker.sites(), request),
            lambda s, t: InterpretExpectation(s, t, parts, it.repeats, secure),
            answer_bytes=MAX_ANSWER_BYTES)
    columns: list[str] | None = None
    width = 0
    if answers:
        # the sites must agree on the encoded columns (they encode with the same statistics)
        layouts: dict[Any, list[str]] = {}
        for site, a in answers.items():
            key = (tuple(a[1]) if a[1] else None, a[2]) if secure else (
                tuple(a["columns"]) if a["columns"] else None, a["width"])
            layouts.setdefault(key, []).append(site)
        agreed = max(layouts, key=lambda k: (len(layouts[k]), str(k)))
        for key, sites in layouts.items():
            for site in sites if key != agreed else ():
                asker.exclude(site, "its interpret answer names other feature columns than "
                                    "the other sites'")
                answers.pop(site)
        columns, width = (list(agreed[0]) if agreed[0] else None), agreed[1]
        groups = feature_groups(columns, width)
        if secure:
            from consortium.analytics.secure import LIMBS
            from consortium.interpret.calibration import BINS

            size = sum(int(np.prod(s)) for _, s in secure_keys(list(groups), parts, BINS)) * LIMBS
            for site in [s for s, a in answers.items() if a[3] != size]:
                asker.exclude(site, f"its secure interpret answer is not ready for a total of "
                                    f"{size} digits")
                answers.pop(site)
        out["features"] = {f: [columns[j] if columns else f"x{j}" for j in cols]
                           for f, cols in groups.items()}
        if secure:
            sums = {"(secure total)": _secure_sums(hub, executor, cfg, sorted(answers),
                                                   list(groups), parts, asker)}
        else:
            sums = answers
        if parts["permutation"]:
            perm = {cid: SiteImportance(a["permutation"]["n"], a["permutation"]["repeats"],
                                        a["permutation"]["base_loss"],
                                        a["permutation"]["base_correct"],
                                        a["permutation"]["loss"], a["permutation"]["correct"])
                    for cid, a in sums.items()}
            out["permutation"] = aggregate_importance(perm)
            if secure:
                out["permutation"]["sites"] = {}
            out["permutation"]["differences"] = site_differences(
                out["permutation"]["sites"], ratio=it.ratio)
        if parts["shap"]:
            shaps = {cid: SiteShap(a["shap"]["n"], a["shap"]["abs_sum"], a["shap"]["sum"])
                     for cid, a in sums.items()}
            out["shap"] = aggregate_shap(shaps)
            if secure:
                out["shap"]["sites"] = {}
            out["shap"]["differences"] = site_differences(out["shap"]["sites"], ratio=it.ratio)
        if parts["calibration"]:
            from consortium.interpret.calibration import calibration_summary

            cal = {cid: {k: v for k, v in a["calibration"].items() if k != "suppressed"}
                   for cid, a in sums.items()}
            out["calibration"] = calibration_summary(cal, num_classes=num_classes)
            if secure:
                out["calibration"]["sites"] = {}
            out["calibration"]["suppressed"] = {
                cid: a["calibration"]["suppressed"] for cid, a in sums.items()
                if a["calibration"]["suppressed"]}
    if it.coefficients:
        from consortium.interpret.coefficients import linear_coefficients

        module = factory()
        params.load_into(module)
        if columns is None and width == 0:
            width = params.vector.numel()  # unknown without answers: unnamed columns
        coefficients = linear_coefficients(module, columns, feature_groups(columns, _width(
            module, width)))
        if coefficients is not None:
            out["coefficients"] = coefficients
    out["deployed"] = {
        "sites": sorted(answers), "excluded": dict(sorted(asker.excluded.items())),
        "secure_aggregation": secure,
        "randomness": "each site's own OS CSPRNG (permutations, SHAP sample)",
        "notes": (["under secure aggregation the server holds only the sites' total: "
                   "per-site importances, their differences and per-site calibration are "
                   "not available"] if secure else []),
    }
    return out


def _width(module: Any, fallback: int) -> int:
    linear = [m for m in module.modules() if isinstance(m, torch.nn.Linear)]
    return int(linear[0].in_features) if linear else fallback


def _secure_sums(hub: Any, executor: Any, cfg: Any, ready: list[str], features: list[str],
                 parts: Mapping[str, bool], asker: _Asker) -> dict[str, Any]:
    """The sites' interpret sums added by SecAgg+; the decoded total in the clear answer's shape.

    Raises:
        DataError: fewer than two sites, the protocol aborted, or an impossible total.
    """
    from consortium.analytics.secure import LIMBS, MODULUS_BITS, decode
    from consortium.deploy.secure_total import secure_total
    from consortium.interpret.calibration import BINS

    if len(ready) < 2:
        raise DataError("a secure interpretation needs at least 2 sites (the total of one site "
                        "is its own sums)")
    keys = secure_keys(features, parts, BINS)
    size = sum(int(np.prod(s)) for _, s in keys) * LIMBS
    total_of = secure_total(
        hub, executor, cfg.secure_aggregation, ready, size=size, stage=INTERPRET_STAGE,
        round=INTERPRET_ROUND, context=interpret_context(hub.run_id), modulus_bits=MODULUS_BITS,
        what="the interpretation's secure total")
    for site in total_of.dropped:
        asker.exclude(site, "dropped out of the interpretation's secure total")
    v = decode(total_of.sum, keys, len(total_of.contributors)).values
    out: dict[str, Any] = {"contributors": list(total_of.contributors)}
    if parts.get("permutation"):
        n, base_loss, base_correct = (float(x) for x in v["perm.base"])
        out["permutation"] = {
            "n": round(n), "repeats": cfg.interpret.repeats, "base_loss": base_loss,
            "base_correct": round(base_correct),
            "loss": dict(zip(features, map(float, v["perm.loss"]))),
            "correct": {f: round(float(c)) for f, c in zip(features, v["perm.correct"])}}
    if parts.get("shap"):
        out["shap"] = {"n": round(float(v["shap.n"][0])),
                       "abs_sum": dict(zip(features, map(float, v["shap.abs"]))),
                       "sum": dict(zip(features, map(float, v["shap.sum"])))}
    if parts.get("calibration"):
        from consortium.data.preprocess import category_min_count

        bin_n = np.rint(v["cal.bin_n"]).astype(np.int64)
        if (bin_n < 0).any() or int(bin_n.sum()) != round(float(v["cal.n"][0])):
            raise DataError("the secure calibration total is not one honest sites could produce")
        # the total's bins below the experiment's min_count are suppressed (the sites
        # suppress nothing themselves under secure aggregation: the total is the release)
        small = (bin_n > 0) & (bin_n < category_min_count(analysis=cfg.analysis.min_count))
        keep = ~small
        out["calibration"] = {"n": int(bin_n[keep].sum()), "correct": 0,
                              "bin_n": np.where(keep, bin_n, 0),
                              "bin_p": np.where(keep, np.asarray(v["cal.bin_p"]), 0.0),
                              "bin_y": np.where(keep, np.asarray(v["cal.bin_y"]), 0.0),
                              "suppressed": [int(b) for b in np.flatnonzero(small)]}
    return out


# -- contribution ------------------------------------------------------------------------------


@dataclass
class RemoteUtility:
    """``v(model)`` evaluated at the deployed sites: batches of models out, per-model loss and
    correct sums back, pooled over the sites that answered every batch. Caches by the model's
    digest, so an estimator asks only for models it has not seen."""

    asker: _Asker
    utility: str
    cache: dict[str, float] = field(default_factory=dict)
    evaluations: int = 0  # distinct models the sites evaluated
    sites: list[str] = field(default_factory=list)

    @staticmethod
    def key(vector: torch.Tensor) -> str:
        return hashlib.sha256(vector.detach().to(torch.float32).contiguous().numpy()
                              .tobytes()).hexdigest()

    def evaluate_all(self, vectors: Sequence[torch.Tensor]) -> None:
        """Evaluate every vector not yet in the cache at the sites (in batches)."""
        from consortium.analytics import wire

        todo: dict[str, torch.Tensor] = {}
        for v in vectors:
            k = self.key(v)
            if k not in self.cache:
                todo.setdefault(k, v)
        if not todo:
            return
        if len(todo) + self.evaluations > MAX_CONTRIBUTION_MODELS:
            raise DataError(
                f"the contribution needs {len(todo) + self.evaluations} coalition models, over "
                f"the {MAX_CONTRIBUTION_MODELS} a site evaluates per run; use fewer "
                "contribution.permutations or leave-one-out")
        keys = list(todo)
        d = todo[keys[0]].numel()
        per_batch = max(1, BATCH_BYTES // (4 * d))
        for start in range(0, len(keys), per_batch):
            chunk = keys[start:start + per_batch]
            raw = torch.stack([todo[k].detach().to(torch.float32) for k in chunk]).numpy()
            request = wire.dumps({"count": len(chunk), "size": d,
                                  "models": base64.b64encode(raw.astype("<f4").tobytes())
                                  .decode("ascii")})
            got = self.asker.ask(
                CONTRIBUTION_PHASE, dict.fromkeys(self.asker.sites(), request),
                _batch_expectation(len(chunk)), answer_bytes=64 * len(chunk) + (1 << 20))
            if not got:
                raise DataError("no site evaluated the coalition models; excluded: " + "; ".join(
                    f"{s}: {why}" for s, why in sorted(self.asker.excluded.items())))
            # a site that misses a batch is out of every value, so that each v(S) is
            # measured on the same rows
            for site in [s for s in self.sites if s not in got] if self.sites else ():
                raise DataError(f"site {site!r} stopped evaluating coalition models midway "
                                "(" + self.asker.excluded.get(site, "no answer") + "); the "
                                "scores would mix different validation rows")
            self.sites = sorted(got)
            n = sum(a[0] for a in got.values())
            loss = sum(a[1] for a in got.values()) / n
            acc = sum(a[2] for a in got.values()) / n
            values = -np.minimum(loss, WORST_LOSS) if self.utility == "loss" else acc
            for k, value in zip(chunk, values.tolist()):
                self.cache[k] = float(value)
            self.evaluations += len(chunk)

    def __call__(self, vector: torch.Tensor) -> float:
        k = self.key(vector)
        if k not in self.cache:
            self.evaluate_all([vector])
        return self.cache[k]


def _batch_expectation(count: int) -> Callable[[str, str], ContributionExpectation]:
    return lambda site, task_id: ContributionExpectation(site, task_id, count)


def deployed_contribution(recorder: Any, asker: _Asker,
                          per_client: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """``summary.json``'s ``contribution`` for a deployment: every recorded round scored with
    coalition models evaluated at the sites (batched: first every coalition the estimator
    could ask for with its stopping rules off — the permutations drawn do not depend on the
    values — then the estimator with its own rules on the cached values)."""
    from consortium.contribution.recording import benefit, combine_rounds, score_round

    settings = recorder.settings
    utility = RemoteUtility(asker, settings.utility)
    rounds = list(recorder.kept)
    # pass 1: the superset, values unknown (a stand-in 0), stopping rules off
    wide = dataclasses.replace(settings, truncation=0.0, between=0.0, convergence=-1.0)
    wanted: list[torch.Tensor] = []

    def stand_in(vector: torch.Tensor) -> float:
        wanted.append(vector)
        return 0.0

    for rnd in rounds:
        score_round(rnd, stand_in, wide)
    utility.evaluate_all(wanted)
    results = [score_round(rnd, utility, settings) for rnd in rounds]
    out = combine_rounds(results, recorder.sites, settings)
    out["benefit"], out["benefit_basis"] = benefit(per_client)
    out["recorded"] = bool(recorder.record and recorder.directory is not None)
    out["deployed"] = {"validation": "the test splits of sites " + ", ".join(utility.sites),
                       "models_evaluated": utility.evaluations,
                       "excluded": dict(sorted(asker.excluded.items()))}
    return out


def finish_deployed_run(run_dir: Any, hub: Any, executor: Any, cfg: Any, result: Any,
                        fed: Any, *, timeout: float) -> None:
    """After ``consortium server``'s last round: ``[interpret]`` and ``[contribution]`` with the
    sites, added to ``summary.json`` (and the report rewritten). A failure is printed and
    recorded in the summary; the trained model stays."""
    import json
    from pathlib import Path

    from consortium.interpret.summary import enabled

    summary = dict(result.summary)
    changed = False
    if enabled(cfg.interpret):
        try:
            summary["interpret"] = deployed_interpret(
                hub, executor, cfg, result.params, fed.factory,
                num_classes=int(fed.dataset.num_classes), timeout=timeout)
        except ConsortiumError as exc:  # the trained model stays; the summary says why
            summary["interpret"] = {"error": str(exc)}
            print(f"consortium server: no interpretation: {exc}", file=sys.stderr, flush=True)
        changed = True
    recorder = getattr(fed, "contribution", None)
    if recorder is not None and getattr(recorder, "kept", None) is not None:
        try:
            summary["contribution"] = deployed_contribution(
                recorder, _Asker(hub, executor, timeout), summary.get("per_client") or {})
        except ConsortiumError as exc:  # the trained model stays; the summary says why
            summary["contribution"] = {"method": cfg.contribution.method, "error": str(exc)}
            print(f"consortium server: no contribution scores: {exc}", file=sys.stderr,
                  flush=True)
        changed = True
    if not changed:
        return
    result.summary.clear()
    result.summary.update(summary)
    if run_dir is not None:
        from consortium.simulation import _finite

        path = Path(run_dir) / "summary.json"
        path.write_text(json.dumps(_finite(_plain(summary)), indent=2), encoding="utf-8")
        from consortium.reporting.report import write_report

        write_report(Path(run_dir))


def _plain(obj: Any) -> Any:
    """numpy values as JSON's."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj
