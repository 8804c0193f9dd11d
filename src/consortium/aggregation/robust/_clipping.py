"""Rules that bound each update's norm: centered clipping (Karimireddy et al. 2021), norm bounding (Sun et al. 2019)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from consortium.aggregation.base import Aggregate, RoundContext, StageState
from consortium.aggregation.robust._base import (
    NEEDS,
    FaultTolerant,
    Round,
    check_count,
    check_f,
    check_positive,
    combine,
    gram,
    median_of,
    norms,
    prepare,
)
from consortium.errors import PipelineError
from consortium.types import Layout, Update

__all__ = ["CenteredClipping", "NormBound", "centered_clipping", "norm_bound"]


def _scales(dist: torch.Tensor, radius: float) -> torch.Tensor:
    """``min(1, radius / dist)``, 1 where the distance is 0."""
    return torch.where(dist > radius, radius / dist.clamp_min(1e-300), torch.ones_like(dist))


@dataclass(frozen=True)
class CenteredClipping(FaultTolerant):
    """Iterative clipping around a center carried over from the previous round.

    Karimireddy, He, Jaggi, "Learning from History for Byzantine Robust Optimization", ICML
    2021. Starting from the center ``v`` (the previous round's aggregate), repeat ``iterations``
    (the paper's L) times ``v ← v + (1/n) Σᵢ clip_τ(Δᵢ − v)`` with
    ``clip_τ(x) = x·min(1, τ/‖x‖)``; the result is the aggregate. Sample weights are ignored,
    as in the paper. With ``tau = inf`` it is the plain mean.

    The radius: ``tau = None`` (the default) takes τ from the round, as the median of the
    distances ``‖Δᵢ − v‖`` of its updates to the center. The paper's analysis (its Theorem III)
    sets τ on the scale of the good updates' spread around the center, which no constant fits
    across models and training stages: the experiments' τ = 10 is far above the update norms
    of a small model trained for one epoch (digits, logistic: ≈ 0.2), so it never clipped and
    20 % of clients running IPM brought accuracy down to chance. With an honest majority
    (``n ≥ 2f + 1``) the median distance lies between the smallest and the largest *honest*
    distance whatever the faulty clients send, so it is an honest scale a minority cannot
    inflate. Choosing τ from the round's distances follows the authors' own adaptive radius
    for the decentralised version (He, Karimireddy, Jaggi, "Byzantine-Robust Decentralized
    Learning via ClippedGossip", 2022, which clips to a radius chosen from the distances to
    the neighbours). A number gives the fixed radius of the paper. No radius removes the
    attackers' pull altogether: each far attacker still moves the center by τ/n per
    iteration, so the aggregate settles about ``f/(n − f)`` times the honest spread short of
    the honest mean for any τ at or below that spread (measured: benchmarks/RESULTS.md,
    "Robust defaults").

    Worker momentum (``worker_momentum`` = β, the paper's Algorithm 2 and its main ingredient:
    the error of its Theorem III scales with the spread ρ of what the good clients send, and
    averaging over rounds shrinks the noise part of ρ by about ``√((1 − β)/(1 + β))``, a
    quarter at β = 0.9). Federated clients are sampled and keep no state, so the server keeps
    each client's momentum of its own updates: ``mᵢ ← β·mᵢ + (1 − β)·Δᵢ`` in every round
    client i takes part in, and the clipping above runs on this round's ``mᵢ`` instead of
    the ``Δᵢ``. A client seen for the first time starts at ``mᵢ = Δᵢ``, as the authors'
    code does (``WorkerWithMomentum`` starts its buffer at the first gradient, like
    ``torch.optim.SGD``): the weights ``βᵏ⁻¹, (1 − β)βᵏ⁻², …, (1 − β)`` of its k updates sum
    to 1, so the momentum is an unbiased average from the first round on with no per-client
    round count to keep (a zero start would need Adam's ``1/(1 − βᵏ)`` correction), and a
    first round is exactly centered clipping of the updates themselves. β = 0 (the default)
    is the paper's CClip without momentum and keeps no per-client state.

    Momentum averages away only the part of the spread that changes from round to round (the
    paper's stochastic-gradient noise σ), not the part that comes from each client's own data
    (its heterogeneity ζ, which the paper's bound keeps). That decides whether it helps:
    clients that each train one minibatch per round (digits, one step of 4 examples) hold at
    0.87–0.91 under IPM with β = 0.9 against 0.19–0.39 without; clients that train a full
    epoch on their own 14 examples send deviations 91 % correlated from round to round, so
    β = 0.9 leaves the spread as it was and does not raise the IPM accuracy (0.783 against
    0.779 on seed 0, lower on two of four seeds; benchmarks/RESULTS.md, "Worker momentum").
    Hence off by default: it costs ``n_clients × d`` state for a gain that depends on the
    setting.

    The momentum is a filter the server applies to what a client sends, so it hands a faulty
    client nothing it could not send already: the filter is invertible
    (``Δᵢ = (mᵢ − β·mᵢ_prev)/(1 − β)``), so a client that wants its momentum to be any vector
    sends the update that makes it so, exactly the paper's model of a Byzantine worker that
    sends arbitrary momenta. What it loses is the honest clients' noise to hide in.

    Costs and caveats: the state holds one float32 vector of the model's size for every
    client ever seen (``n_clients × d × 4`` bytes: 100 clients of a 1M-parameter model are
    400 MB, in memory and in each checkpoint). A client that is not in a round keeps its
    momentum unchanged; when clients are sampled and come back only every k rounds, their
    momentum mixes updates computed on models up to many rounds old (stale momentum: still
    a correct average of that client's updates, but of older ones, so the honest spread it
    removes is partly replaced by staleness). Cross-device settings with rare returns and
    large models are better served by ``worker_momentum = 0``. Updates dropped for NaN or
    infinite values leave their client's momentum as it was.

    ``momentum`` is a different, server-side knob kept for earlier configurations: the
    center carried to the next round is ``β·v_prev + (1 − β)·v`` (β = 0, the default: the
    previous aggregate, as in the paper's CClip).

    State (explicit, checkpointed with the pipeline): ``init(layout)`` gives
    ``{"center": zeros(d)}``, plus ``"momenta": {}`` (client id → float32 vector) when
    ``worker_momentum > 0``; ``aggregate(updates, ctx=..., state=...)`` returns
    ``(Aggregate, new_state)`` and never changes the state it was given. A state without
    ``"momenta"`` (a checkpoint from before worker momentum) starts every client afresh.

    Breakdown needs an honest majority: ``n ≥ 2f + 1``. Info: ``robust_flagged`` lists the
    clients clipped in the last iteration, ``robust_weights`` their clip factors,
    ``robust_clip`` is the τ used this round. Extras are summed over every client.
    """

    tau: float | None = None
    iterations: int = 1
    momentum: float = 0.0
    f: int = 1
    worker_momentum: float = 0.0
    name: str = "centered-clipping"
    needs: frozenset[str] = NEEDS

    def init(self, layout: Layout) -> StageState:
        state: StageState = {"center": torch.zeros(layout.size, dtype=torch.float32)}
        if self.worker_momentum > 0:
            state["momenta"] = {}
        return state

    def aggregate(
        self, updates: list[Update], *, ctx: RoundContext, state: StageState
    ) -> tuple[Aggregate, StageState]:
        center = state.get("center")
        size = ctx.layout.size
        if not isinstance(center, torch.Tensor) or center.shape != (size,):
            found = (
                tuple(center.shape) if isinstance(center, torch.Tensor) else type(center).__name__
            )
            raise PipelineError(
                f"centered-clipping state holds center {found}, expected a vector of {size} "
                "values; start it from init(layout) (was the run resumed with another model?)"
            )
        r = prepare(self, updates, ctx, self.f)
        momenta: dict[str, torch.Tensor] | None = None
        if self.worker_momentum > 0:
            momenta = self.momenta(r, state.get("momenta", {}), size)
            r = dataclasses.replace(r, matrix=torch.stack([momenta[i] for i in r.ids]))
        g = gram(r.matrix, center)
        diag = g.diagonal()
        tau = self.radius(diag.clamp_min(0).sqrt())
        b = torch.zeros(r.n, dtype=torch.float64)  # v = center + Σ bᵢ (Δᵢ − center)
        scale = torch.ones(r.n, dtype=torch.float64)
        for _ in range(self.iterations):
            gb = g @ b
            dist = (diag - 2 * gb + b @ gb).clamp_min(0).sqrt()
            scale = _scales(dist, tau)
            b = b * (1 - scale.mean()) + scale / r.n
        base = center.to(torch.float64) * (1 - float(b.sum()))
        delta = combine(r.matrix, b, base=base)
        new_center = self.momentum * center.to(torch.float64) + (1 - self.momentum) * delta
        clipped = {i: float(scale[i]) for i in range(r.n) if float(scale[i]) < 1}
        info = r.record(self.name, flagged=clipped, weights=clipped, robust_clip=tau)
        agg = r.result(delta, keep=None, info=info)
        new_state: StageState = {"center": new_center.to(torch.float32)}
        if momenta is not None:
            new_state["momenta"] = momenta
        return agg, new_state

    def momenta(self, r: Round, old: Any, size: int) -> dict[str, torch.Tensor]:
        """Every client's worker momentum after this round: ``β·mᵢ + (1 − β)·Δᵢ`` for the
        round's clients (``Δᵢ`` for one without a momentum yet), the others' unchanged.

        A new dict, sorted by client id; the old one and its tensors are left as they were.

        Raises:
            PipelineError: the state's momenta are not a map of client ids to vectors of
                ``size`` values.
        """
        if not isinstance(old, dict):
            raise PipelineError(
                f"centered-clipping state holds momenta of type {type(old).__name__}, expected "
                "a map of client ids to vectors; start it from init(layout)"
            )
        beta = self.worker_momentum
        new = dict(old)
        for i, client in enumerate(r.ids):
            prev = old.get(client)
            if prev is None:
                new[client] = r.matrix[i].clone()
                continue
            if not isinstance(prev, torch.Tensor) or prev.shape != (size,):
                found = (
                    tuple(prev.shape) if isinstance(prev, torch.Tensor) else type(prev).__name__
                )
                raise PipelineError(
                    f"centered-clipping state holds a momentum {found} for client {client!r}, "
                    f"expected a vector of {size} values; start it from init(layout) (was the "
                    "run resumed with another model?)"
                )
            # in float64: a convex combination of finite float32 values then stays finite
            m = beta * prev.to(torch.float64) + (1 - beta) * r.matrix[i].to(torch.float64)
            new[client] = m.to(torch.float32)
        return dict(sorted(new.items()))

    def radius(self, distances: torch.Tensor) -> float:
        """τ for the round: the fixed ``tau``, or the median of the updates' ``distances`` to
        the center (fixed for the round's iterations)."""
        return self.tau if self.tau is not None else median_of(distances)


@dataclass(frozen=True)
class NormBound(FaultTolerant):
    """Clip every update to norm ``M``, then take the sample-weighted mean.

    Sun, Kairouz, Suresh, McMahan, "Can You Really Backdoor Federated Learning?", 2019 (norm
    difference clipping). ``M`` is ``bound``, or, when None, the median of the round's update
    norms (which needs an honest majority, ``n ≥ 2f + 1``; a fixed bound needs no check).
    Weighted by sample count like the FedAvg mean it guards: a client claiming a huge weight
    still moves the aggregate by at most ``M``.

    Info: ``robust_flagged`` lists the clipped clients, ``robust_weights`` their clip factors,
    ``robust_clip`` is ``M``. Extras are summed over every client.
    """

    bound: float | None = None
    f: int = 1
    name: str = "norm-bound"
    needs: frozenset[str] = NEEDS

    @property
    def linear(self) -> bool:
        """With a fixed bound the aggregate is a sum of clipped updates (central DP may follow);
        the median norm makes each client's scale depend on the others."""
        return self.bound is not None

    def needed(self, f: int) -> int:
        return 2 * f + 1 if self.bound is None else 1

    def requirement(self) -> str:
        return "n ≥ 2f + 1 for the median norm" if self.bound is None else "n ≥ 1"

    def aggregate(self, updates: list[Update], *, ctx: RoundContext) -> Aggregate:
        r = prepare(self, updates, ctx, self.f)
        total = float(r.weights.sum())
        if not total > 0:
            raise PipelineError(
                f"round {ctx.round}: the updates' total weight is 0; nothing to average"
            )
        size = norms(r.matrix)
        limit = self.bound if self.bound is not None else median_of(size)
        scale = _scales(size, limit)
        delta = combine(r.matrix, r.weights * scale / total)
        clipped = {i: float(scale[i]) for i in range(r.n) if float(scale[i]) < 1}
        info = r.record(self.name, flagged=clipped, weights=clipped, robust_clip=limit)
        return r.result(delta, keep=None, info=info)


def centered_clipping(
    tau: float | None = None,
    *,
    iterations: int = 1,
    momentum: float = 0.0,
    f: int = 1,
    worker_momentum: float = 0.0,
) -> CenteredClipping:
    """Centered clipping (Karimireddy et al. 2021), stateful across rounds.

    Args:
        tau: clip radius τ > 0 around the center; None (the default): each round's median
            distance of the updates to the center (see :class:`CenteredClipping`);
            ``math.inf``: the plain mean.
        iterations: clipping iterations L per round.
        momentum: β in [0, 1): how much of the old center the next round's keeps.
        f: faulty clients tolerated (only checked: ``n ≥ 2f + 1``).
        worker_momentum: the paper's worker momentum β in [0, 1), kept by the server for
            each client (``n_clients × d`` floats of state); 0 turns it off. See
            :class:`CenteredClipping`.

    Raises:
        PipelineError: a parameter out of range.
    """
    for param, value in (("momentum", momentum), ("worker_momentum", worker_momentum)):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not (ok and 0 <= value < 1):
            raise PipelineError(
                f"robust rule 'centered-clipping': {param} = {value!r} must be in [0, 1)"
            )
    radius = None if tau is None else check_positive("centered-clipping", "tau", tau)
    return CenteredClipping(
        tau=radius,
        iterations=check_count("centered-clipping", "iterations", iterations),
        momentum=float(momentum),
        f=check_f("centered-clipping", f),
        worker_momentum=float(worker_momentum),
    )


def norm_bound(bound: float | None = None, *, f: int = 1) -> NormBound:
    """Norm bounding (Sun et al. 2019): clip to ``bound`` (None: the round's median norm), average.

    Raises:
        PipelineError: a bound that is not a positive number, or ``f`` out of range.
    """
    limit = None if bound is None else check_positive("norm-bound", "bound", bound)
    return NormBound(bound=limit, f=check_f("norm-bound", f))
