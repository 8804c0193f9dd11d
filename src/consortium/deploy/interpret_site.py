"""A deployed site's side of interpretability and contribution after the last round (issue 19).

After training, ``consortium server`` asks every site two things, as analysis tasks
(``AnalysisTask`` out, ``AnalysisResult`` back, canonical JSON of
:mod:`consortium.analytics.wire`):

- ``interpret``: the ``[interpret]`` settings only (what to compute, ``repeats``, ``sample``,
  ``background``, the 10 calibration bins), the feature groups the server expects and the
  SHA-256 of the final model — configuration, never code or rows. The site explains the
  final model *it received* in the last evaluation task (it refuses if the digest names
  another model), on its own test split, with its own OS CSPRNG for the permutations and the
  SHAP sample (:class:`~consortium.privacy.randomness.SystemRandomness`; never a seed the
  server sent), and returns only sums: per feature the permuted loss and correct count
  (:class:`~consortium.interpret.importance.SiteImportance`), ``Σ |φ|`` and ``Σ φ``
  (:class:`~consortium.interpret.shap_summary.SiteShap`), and per calibration bin the count,
  ``Σ p`` and ``Σ y``. Disclosure control as the analytics' (DataSHIELD's ``nfilter``): the
  larger of the site policy's ``min_count`` and the experiment's ``analysis.min_count``
  (:func:`~consortium.data.preprocess.category_min_count`) is the fewest rows any sum may
  cover — a test split, a SHAP sample or a background below it is refused, a calibration bin
  below it is suppressed (count and sums 0, named in ``suppressed``). Under secure
  aggregation the site answers ``{"ready": true, "size": N}`` and its sums travel masked
  through SecAgg+ (then, as in the analytics' secure totals, the bins of the total are the
  ones suppressed below the experiment's ``analysis.min_count``, by the server) (:class:`~consortium.deploy.secure_total.SecureTotalSite`; fixed point of
  :mod:`consortium.analytics.secure`): the server learns only their total over the sites.
- ``contribution``: a batch of coalition models (raw float32 vectors of the experiment's
  model, base64); the site returns, per model, the summed cross-entropy and correct count
  on its test split and the split's size — what a federated evaluation returns, per model.

Each part is answered at most once per run for ``interpret`` and for at most
:data:`MAX_CONTRIBUTION_MODELS` models in all, so a hostile server cannot turn either into an
oracle it queries at will. A site's policy may refuse either (``interpret = false``,
``contribution = false`` in its policy file; both default to true, as a DataSHIELD server
allows its aggregate functions under its disclosure settings).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from consortium.deploy.codec import AnalysisResultEnvelope, AnalysisTaskEnvelope
from consortium.errors import ConsortiumError

__all__ = [
    "CONTRIBUTION_PHASE", "INTERPRET_PHASE", "INTERPRET_ROUND", "INTERPRET_STAGE",
    "MAX_CONTRIBUTION_MODELS", "InterpretSite", "interpret_context", "model_digest",
    "secure_keys",
]

log = logging.getLogger("consortium.client")

INTERPRET_PHASE = "interpret"
CONTRIBUTION_PHASE = "contribution"
INTERPRET_STAGE = "interpret"
"""The SecAgg+ stage name of the interpretation's secure total (apart from training's)."""
INTERPRET_ROUND = 1
MAX_INTERPRET_REQUEST_BYTES = 1 << 20
MAX_CONTRIBUTION_MODELS = 1 << 16
"""The most coalition models a site evaluates in one run (every batch together)."""
MAX_REPEATS = 100
MAX_ROWS = 100_000
MAX_REASON_CHARS = 900
WORST_LOSS = 100.0  # as consortium.contribution.recording.WORST_LOSS: a broken model's loss


class Refusal(ConsortiumError):
    """The site refuses under its own rules; the message names rules, never a row value."""


def model_digest(vector: torch.Tensor) -> str:
    """SHA-256 (hex) of a parameter vector's float32 bytes: how the server names the final
    model and the site checks it is the one it evaluated."""
    flat = vector.detach().to(torch.float32).contiguous().cpu().numpy()
    return hashlib.sha256(flat.tobytes()).hexdigest()


def interpret_context(run_id: str) -> bytes:
    """The SecAgg context of run ``run_id``'s interpretation total: binds keys, masks and
    signatures to that run and apart from training's, the encoding's and an analysis'."""
    return b"consortium/interpret/v1/" + run_id.encode()


