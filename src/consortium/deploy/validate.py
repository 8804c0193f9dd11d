"""Checks every incoming result against the task it answers, before it touches the model.

A deployed server receives results from other institutions' machines. Decoding
(:mod:`consortium.deploy.codec`) only guarantees well-formed tensors; this module checks that a
result is the answer to the task the server sent to that site in this round, exactly once, with
the model's layout, the extras its algorithm and stages declare (names, shapes, dtypes, value
bounds), finite values of a sane magnitude and a sane weight, within a size limit. A failed
check raises :class:`RejectedResult` whose message is the log line: it names the site, round
and task, and what was wrong. The server logs it and goes on without the result; it never crashes on one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, MutableSet
from dataclasses import dataclass
from typing import Any, Final

import torch

from consortium.aggregation.base import ExtraSpec
from consortium.deploy.codec import EvaluationEnvelope, ResultEnvelope
from consortium.errors import ConsortiumError
from consortium.types import Layout, Update

__all__ = [
    "DEFAULT_MAX_WEIGHT",
    "MAX_UPDATE_NORM",
    "PERSONALIZED",
    "RELATIVE_NORM_CAP",
    "ExpectedTask",
    "RejectedResult",
    "max_encoded_bytes",
    "update_norm_cap",
    "validate_evaluation",
    "validate_result",
]

_UNIT_METRICS: Final = frozenset({"accuracy", "balanced_accuracy", "auc"})

PERSONALIZED: Final = "personalized_"
"""The prefix of a site's own model's metrics in its evaluation (personalised algorithms and
fine-tuning): ``personalized_accuracy`` beside the global model's ``accuracy``."""

DEFAULT_MAX_WEIGHT: Final = 1e9
"""Largest aggregation weight (or evaluation example count) accepted by default: weights are
sample counts."""


MAX_UPDATE_NORM: Final = 1e14
"""The largest L2 norm of any update or extra, whatever the model: the robust rules compute
squared norms and pairwise distances in float32, which overflow at 1.8e19; a sum or difference
of up to 2**16 updates of norm 1e14 stays below that ((2**16 · 1e14)² = 4e37 < 3.4e38)."""

RELATIVE_NORM_CAP: Final = 1e6
"""An update may be at most this many times the global model's L2 norm (see
:func:`update_norm_cap`)."""


def update_norm_cap(model_norm: float) -> float:
    """The largest L2 norm of an update that can still be training: ``min(1e6 · max(1, ‖x‖₂),
    1e14)`` for a global model ``x``.

    A round of local SGD moves a model by a fraction of its own size (a learning rate times a
    few epochs of gradients); a delta a million times the model is not training but an attempt
    to overflow the aggregate (the review's 3e38 made every honest site's loss NaN for the rest
    of the run). ``max(1, ·)`` leaves room for a model that starts at or near zero.
    :data:`MAX_UPDATE_NORM` keeps the float32 arithmetic of the aggregation rules finite. A
    single coordinate is at most the norm, so one coordinate of 3e38 is refused as well.
    Plausible but large updates are the adaptive norm bound's business, not this cap's.
    """
    if not math.isfinite(model_norm):
        return MAX_UPDATE_NORM
    return min(RELATIVE_NORM_CAP * max(1.0, model_norm), MAX_UPDATE_NORM)


