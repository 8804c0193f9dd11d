"""Checks every incoming result against the task it answers, before it touches the model.

A deployed server receives results from other institutions' machines. Decoding
(:mod:`consortium.deploy.codec`) only guarantees well-formed tensors; this module checks that a
result is the answer to the task the server sent to that site in this round, exactly once, with
the model's layout, finite values and a sane weight, within a size limit. A failed check raises
:class:`RejectedResult` whose message is the log line: it names the site, round and task, and
what was wrong. The server logs it and goes on without the result; it never crashes on one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, MutableSet
from dataclasses import dataclass
from typing import Final

import torch

from consortium.deploy.codec import EvaluationEnvelope, ResultEnvelope
from consortium.errors import ConsortiumError
from consortium.types import Layout, Update

__all__ = [
    "DEFAULT_MAX_WEIGHT",
    "ExpectedTask",
    "RejectedResult",
    "validate_evaluation",
    "validate_result",
]

_UNIT_METRICS: Final = frozenset({"accuracy", "balanced_accuracy", "auc"})

DEFAULT_MAX_WEIGHT: Final = 1e9
"""Largest aggregation weight (or evaluation example count) accepted by default: weights are
sample counts."""


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
        extras: the extras an update must carry, name -> shape (an algorithm's SCAFFOLD
            control-variate delta, central DP's clipping bit); ``None`` accepts any names and
            shapes (their dtype, values and size are still checked).
        secure: the update's values travel through secure aggregation, so its delta is empty
            and only the extras' shapes come in the clear (``SecureAggregation``).
    """

    site: str
    round: int
    task_id: str
    extras: Mapping[str, tuple[int, ...]] | None = None
    secure: bool = False


def validate_result(
    envelope: ResultEnvelope,
    *,
    expected: ExpectedTask,
    layout: Layout,
    max_bytes: int,
    seen_task_ids: MutableSet[str],
    max_weight: float = DEFAULT_MAX_WEIGHT,
) -> None:
    """Accept ``envelope`` as the answer to ``expected``, or raise why not.

    Checks, in order: the sender is the authenticated site; the round is the current one; the
    task id is the expected one and was not answered before (no replay); the result is within
    ``max_bytes`` (on the wire and in tensor data); it carries an update or an error, not both;
    the delta is flat float32 with ``layout.size`` values (empty when ``expected.secure``); the
    extras are float32 with the expected names and shapes; delta, extras, weight and metrics
    are finite; the weight is in ``[0, max_weight]``. A result without an update (the client
    failed or refused) passes with the first checks only.

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
        return
    if result.error is not None or result.refused:
        raise reject("it carries an update together with an error or a refusal")
    _check_update(update, expected, layout, max_weight, reject)


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
    # a metric out of its range would pull the federated average anywhere it likes
    for name, value in sorted(result.metrics.items()):
        if name in _UNIT_METRICS and not 0.0 <= value <= 1.0:
            raise reject(f"metric {name!r} = {value:g} is outside [0, 1]")
        if name == "loss" and value < 0:
            raise reject(f"metric 'loss' = {value:g} is negative")


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


def _check_update(
    update: Update, expected: ExpectedTask, layout: Layout, max_weight: float, reject: _Reject
) -> None:
    if update.client_id != expected.site:
        raise reject(f"its update claims to come from client {update.client_id!r}")
    delta = update.delta
    size = 0 if expected.secure else layout.size
    if delta.dtype != torch.float32 or delta.ndim != 1 or delta.numel() != size:
        raise reject(
            f"expected a flat float32 delta of {size} values (the model's layout), found "
            f"{delta.dtype} of shape {tuple(delta.shape)}"
        )
    if expected.extras is not None and set(update.extras) != set(expected.extras):
        missing = sorted(set(expected.extras) - set(update.extras))
        unexpected = sorted(set(update.extras) - set(expected.extras))
        raise reject(f"extras missing: {missing}, unexpected: {unexpected}")
    for name, tensor in update.extras.items():
        if tensor.dtype != torch.float32:
            raise reject(f"extra {name!r} is {tensor.dtype}, expected float32")
        if expected.extras is not None and tuple(tensor.shape) != tuple(expected.extras[name]):
            raise reject(
                f"extra {name!r} has shape {tuple(tensor.shape)}, expected "
                f"{tuple(expected.extras[name])}"
            )
    _check_finite(delta, "the delta", reject)
    for name, tensor in update.extras.items():
        _check_finite(tensor, f"extra {name!r}", reject)
    if not math.isfinite(update.weight):
        raise reject(f"the weight {update.weight} is not finite")
    if not 0 <= update.weight <= max_weight:
        raise reject(f"the weight {update.weight} is outside [0, {max_weight}]")
    _check_metrics(update.metrics, reject)


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


def _check_finite(tensor: torch.Tensor, what: str, reject: _Reject) -> None:
    # One float64 sum is finite exactly when every value is (NaN and ±inf propagate; float32
    # values cannot overflow float64 by summing): 8× cheaper than an elementwise mask.
    if tensor.is_floating_point() and math.isfinite(float(tensor.sum(dtype=torch.float64))):
        return
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        bad = int(finite.numel() - finite.sum())
        raise reject(f"{what} holds {bad} NaN or infinite values of {tensor.numel()}")


def _check_metrics(metrics: Mapping[str, float], reject: _Reject) -> None:
    bad = sorted(k for k, v in metrics.items() if not math.isfinite(v))
    if bad:
        raise reject(f"metrics {bad[:5]} are NaN or infinite")
