"""What every robust rule shares: the round's update matrix, the client-count check, the info record.

The helpers work on the ``[n, d]`` float32 matrix in blocks of columns, so that the float64
copies they make stay small (a few tens of MB) however large ``d`` is.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from consortium.aggregation.base import (
    INDIVIDUAL,
    Aggregate,
    Aggregator,
    RoundContext,
    StageState,
)
from consortium.errors import PipelineError
from consortium.types import Layout, Update

NEEDS = frozenset({INDIVIDUAL})
BLOCK = 1 << 15
"""Columns per block: a ``[n, 32768]`` float64 copy is 26 MB at n = 100."""


class RobustAggregator(Aggregator, Protocol):
    """A robust rule: how many clients a round needs for the ``f`` faults it tolerates."""

    def min_clients(self) -> int: ...

    def check_clients(self, n: int) -> None: ...


class StatefulBufferedAggregator(Aggregator, Protocol):
    """A buffered aggregator with state carried across rounds (centered clipping's center).

    ``init(layout)`` gives the first state; ``aggregate`` takes the current state and returns
    the new one next to the aggregate, never changing the one it was given. The state is a
    dict of float32 tensors and JSON-able values, checkpointed with the pipeline's.
    """

    def init(self, layout: Layout) -> StageState: ...

    def aggregate(
        self, updates: list[Update], *, ctx: RoundContext, state: StageState
    ) -> tuple[Aggregate, StageState]: ...


class FaultTolerant:
    """Mixin for rules that tolerate ``f`` faulty clients when a round has ``needed(f)`` or more.

    A rule with a field ``f`` declares the faults it tolerates; one without (FLTrust) has 0.
    ``f = None`` (Krum, Multi-Krum, Bulyan by default) means "as many as each round can
    tolerate": the build-time check asks for ``needed(0)`` and each round uses
    :meth:`most_tolerated` of its usable updates.
    """

    name: str

    def faults(self) -> int:
        f = getattr(self, "f", 0)
        return 0 if f is None else int(f)

    def most_tolerated(self, n: int) -> int:
        """The largest ``f`` with ``needed(f) <= n`` (0 when even ``needed(0)`` is more)."""
        f = 0
        while self.needed(f + 1) <= n:
            f += 1
        return f

    def needed(self, f: int) -> int:
        """Fewest updates a round needs to tolerate ``f`` faulty clients."""
        return 2 * f + 1

    def requirement(self) -> str:
        """``needed`` as a formula, for error messages."""
        return "n ≥ 2f + 1"

    def min_clients(self) -> int:
        """Fewest clients per round this rule needs for the faults it tolerates."""
        return self.needed(self.faults())

    def check_clients(self, n: int) -> None:
        """Raise if rounds of ``n`` clients are too few (the integrator calls it at build time).

        Raises:
            PipelineError: ``n < min_clients()``; the message names the rule, f, the minimum
                and the fix.
        """
        self._require(n, self.faults(), "clients per round")

    def _require(self, n: int, f: int, what: str, *, note: str = "") -> None:
        need = self.needed(f)
        if n >= need:
            return
        fits = next((k for k in range(f - 1, -1, -1) if self.needed(k) <= n), None)
        lower = f", or lower f to {fits}" if fits is not None else ""
        raise PipelineError(
            f"robust rule {self.name!r} with f = {f} needs at least {need} {what} "
            f"({self.requirement()}), got {n}{note}; raise the clients per round to {need} or "
            f"more{lower}"
        )


@dataclass(frozen=True)
class Round:
    """The round's usable updates, in client-id order, stacked to an ``[n, d]`` matrix.

    Updates with a NaN or infinite value are dropped before the rule runs: they are certainly
    faulty, so the rule then has ``f − dropped`` faults left to tolerate among the rest.
    """

    ids: tuple[str, ...]
    matrix: torch.Tensor
    weights: torch.Tensor
    updates: tuple[Update, ...]
    non_finite: tuple[str, ...]
    f: int

    @property
    def n(self) -> int:
        return len(self.ids)

    def total_weight(self, keep: Iterable[int] | None = None) -> float:
        w = self.weights if keep is None else self.weights[list(keep)]
        return float(w.sum())

    def extras(self, keep: Iterable[int] | None = None) -> dict[str, torch.Tensor]:
        """Sums of the kept clients' extras (all clients when ``keep`` is None), float32.

        Every name any client sent is present, as zeros when no kept client sent it, so an
        algorithm reading its extras finds them even in a round that kept no one.
        """
        sums: dict[str, torch.Tensor] = {}
        for u in self.updates:
            for k, v in u.extras.items():
                if k not in sums:
                    sums[k] = torch.zeros(v.shape, dtype=torch.float64)
        for i in range(self.n) if keep is None else keep:
            for k, v in self.updates[i].extras.items():
                sums[k] += v.to(torch.float64)
        return {k: v.to(torch.float32) for k, v in sums.items()}

    def result(
        self,
        delta: torch.Tensor,
        *,
        keep: Sequence[int] | None,
        info: dict[str, Any],
    ) -> Aggregate:
        """The :class:`Aggregate` of the kept rows (``None``: all), with ``info`` recorded."""
        count = self.n if keep is None else len(keep)
        return Aggregate(
            delta=delta.to(torch.float32),
            weight=self.total_weight(keep),
            count=count,
            extras=self.extras(keep),
            info=info,
        )

    def record(
        self,
        rule: str,
        *,
        flagged: Iterable[int] = (),
        weights: Mapping[int, float] | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """The info record: ``robust_rule``, ``robust_flagged`` (ids, sorted; non-finite ones
        included), ``robust_weights`` ({id: weight}, only the non-trivial ones) and ``extra``."""
        ids = {self.ids[i] for i in flagged} | set(self.non_finite)
        info: dict[str, Any] = {
            "robust_rule": rule,
            "robust_flagged": sorted(ids),
            "robust_weights": {self.ids[i]: short(w) for i, w in sorted((weights or {}).items())},
        }
        if self.non_finite:
            info["robust_non_finite"] = list(self.non_finite)
        info.update(extra)
        return info


def short(x: float) -> float:
    """``x`` to 4 significant digits: weights in metrics.jsonl are for reading, not recomputing."""
    return float(f"{x:.4g}")


def prepare(
    rule: FaultTolerant, updates: Sequence[Update], ctx: RoundContext, f: int | None
) -> Round:
    """Check the round's updates, drop non-finite ones and stack the rest.

    ``f = None``: the round's ``f`` is the most its usable updates tolerate
    (:meth:`FaultTolerant.most_tolerated`).

    Raises:
        PipelineError: an update of the wrong size, a negative or non-finite weight, or fewer
            usable updates than the rule needs for ``f``.
    """
    size = ctx.layout.size
    ordered = sorted(updates, key=lambda u: u.client_id)
    for u in ordered:
        if u.delta.numel() != size:
            raise PipelineError(
                f"client {u.client_id!r} sent {u.delta.numel()} values, expected {size}; "
                "is it training the same model?"
            )
        if not (u.weight >= 0 and u.weight < float("inf")):
            raise PipelineError(
                f"client {u.client_id!r} sent weight {u.weight}; weights must be finite and >= 0"
            )
    matrix = (
        torch.stack([u.delta.reshape(-1).to(torch.float32) for u in ordered])
        if ordered
        else torch.zeros(0, size)
    )
    # A NaN or infinity makes its row's sum non-finite; a sum can also overflow from finite
    # values, so only those rows are checked value by value. One pass, no [n, d] mask.
    finite = torch.isfinite(matrix.sum(dim=1)).tolist()
    for i, ok in enumerate(finite):
        if not ok:
            finite[i] = bool(torch.isfinite(matrix[i]).all())
    dropped = [u.client_id for u, ok in zip(ordered, finite) if not ok]
    if dropped:
        matrix = matrix[torch.tensor(finite, dtype=torch.bool)]
    kept = [u for u, ok in zip(ordered, finite) if ok]
    f_left = rule.most_tolerated(len(kept)) if f is None else max(0, f - len(dropped))
    note = f" ({len(dropped)} more dropped for NaN or infinite values)" if dropped else ""
    rule._require(len(kept), f_left, f"usable updates in round {ctx.round}", note=note)
    weights = torch.tensor([float(u.weight) for u in kept], dtype=torch.float64)
    return Round(
        ids=tuple(u.client_id for u in kept),
        matrix=matrix,
        weights=weights,
        updates=tuple(kept),
        non_finite=tuple(dropped),
        f=f_left,
    )


# -- blockwise linear algebra on the [n, d] matrix ------------------------------------------------


def blocks(d: int) -> Iterator[slice]:
    for start in range(0, d, BLOCK):
        yield slice(start, min(start + BLOCK, d))


def gram(x: torch.Tensor, center: torch.Tensor | None = None) -> torch.Tensor:
    """``(X − c)(X − c)ᵀ`` in float64 (``c = 0`` when ``center`` is None), ``[n, n]``."""
    n, d = x.shape
    g = torch.zeros(n, n, dtype=torch.float64)
    for cols in blocks(d):
        block = x[:, cols].to(torch.float64)
        if center is not None:
            block -= center[cols].to(torch.float64)
        g += block @ block.T
    return g


def square_distances(x: torch.Tensor) -> torch.Tensor:
    """Pairwise squared Euclidean distances ``‖xᵢ − xⱼ‖²``, float64 ``[n, n]``, zero diagonal.

    Through the Gram matrix (``n²d`` multiply-adds in BLAS, never an ``[n, n, d]`` tensor),
    centred first on the row of smallest norm: distances do not change, and centring on a
    data point keeps the cancellation in ``‖a‖² + ‖b‖² − 2a·b`` small. (The mean would not do:
    one huge Byzantine row drags it far from every honest row.)
    """
    if x.shape[0] == 0:
        return torch.zeros(0, 0, dtype=torch.float64)
    center = x[int(torch.linalg.vector_norm(x, dim=1).argmin())]
    g = gram(x, center)
    return gram_to_distances(g)


def gram_to_distances(g: torch.Tensor) -> torch.Tensor:
    sq = g.diagonal()
    d2 = (sq[:, None] + sq[None, :] - 2 * g).clamp_min(0)
    d2.fill_diagonal_(0)
    return d2


def norms(x: torch.Tensor) -> torch.Tensor:
    """Row norms ``‖xᵢ‖`` in float64, ``[n]``."""
    total = torch.zeros(x.shape[0], dtype=torch.float64)
    for cols in blocks(x.shape[1]):
        block = x[:, cols].to(torch.float64)
        total += (block * block).sum(dim=1)
    return total.sqrt()


def dots(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``X v`` in float64, ``[n]``."""
    total = torch.zeros(x.shape[0], dtype=torch.float64)
    for cols in blocks(x.shape[1]):
        total += x[:, cols].to(torch.float64) @ v[cols].to(torch.float64)
    return total


def combine(x: torch.Tensor, coef: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
    """``base + Σᵢ coefᵢ xᵢ`` summed in float64, returned as float32 ``[d]``.

    Only the rows with a non-zero coefficient are read.
    """
    rows = torch.nonzero(coef).flatten()
    c = coef[rows].to(torch.float64)
    out = torch.empty(x.shape[1], dtype=torch.float32)
    for cols in blocks(x.shape[1]):
        acc = c @ x[rows, cols].to(torch.float64)
        if base is not None:
            acc += base[cols].to(torch.float64)
        out[cols] = acc.to(torch.float32)
    return out


def median_of(values: torch.Tensor) -> float:
    """The median of a 1-D tensor (the mean of the two middle values when the length is even)."""
    s = values.to(torch.float64).sort().values
    n = s.numel()
    return float(s[n // 2]) if n % 2 else float((s[n // 2 - 1] + s[n // 2]) / 2)


def check_f(rule: str, f: object) -> int:
    if isinstance(f, bool) or not isinstance(f, int) or f < 0:
        raise PipelineError(f"robust rule {rule!r}: f = {f!r} must be a whole number >= 0")
    return f


def check_f_or_most(rule: str, f: object) -> int | None:
    """``check_f``, with None kept: as many faults as each round tolerates."""
    return None if f is None else check_f(rule, f)


def check_positive(rule: str, param: str, value: object, *, allow_zero: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    x = float(value) if ok else float("nan")  # type: ignore[arg-type]
    if not (x > 0 or (allow_zero and x == 0)):
        bound = ">= 0" if allow_zero else "> 0"
        raise PipelineError(f"robust rule {rule!r}: {param} = {value!r} must be a number {bound}")
    return x


def check_count(rule: str, param: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PipelineError(
            f"robust rule {rule!r}: {param} = {value!r} must be a whole number >= 1"
        )
    return value