class RejectedResult(ConsortiumError):
    """An incoming result failed validation; the message is the line to log.

    Attributes:
        site: the authenticated site that sent it.
        round: the server's current round.
        task_id: the task id the result named.
        reason: the full message.
    """

    def __init__(self, reason: str, *, site: str, round: int, task_id: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.site = site
        self.round = round
        self.task_id = task_id


_Reject = Callable[[str], RejectedResult]


@dataclass(frozen=True, kw_only=True)
class ExpectedTask:
    """What the server knows about the task a result must answer.

    Attributes:
        site: the site's identity as authenticated by the transport (its session, its TLS
            certificate), never what the result claims.
        round: the server's current round.
        task_id: the id of the task the server sent to ``site`` this round.
        extras: the extras an update must carry, name -> :class:`ExtraSpec` (shape, dtype,
            value bounds; a bare shape means float32 without bounds), as the algorithm and the
            pipeline's stages declare them (SCAFFOLD's control-variate delta, FedNova's
            ``w·a``, central DP's clipping bit); ``None`` accepts any names and shapes (their
            dtype, values and magnitude are still checked).
        secure: the update's values travel through secure aggregation, so its delta is empty
            and only the extras' shapes come in the clear (``SecureAggregation``).
        max_norm: the largest L2 norm of the delta (:func:`update_norm_cap` of the global
            model the task carries).
        shared: under a personalised algorithm (FedPer, FedRep), the model's shared tensors
            (:func:`consortium.deploy.shared.shared_layout`): the delta must hold exactly
            these, named in the result, and no personal one; ``None``: the whole model.
        compression: the run's :class:`~consortium.compression.Compress` stage (``[compression]
            uplink``): the update must carry an encoding of its kind, which must decode for the
            model (:func:`consortium.compression.encoded.decode`); ``None``: a dense delta.
    """

    site: str
    round: int
    task_id: str
    extras: Mapping[str, ExtraSpec | tuple[int, ...]] | None = None
    secure: bool = False
    max_norm: float = MAX_UPDATE_NORM
    shared: Layout | None = None
    compression: Any = None


def validate_result(
    envelope: ResultEnvelope,
    *,
    expected: ExpectedTask,
    layout: Layout,
    max_bytes: int,
    seen_task_ids: MutableSet[str],
    max_weight: float = DEFAULT_MAX_WEIGHT,
) -> torch.Tensor | None:
    """Accept ``envelope`` as the answer to ``expected``, or raise why not.

    Checks, in order: the sender is the authenticated site; the round is the current one; the
    task id is the expected one and was not answered before (no replay); the result is within
    ``max_bytes`` (on the wire and in tensor data); it carries an update or an error, not both;
    the delta is flat float32 with ``layout.size`` values (empty when ``expected.secure``;
    under a personalised algorithm, ``expected.shared``: it names exactly the shared tensors and
    holds their values only — a site that sends a personal tensor, or the whole model, is
    rejected, its values never used); the extras have the expected names, shapes and dtypes; delta and extras are finite and not of
    absurd magnitude (L2 norm within ``expected.max_norm``, :data:`MAX_UPDATE_NORM` for
    extras); weight and metrics are finite; the weight is in ``[0, max_weight]``; every extra
    is within its declared bounds. A result without an update (the client failed or refused)
    passes with the first checks only.

    Under uplink compression (``expected.compression``) the update carries an encoding instead
    of the delta: it must be the run's kind, within the bytes that kind needs for this model
    (:func:`max_encoded_bytes`, checked before anything is decoded), and decode strictly
    (:meth:`consortium.compression.Compress.decoded`: indices in range and increasing, lengths
    that agree with the header and the model, codes in range, finite values); the decoded
    delta then takes the dense delta's checks (magnitude; under a personalised algorithm, zeros
    at the personal coordinates: the encoding stands for the whole model).

    Once the sender, round and task id check out, the task id is added to ``seen_task_ids``,
    whether the rest passes or not: a site answers a task once, and cannot probe the checks
    with variants of a result.

    Args:
        envelope: the decoded result (:func:`consortium.deploy.codec.decode_upload`).
        expected: the task the authenticated site was given this round.
        layout: the global model's layout.
        max_bytes: the largest result accepted, in bytes.
        seen_task_ids: the task ids already answered in this run; updated in place.
        max_weight: the largest aggregation weight accepted.

    Returns:
        The dense delta a compressed update decodes to (for the audit log's digest), else
        ``None``.

    Raises:
        RejectedResult: the first check that failed; its message names the site, round and
            task, and what was wrong.
    """
    result = envelope.result
    reject = _rejecter("result", expected, envelope.task_id)

    _check_identity(
        envelope.task_id, result.client_id, result.round, expected, seen_task_ids, reject
    )
    size = max(envelope.nbytes, result.nbytes)
    if size > max_bytes:
        raise reject(f"{size} bytes exceed the limit of {max_bytes} bytes")
    update = result.update
    if update is None:
        if result.error is None and not result.refused:
            raise reject("it carries neither an update nor an error")
        return None
    if result.error is not None or result.refused:
        raise reject("it carries an update together with an error or a refusal")
    decoded = None
    if update.encoded is not None or expected.compression is not None:
        decoded = _decoded(update, expected, layout, reject, envelope.parts)
    _check_update(update, expected, layout, max_weight, reject, envelope.parts, decoded)
    return decoded


def validate_evaluation(
    envelope: EvaluationEnvelope,
    *,
    expected: ExpectedTask,
    max_bytes: int,
    seen_task_ids: MutableSet[str],
    max_examples: float = DEFAULT_MAX_WEIGHT,
) -> None:
    """Accept an evaluation result as the answer to ``expected``, or raise why not.

    Checks the sender, round and task id (no replay) as :func:`validate_result` does, the size,
    that the number of examples (the weight of the site's metrics in the federated average)
    is at most ``max_examples``, and that every metric is finite.

    Raises:
        RejectedResult: the first check that failed.
    """
    result = envelope.result
    reject = _rejecter("evaluation", expected, envelope.task_id)

    _check_identity(
        envelope.task_id, result.client_id, result.round, expected, seen_task_ids, reject
    )
    if envelope.nbytes > max_bytes:
        raise reject(f"{envelope.nbytes} bytes exceed the limit of {max_bytes} bytes")
    if result.num_examples > max_examples:
        raise reject(f"{result.num_examples} examples exceed the limit of {max_examples:g}")
    _check_metrics(result.metrics, reject)
    # a metric out of its range would pull the federated average anywhere it likes (a site's
    # own model's metrics, ``personalized_<name>``, as much as the global model's)
    for name, value in sorted(result.metrics.items()):
        base = name.removeprefix(PERSONALIZED).removeprefix("local_")  # local-only baseline
        if base in _UNIT_METRICS and not 0.0 <= value <= 1.0:
            raise reject(f"metric {name!r} = {value:g} is outside [0, 1]")
        if base == "loss" and value < 0:
            raise reject(f"metric {name!r} = {value:g} is negative")


def _check_identity(
    task_id: str,
    client_id: str,
    round: int,
    expected: ExpectedTask,
    seen_task_ids: MutableSet[str],
    reject: _Reject,
) -> None:
    if client_id != expected.site:
        raise reject(f"it claims to come from client {client_id!r}")
    if round != expected.round:
        raise reject(f"it answers round {round}, but the current round is {expected.round}")
    if task_id in seen_task_ids:
        raise reject("the task was already answered (a replayed result)")
    if task_id != expected.task_id:
        raise reject(f"unknown task id; the task sent to this site is {expected.task_id!r}")
    seen_task_ids.add(task_id)


def max_encoded_bytes(kind: str, size: int, header: tuple[int, ...] = ()) -> int:
    """The most bytes an honest encoding of ``kind`` takes for a ``size``-value model
    (:attr:`consortium.compression.Encoded.nbytes`): top-k sends at most every coordinate (an
    int32 index and a float32 value), random-k a float32 value per kept coordinate, fp16/bf16
    two bytes a coordinate, QSGD and int up to 8 bits a coordinate and a float32 scale per chunk
    of at least one, sign one bit a coordinate; the kind's name and ``1 + len(header)``
    integers of 8 bytes besides. A received encoding above it is refused before it is decoded:
    no header can make the server allocate more than the model's size allows."""
    per = {"topk": 8 * size, "randk": 4 * size, "fp16": 2 * size, "bf16": 2 * size,
           "qsgd": size + 4 * size, "int": size + 4 * size, "sign": (size + 7) // 8,
           # compact top-k: float32 values at most, remainders of at most size.bit_length()
           # bits and a unary part of at most size bits (consortium.compression.rice)
           "sparse": 4 * size + (size * size.bit_length() + 7) // 8 + (size + 7) // 8}
    return per.get(kind, 4 * size) + len(kind.encode()) + 8 * (1 + len(header))


def _decoded(
    update: Update, expected: ExpectedTask, layout: Layout, reject: _Reject,
    parts: Layout | None,
) -> torch.Tensor:
    """The dense delta of a compressed update, after every check of its encoding."""
    from consortium.compression.encoded import Encoded, MalformedUpdate

    stage, enc = expected.compression, update.encoded
    if stage is None:
        raise reject("it sends a compressed update, but this run does not compress "
                     "(compression.uplink = \"none\"): send the float32 delta")
    if not isinstance(enc, Encoded):
        raise reject(f"it sends a dense delta, but this run compresses every update "
                     f"(compression.uplink = {stage.method!r}): send its encoding")
    if parts is not None:
        raise reject(f"its delta names part of the model ({_names(parts)}), but a compressed "
                     "update stands for the whole model")
    limit = max_encoded_bytes(enc.kind, layout.size, enc.header)
    if enc.nbytes > limit:
        raise reject(f"its {enc.kind} encoding takes {enc.nbytes} bytes, more than the "
                     f"{limit} that kind needs for a model of {layout.size} values")
    if enc.kind in ("qsgd", "int") and len(enc.header) == 2:
        # an honest site quantises with the run's chunk length and bits (the approved
        # experiment); any other is not this run's encoding, and no header sizes an allocation
        bits, chunk = enc.header
        if chunk != stage.chunk:
            raise reject(f"its chunk length {chunk} is not this run's compression.chunk = "
                         f"{stage.chunk}")
        if enc.kind == "qsgd" and bits != stage.bits:
            raise reject(f"it sends {bits}-bit QSGD levels; this run's compression.bits = "
                         f"{stage.bits}")
    try:
        dense = stage.decoded(update, layout)
    except MalformedUpdate as exc:
        raise reject(str(exc)) from exc
    except (ValueError, RuntimeError, IndexError, OverflowError) as exc:  # never a crash
        raise reject(f"its {enc.kind} encoding does not decode ({type(exc).__name__}: "
                     f"{exc})") from exc
    shared = expected.shared
    if shared is not None and enc.kind != "sign":  # sign's ±1 carry no value there
        from consortium.deploy.shared import shared_mask

        personal = ~shared_mask(layout, shared)
        if bool((dense[personal] != 0).any()):
            raise reject("its encoding holds values at the personal tensors' coordinates, "
                         "which stay at the site under this run's personalised algorithm")
    return dense


def _check_update(
    update: Update, expected: ExpectedTask, layout: Layout, max_weight: float, reject: _Reject,
    parts: Layout | None = None, decoded: torch.Tensor | None = None,
) -> None:
    if update.client_id != expected.site:
        raise reject(f"its update claims to come from client {update.client_id!r}")
    delta = update.delta if decoded is None else decoded
    size = 0 if expected.secure else layout.size
    what = "the model's layout"
    if decoded is not None:
        pass  # a compressed update stands for the whole model (checked by _decoded)
    elif expected.shared is not None and not expected.secure:
        _check_parts(parts, expected.shared, layout, reject)
        size, what = expected.shared.size, "the model's shared tensors"
    elif parts is not None:
        raise reject(
            f"its delta names part of the model ({_names(parts)}), but this run "
            + ("sums whole updates through secure aggregation" if expected.secure
               else "shares every parameter") + ": send the whole model's delta"
        )
    if delta.dtype != torch.float32 or delta.ndim != 1 or delta.numel() != size:
        raise reject(
            f"expected a flat float32 delta of {size} values ({what}), found "
            f"{delta.dtype} of shape {tuple(delta.shape)}"
        )
    specs = _specs(expected.extras)
    if specs is not None and set(update.extras) != set(specs):
        missing = sorted(set(specs) - set(update.extras))
        unexpected = sorted(set(update.extras) - set(specs))
        raise reject(f"extras missing: {missing}, unexpected: {unexpected}")
    for name, tensor in sorted(update.extras.items()):
        spec = specs[name] if specs is not None else None
        dtype = spec.dtype if spec is not None else torch.float32
        if tensor.dtype != dtype:
            raise reject(f"extra {name!r} is {tensor.dtype}, expected {str(dtype)[6:]}")
        if spec is not None and tuple(tensor.shape) != tuple(spec.shape):
            raise reject(
                f"extra {name!r} has shape {tuple(tensor.shape)}, expected {tuple(spec.shape)}"
            )
    _check_magnitude(delta, "the delta", expected.max_norm, reject)
    for name, tensor in sorted(update.extras.items()):
        _check_magnitude(tensor, f"extra {name!r}", MAX_UPDATE_NORM, reject)
    if not math.isfinite(update.weight):
        raise reject(f"the weight {update.weight} is not finite")
    if not 0 <= update.weight <= max_weight:
        raise reject(f"the weight {update.weight} is outside [0, {max_weight}]")
    if specs is not None:
        for name, spec in sorted(specs.items()):
            _check_bounds(update.extras[name], name, spec, update.weight, reject)
    _check_metrics(update.metrics, reject)


def _check_parts(parts: Layout | None, shared: Layout, layout: Layout, reject: _Reject) -> None:
    """Under a personalised algorithm the delta names exactly the run's shared tensors: a
    personal tensor is refused (it must never leave its site), and so is the whole model."""
    personal = [n for n in layout.names if n not in set(shared.names)]
    if parts is None:
        raise reject(
            "it sends the whole model's delta, but under this run's personalised algorithm "
            f"only the shared tensors travel ({_names(shared)}); the personal ones "
            f"({', '.join(personal)}) stay at the site"
        )
    sent_personal = [n for n in parts.names if n in set(personal)]
    if sent_personal:
        raise reject(
            f"it sends personal tensor(s) {sent_personal}, which stay at the site under this "
            f"run's personalised algorithm; only the shared tensors ({_names(shared)}) may "
            "be sent"
        )
    if parts != shared:
        raise reject(
            f"its delta holds tensors {_names(parts)}, expected exactly the shared tensors "
            f"{_names(shared)} with the model's shapes and dtypes, in the model's order"
        )


def _names(layout: Layout, limit: int = 20) -> str:
    names = list(layout.names)
    more = f", … ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _specs(
    extras: Mapping[str, ExtraSpec | tuple[int, ...]] | None,
) -> dict[str, ExtraSpec] | None:
    if extras is None:
        return None
    return {name: s if isinstance(s, ExtraSpec) else ExtraSpec(tuple(s))
            for name, s in extras.items()}


def _check_bounds(
    tensor: torch.Tensor, name: str, spec: ExtraSpec, weight: float, reject: _Reject
) -> None:
    """Every value of extra ``name`` in its declared ``[low, high]`` (times the update's weight
    when ``per_weight``), up to float32 rounding of the value the client computed in float64."""
    if tensor.numel() == 0 or not (math.isfinite(spec.low) or math.isfinite(spec.high)):
        return
    scale = weight if spec.per_weight else 1.0
    low, high = spec.low * scale, spec.high * scale
    slack = 1e-6 * max((abs(b) for b in (low, high) if math.isfinite(b)), default=0.0)
    smallest, largest = float(tensor.min()), float(tensor.max())
    for value in (smallest, largest):
        if not low - slack <= value <= high + slack:
            per = f" (for weight {weight:g})" if spec.per_weight else ""
            raise reject(f"extra {name!r} holds {value:g}, outside its bounds "
                         f"[{low:g}, {high:g}]{per}")


def _rejecter(kind: str, expected: ExpectedTask, task_id: str) -> _Reject:
    """The error for a refused ``kind`` (result, evaluation): the log line names the site,
    round and task, then what was wrong."""

    def reject(what: str) -> RejectedResult:
        return RejectedResult(
            f"rejected {kind} from site {expected.site!r} (round {expected.round}, task "
            f"{task_id!r}): {what}",
            site=expected.site, round=expected.round, task_id=task_id,
        )

    return reject


def _check_magnitude(tensor: torch.Tensor, what: str, cap: float, reject: _Reject) -> None:
    """Finite values and an L2 norm within ``cap`` ("absurd magnitude" otherwise)."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return
    # The float32 norm propagates NaN and ±inf and overflows only beyond 1.8e19 > cap, so a
    # finite one within the cap settles both checks in one pass (20× faster than a float64
    # sum); the float64 norm gives the reason when it does not.
    fast = float(torch.linalg.vector_norm(tensor))
    if math.isfinite(fast) and fast <= cap:
        return
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        bad = int(finite.numel() - finite.sum())
        raise reject(f"{what} holds {bad} NaN or infinite values of {tensor.numel()}")
    norm = float(torch.linalg.vector_norm(tensor, dtype=torch.float64))
    if norm > cap:
        raise reject(f"{what} has absurd magnitude: its L2 norm {norm:.3g} exceeds the cap "
                     f"of {cap:.3g} (no training step moves a model that far)")


def _check_metrics(metrics: Mapping[str, float], reject: _Reject) -> None:
    bad = sorted(k for k, v in metrics.items() if not math.isfinite(v))
    if bad:
        raise reject(f"metrics {bad[:5]} are NaN or infinite")