def secure_keys(features: Sequence[str], parts: Mapping[str, bool],
                bins: int) -> list[tuple[str, tuple[int, ...]]]:
    """The layout of the sums one site contributes to the secure total, in the order both sides
    encode them (:func:`consortium.analytics.secure.encode`)."""
    f = (len(features),)
    keys: list[tuple[str, tuple[int, ...]]] = []
    if parts.get("permutation"):
        keys += [("perm.base", (3,)), ("perm.correct", f), ("perm.loss", f)]
    if parts.get("shap"):
        keys += [("shap.abs", f), ("shap.n", (1,)), ("shap.sum", f)]
    if parts.get("calibration"):
        keys += [("cal.bin_n", (bins,)), ("cal.bin_p", (bins,)), ("cal.bin_y", (bins,)),
                 ("cal.n", (1,))]
    return keys


def _int(data: Mapping[str, Any], key: str, low: int, high: int) -> int:
    v = data.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
        raise Refusal(f"the request's {key} = {str(v)[:40]} is not an integer in [{low}, {high}]")
    return v


class InterpretSite:
    """The site's answers to ``interpret`` and ``contribution`` tasks in a training run.

    Args:
        site: the site's name.
        client: its :class:`~consortium.client.app.SiteClient` (data, model factory,
            environment with the site's CSPRNG).
        feature_names: its data set's encoded column names (``None``: unnamed columns).
        policy: its :class:`~consortium.privacy.policy.SitePolicy`, or ``None``.
        cfg: the experiment it joined.
        identity, floor: its SecAgg+ signing identity and minimums (secure aggregation).
    """

    def __init__(self, site: str, client: Any, feature_names: Sequence[str] | None, *,
                 policy: Any, cfg: Any, identity: Any = None, floor: Any = None) -> None:
        from consortium.data.preprocess import category_min_count

        self.site, self.client, self.cfg = site, client, cfg
        self.names = list(feature_names) if feature_names else None
        self.policy = policy
        self.min_count = category_min_count(policy=getattr(policy, "min_count", 0),
                                            analysis=cfg.analysis.min_count)
        self.identity, self.floor = identity, floor
        self.final: tuple[int, Any] | None = None  # (round, Parameters) of the last evaluation
        self.interpreted = False
        self.evaluated_models = 0
        self._total: Any = None  # the SecureTotalSite of a secure interpretation

    def saw(self, round: int, parameters: Any) -> None:
        """Keep the model of the latest evaluation task (the final model after the last round)."""
        if self.final is None or round >= self.final[0]:
            self.final = (round, parameters)

    # -- tasks -----------------------------------------------------------------------------

    def answer(self, task: AnalysisTaskEnvelope) -> AnalysisResultEnvelope:
        """The site's answer to ``task``: its body, or a refusal with a reason safe to send."""
        from consortium.analytics import wire

        try:
            if task.phase == INTERPRET_PHASE:
                data = wire.loads(task.request, limit=MAX_INTERPRET_REQUEST_BYTES,
                                  what="the server's interpret request")
                body = self._interpret(data)
            elif task.phase == CONTRIBUTION_PHASE:
                data = wire.loads(task.request, limit=len(task.request) + 1,
                                  what="the server's contribution request")
                body = self._contribution(data)
            else:
                raise Refusal(f"a training site answers {INTERPRET_PHASE!r} and "
                              f"{CONTRIBUTION_PHASE!r} tasks, not {task.phase[:40]!r}")
            return AnalysisResultEnvelope(task.task_id, task.phase, wire.dumps(body))
        except (Refusal, wire.WireError) as exc:
            log.warning("refused the %s: %s", task.phase[:40], exc)
            reason, refused = str(exc), True
        except Exception:
            log.exception("answering the %s failed", task.phase[:40])
            reason, refused = (f"site {self.site!r} could not answer the {task.phase[:40]} (the "
                               "details stay in the site's log)"), False
        return AnalysisResultEnvelope(task.task_id, task.phase, error=reason[:MAX_REASON_CHARS],
                                      refused=refused)

    def respond(self, stage: str, phase: str, message: Any, *, round: int) -> Any:
        """The site's side of one SecAgg+ phase of the interpretation's secure total."""
        if self._total is None:
            raise Refusal("no secure interpretation total is open at this site")
        return self._total.respond(stage, phase, message, round=round)

    # -- interpret -------------------------------------------------------------------------

    def _interpret(self, data: Any) -> dict[str, Any]:
        from consortium.interpret.calibration import BINS
        from consortium.interpret.importance import feature_groups

        if self.policy is not None and not getattr(self.policy, "interpret", True):
            raise Refusal(f"site {self.site!r}'s policy refuses interpretability (interpret = false)")
        if self.interpreted:
            raise Refusal(f"site {self.site!r} interprets the final model once per run")
        if not isinstance(data, dict):
            raise Refusal("an interpret request is a JSON object")
        allowed = {"model_sha256", "permutation", "shap", "calibration", "repeats", "sample",
                   "background", "bins", "secure"}
        extra = sorted(set(data) - allowed)
        if extra:
            raise Refusal(f"unknown interpret request fields {extra[:5]}")
        parts = {k: data.get(k) is True for k in ("permutation", "shap", "calibration")}
        secure = data.get("secure") is True
        if secure != bool(self.cfg.secure_aggregation.enabled):
            raise Refusal("the request's secure flag differs from the experiment's "
                          "secure_aggregation.enabled")
        if _int(data, "bins", 1, 1000) != BINS:
            raise Refusal(f"this site computes calibration in {BINS} equal-width bins, not "
                          f"{data.get('bins')}")
        repeats = _int(data, "repeats", 1, MAX_REPEATS)
        k = self.min_count
        sample = _int(data, "sample", 1, MAX_ROWS)
        background = _int(data, "background", 1, MAX_ROWS)
        if self.final is None:
            raise Refusal(f"site {self.site!r} holds no final model: it did not take part in "
                          "the last evaluation")
        rnd, params = self.final
        if data.get("model_sha256") != model_digest(params.vector):
            raise Refusal(f"the model named is not the one site {self.site!r} evaluated last "
                          f"(round {rnd}); it explains only the final model it received")
        test, train = self.client.data.test, self.client.data.train
        n = len(test)
        if n < k:
            raise Refusal(f"site {self.site!r} holds fewer test rows than its min_count ({k}): "
                          "nothing computed on them leaves the site")
        width = int(np.prod(test.x.shape[1:]))
        groups = feature_groups(self.names, width)
        if parts["shap"] and (min(sample, n) < k or min(background, len(train)) < k):
            raise Refusal(
                f"site {self.site!r} explains SHAP values only over at least min_count = {k} "
                f"rows and background rows (asked: sample {sample}, background {background}; "
                f"it holds {n} test and {len(train)} training rows)")
        self.interpreted = True  # one answer per run, refused or not from here on
        module = self.client.model_factory()
        params.load_into(module)
        module.eval()
        rng = _site_rng(self.client, "permutation", self.site)
        # the encoded column names are the experiment's (every site encodes alike): the server
        # rebuilds the feature groups from them and checks that the sites agree
        sums: dict[str, Any] = {"n": n, "columns": self.names, "width": width}
        if parts["permutation"]:
            from consortium.interpret.importance import site_permutation_importance

            s = site_permutation_importance(module, test.x, test.y, groups, repeats=repeats,
                                            rng=rng)
            sums["permutation"] = {"n": s.n, "repeats": s.repeats, "base_loss": s.base_loss,
                                   "base_correct": s.base_correct, "loss": s.loss,
                                   "correct": s.correct}
        if parts["shap"]:
            from consortium.interpret.shap_summary import site_shap
            from consortium.interpret.summary import _choose

            srng = _site_rng(self.client, "shap", self.site)
            rows = test.x[_choose(srng, n, sample)]
            back = train.x[_choose(srng, len(train), background)]
            sh = site_shap(module, rows, back, groups, num_classes=int(self.client.num_classes),
                           seed=int(srng.integers(2**32)))
            sums["shap"] = {"n": sh.n, "abs_sum": sh.abs_sum, "sum": sh.sum}
        if parts["calibration"]:
            from consortium.interpret.calibration import site_calibration_counts

            c = site_calibration_counts(module, test.x, test.y,
                                        num_classes=int(self.client.num_classes))
            bin_n = np.asarray(c["bin_n"], dtype=np.int64)
            # under secure aggregation only the total is read: it is the one suppressed
            # (as the analytics' secure totals, consortium.deploy.analytics)
            small = (bin_n > 0) & (bin_n < k) & (not secure)
            keep = ~small
            sums["calibration"] = {
                "n": int(bin_n[keep].sum()),
                "bin_n": [int(v) for v in np.where(keep, bin_n, 0)],
                "bin_p": [float(v) for v in np.where(keep, c["bin_p"], 0.0)],
                "bin_y": [float(v) for v in np.where(keep, c["bin_y"], 0.0)],
                "suppressed": [int(b) for b in np.flatnonzero(small)],
            }
        if not secure:
            return sums
        ready = self._load_secure(sums, list(groups), parts, BINS)
        return {**ready, "columns": self.names, "width": width}

    def _load_secure(self, sums: Mapping[str, Any], features: list[str],
                     parts: Mapping[str, bool], bins: int) -> dict[str, Any]:
        """Put the sums into this run's one secure total; the clear answer says only "ready"."""
        from consortium.analytics.secure import LIMBS, MODULUS_BITS, encode
        from consortium.analytics.site import Answer
        from consortium.deploy.secure_total import SecureTotalSite

        keys = secure_keys(features, parts, bins)
        answer = Answer(self.site)
        for key, value in _flatten(sums, features).items():
            if any(key == k for k, _ in keys):
                answer.put(key, np.asarray(value, dtype=np.float64))
        self._total = SecureTotalSite(
            self.site, stage=INTERPRET_STAGE, round=INTERPRET_ROUND,
            context=interpret_context(self.client.environment.run_id if
                                      self.client.environment is not None else ""),
            modulus_bits=MODULUS_BITS, what="the interpretation's secure total",
            identity=self.identity, floor=self.floor)
        self._total.load(encode(answer, keys))
        return {"ready": True, "size": sum(int(np.prod(s)) for _, s in keys) * LIMBS}

    # -- contribution ----------------------------------------------------------------------

    def _contribution(self, data: Any) -> dict[str, Any]:
        if self.policy is not None and not getattr(self.policy, "contribution", True):
            raise Refusal(f"site {self.site!r}'s policy refuses contribution scoring "
                          "(contribution = false)")
        if not isinstance(data, dict) or set(data) != {"count", "size", "models"}:
            raise Refusal('a contribution request is {"count", "size", "models"}')
        module = self.client.model_factory()
        template = _parameters_of(module)
        d = template.vector.numel()
        count = _int(data, "count", 1, MAX_CONTRIBUTION_MODELS)
        if _int(data, "size", 1, 1 << 40) != d:
            raise Refusal(f"the models have {data.get('size')} parameters; this experiment's "
                          f"model has {d}")
        if self.evaluated_models + count > MAX_CONTRIBUTION_MODELS:
            raise Refusal(f"site {self.site!r} evaluates at most {MAX_CONTRIBUTION_MODELS} "
                          "coalition models per run")
        if not isinstance(data["models"], str):
            raise Refusal("the models are one base64 string")
        try:
            raw = base64.b64decode(data["models"], validate=True)
        except (binascii.Error, ValueError):
            raise Refusal("the models are not valid base64") from None
        if len(raw) != count * d * 4:
            raise Refusal(f"the models hold {len(raw)} bytes, not {count} × {d} float32")
        test = self.client.data.test
        n = len(test)
        if n < self.min_count:
            raise Refusal(f"site {self.site!r} holds fewer test rows than its min_count "
                          f"({self.min_count}): nothing computed on them leaves the site")
        self.evaluated_models += count
        vectors = torch.from_numpy(np.frombuffer(raw, dtype="<f4").reshape(count, d).copy())
        labels = test.y.long()
        loss, correct = [], []
        module.eval()
        for v in vectors:
            if not bool(torch.isfinite(v).all()):
                loss.append(WORST_LOSS * n)
                correct.append(0)
                continue
            template.replace(v).load_into(module)
            with torch.no_grad():
                logits = module(test.x).double()
            if not bool(torch.isfinite(logits).all()):
                loss.append(WORST_LOSS * n)
                correct.append(0)
                continue
            ce = float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
            loss.append(min(ce, WORST_LOSS * n))
            correct.append(int((logits.argmax(1) == labels).sum()))
        return {"n": n, "loss": loss, "correct": correct}


def _parameters_of(module: torch.nn.Module) -> Any:
    from consortium.types import Parameters

    return Parameters.from_module(module)


def _site_rng(client: Any, part: str, site: str) -> np.random.Generator:
    """A numpy generator keyed from the site's own CSPRNG (its environment's randomness):
    fresh OS randomness for every interpretation, never a seed the server sent (``part`` and
    ``site`` name the draw; a test replaces this function to repeat a simulation's draws)."""
    env = client.environment
    if env is None or env.randomness is None:
        raise Refusal("this site has no randomness of its own to shuffle with")
    return np.random.default_rng(int(env.randomness.seed63()))


def _flatten(sums: Mapping[str, Any], features: Sequence[str]) -> dict[str, Any]:
    """A site's interpret sums as the secure total's named vectors (:func:`secure_keys`)."""
    out: dict[str, Any] = {}
    p = sums.get("permutation")
    if p is not None:
        out["perm.base"] = [p["n"], p["base_loss"], p["base_correct"]]
        out["perm.loss"] = [p["loss"][f] for f in features]
        out["perm.correct"] = [p["correct"][f] for f in features]
    s = sums.get("shap")
    if s is not None:
        out["shap.n"] = [s["n"]]
        out["shap.abs"] = [s["abs_sum"][f] for f in features]
        out["shap.sum"] = [s["sum"][f] for f in features]
    c = sums.get("calibration")
    if c is not None:
        out["cal.n"] = [c["n"]]
        out["cal.bin_n"], out["cal.bin_p"], out["cal.bin_y"] = c["bin_n"], c["bin_p"], c["bin_y"]
    return out
