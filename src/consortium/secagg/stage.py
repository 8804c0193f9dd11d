"""Secure aggregation in the pipeline: a client stage that quantises, an aggregator that sums
through the SecAgg+ protocol (Bell et al. 2020) and sees only the sum.

The exchange runs the phases ``keys``, ``shares``, ``masked``, then, when the clients signed
their keys, ``consistency`` (Bonawitz et al. 2017's consistency check against a malicious
server), then ``unmask`` and ``end``. A deployed site signs with its provisioned identity and
enforces its own floor (``ClientContext.site``: a
:class:`~consortium.client.environment.SiteEnvironment` whose ``identity`` is a
:class:`~consortium.secagg.identity.SiteIdentity` and ``secagg`` a
:class:`~consortium.secagg.floor.SecAggFloor`); a simulation plays unauthenticated, or
authenticated with in-memory certificates (``secure_aggregation(authenticate=True)``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from consortium.aggregation.base import (
    Aggregate,
    ClientContext,
    ExtraSpec,
    RoundContext,
    StageState,
)
from consortium.errors import PipelineError
from consortium.seeds import derive_seed
from consortium.types import Layout, Update

__all__ = [
    "RESIDUAL_KEY",
    "SecureAggregation",
    "SecureSum",
    "secagg_context",
    "secure_aggregation",
    "sparse_count",
]

MODULUS_BITS = 32
HEADROOM = 4
"""How many times the largest honest sum the modulus must hold: then an honest sum never
wraps, and a sum that a forged input or a corrupted share turned into noise falls outside the
honest range in each coordinate with probability at least 3/4 (see :class:`SecureSum`)."""
SIMULATION_CONTEXT = b"consortium"
"""The SecAgg context of a simulation (no run id): the constant of earlier versions."""
RESIDUAL_KEY = "secagg.residual"
"""Where random-k under SecAgg with error feedback keeps the coordinates not yet sent."""


def sparse_count(size: int, fraction: float) -> int:
    """``k``: the coordinates of a delta of ``size`` that random-k under SecAgg sends
    (``max(1, round(fraction·size))``, as :func:`~consortium.compression.codecs.keep_count`)."""
    if fraction >= 1:
        return size
    return max(1, min(size, round(fraction * size)))


def secagg_context(run_id: str) -> bytes:
    """The SecAgg context that binds a round's keys, masks and signatures to run ``run_id``:
    ``b"consortium/secagg/v2/" + run_id``; a simulation without a run id keeps the constant
    ``b"consortium"`` (so its results are those of earlier versions)."""
    return b"consortium/secagg/v2/" + run_id.encode() if run_id else SIMULATION_CONTEXT


@dataclass
class _Session:
    """What a client keeps between its training result and the protocol phases (never sent)."""

    round: int
    vector: torch.Tensor | None
    client: Any = None  # the SecAggClient, made when the server's config arrives


def _residues(vector: torch.Tensor) -> bool:
    """Whether every value of ``vector`` lies in ``[0, 2**MODULUS_BITS)``."""
    return not vector.numel() or (
        int(vector.min()) >= 0 and int(vector.max()) >> MODULUS_BITS == 0
    )


def _encode_scales(
    update_extras: Mapping[str, torch.Tensor], weight_bound: float, extra_bounds: Mapping[str, float]
) -> list[tuple[str, int, float]]:
    """The segments of the secure vector: (name, size, scale) after the delta; ``scale`` maps a
    segment's values into ``[-1, 1]·clip`` (extras without a bound use ``weight_bound``)."""
    return [
        (n, update_extras[n].numel(), float(extra_bounds.get(n, weight_bound)))
        for n in sorted(update_extras)
    ]


@dataclass(frozen=True)
class SecureAggregation:
    """Client half of secure aggregation (SecAgg+, Bell et al. 2020).

    Encodes ``[w·Δ / weight_bound, extraᵢ / boundᵢ ..., w / weight_bound]``, clips it to
    ``[-clip, clip]`` and quantises it (``bits`` bits, stochastic rounding). The quantised vector
    stays in the client's session; the update sent to the server carries no values (only the
    extras' shapes), and the masked vector goes out in the protocol's third phase through
    :meth:`respond`. FedAvg's weighted mean survives: the server recovers ``Σ w·Δ`` and ``Σ w``
    from the sum and divides. Extras (sums by contract: SCAFFOLD's control-variate change,
    FedNova's ``w·a``, central DP's clipping count) travel in the same vector, each scaled by
    its own bound from ``extra_bounds`` (an algorithm's ``secure_bounds``). Values beyond the
    range are clipped; the ``secagg_clipped`` metric counts them.

    The server's round config is checked against a floor (:class:`SecAggFloor`): a deployed
    site's own (``ClientContext.site.secagg``), with ``threshold`` as a further minimum; in a
    simulation, ``threshold`` alone (a server asking for a smaller Shamir threshold than this
    fraction of the neighbours is refused: the client drops out). A deployed site signs with
    ``ClientContext.site.identity`` (a :class:`~consortium.secagg.identity.SiteIdentity`);
    a simulation with ``simulated`` (a :class:`~consortium.secagg.identity.SimulatedAuthority`)
    signs with a certificate it issues per client id, and requires signatures.

    With ``fraction < 1`` (``[compression] uplink = "randk"``) only the round's shared
    random-k coordinates of ``w·Δ`` go into the vector (:mod:`consortium.compression.secure`),
    so the masks, the upload and the server's sum run over ``k`` values instead of ``d``.
    """

    clip: float = 1.0
    bits: int = 16
    weight_bound: float = 1000.0
    threshold: float = 0.5
    extra_bounds: tuple[tuple[str, float], ...] = ()
    name: str = "secure_aggregation"
    needs: frozenset[str] = frozenset()
    gives: frozenset[str] = frozenset({"sum_only", "quantized"})
    simulated: Any = field(default=None, compare=False, repr=False)
    integer: bool = False
    """Send the delta as it is, integers (distributed DP's noised grid values), and the weight
    as an integer count, both modulo 2**32: no scaling, clipping or rounding here."""
    fraction: float = 1.0
    """Random-k under SecAgg (:mod:`consortium.compression.secure`): send only the round's
    shared ``k = round(fraction·d)`` coordinates of the delta (extras and weight in full);
    1.0 sends the whole delta."""
    error_feedback: bool = False
    """With ``fraction < 1``: keep the coordinates not sent in the client's state
    (:data:`RESIDUAL_KEY`) and add them next time (the server does not rescale); without it
    the server scales the sum by ``d/k`` (unbiased)."""

    def init(self, layout: Layout) -> StageState:
        return {}

    def expected_extras(
        self, before: Mapping[str, ExtraSpec], layout: Layout
    ) -> dict[str, ExtraSpec]:
        """Each extra's values travel in the protocol; in the clear only zeros of its size
        (none in integer mode)."""
        if self.integer:
            return {}
        return {n: ExtraSpec((math.prod(s.shape),), low=0.0, high=0.0) for n, s in before.items()}

    def client(self, update: Update, payload: Mapping[str, Any], ctx: ClientContext) -> Update:
        from consortium.secagg.quantize import quantize

        if self.integer:
            return self._client_integer(update, ctx)
        segments = _encode_scales(update.extras, self.weight_bound, dict(self.extra_bounds))
        delta = self._sparsified(update.delta, ctx) if self.fraction < 1 else update.delta
        parts = [delta.double() * update.weight / self.weight_bound]
        parts += [update.extras[n].double().reshape(-1) / scale for n, _, scale in segments]
        parts.append(torch.tensor([update.weight / self.weight_bound], dtype=torch.float64))
        x = torch.cat(parts)
        randomness = getattr(ctx.site, "randomness", None) if ctx.site is not None else None
        if randomness is not None:  # a deployed site rounds with its own CSPRNG
            q = quantize(x, clip=self.clip, bits=self.bits, uniform=randomness.uniform(x.numel()))
        else:
            gen = torch.Generator().manual_seed(derive_seed(ctx.seed, "secagg-quantise") % 2**63)
            q = quantize(x, clip=self.clip, bits=self.bits, generator=gen)
        clipped = float((x.abs() > self.clip).sum())
        ctx.session[self.name] = _Session(round=ctx.round, vector=q)
        # Only the extras' shapes travel in the clear; every value goes through the protocol.
        shapes = {n: torch.zeros(size) for n, size, _ in segments}
        return Update(
            update.client_id, torch.zeros(0), 0.0,
            metrics={**update.metrics, "secagg_clipped": clipped}, extras=shapes,
        )

    def _sparsified(self, delta: torch.Tensor, ctx: ClientContext) -> torch.Tensor:
        """The round's shared coordinates of ``delta`` (plus the residual kept from earlier
        rounds under error feedback, whose new value is what is not sent now).

        Raises:
            PipelineError: error feedback without a persistent client state.
        """
        from consortium.compression.secure import round_coordinates

        d = delta.numel()
        run_id = ctx.site.run_id if ctx.site is not None else ""
        idx = round_coordinates(d, sparse_count(d, self.fraction),
                                context=secagg_context(run_id), round=ctx.round)
        if not self.error_feedback:
            return delta.reshape(-1)[idx]
        state = ctx.state
        if state is None:
            raise PipelineError(
                "secure aggregation's random-k with error feedback keeps the coordinates not "
                "sent across rounds, but the client context has no persistent state; pass "
                "ClientContext(state=...) (the executors pass the client-state store's entry)"
            )
        v = delta.reshape(-1).to(torch.float32)
        residual = state.get(RESIDUAL_KEY)
        if residual is not None and residual.numel() == d:
            v = v + residual
        kept = v[idx]
        rest = v.clone()
        rest[idx] = 0.0
        state[RESIDUAL_KEY] = rest
        return kept

    def _client_integer(self, update: Update, ctx: ClientContext) -> Update:
        """The integer path: ``[Δ..., w] mod 2**32`` with ``Δ`` and ``w`` integers in
        ``(-2**31, 2**31)``, decoded centred by :class:`SecureSum` (``integer=True``).

        Raises:
            PipelineError: extras to send, or values that are not integers in range.
        """
        if update.extras:
            raise PipelineError(
                f"secure aggregation's integer mode sends the delta and weight only, found "
                f"extras {sorted(update.extras)}; use an algorithm without extra sums"
            )
        x = torch.cat([update.delta.double().reshape(-1),
                       torch.tensor([update.weight], dtype=torch.float64)])
        half = float(2 ** (MODULUS_BITS - 1))
        if not bool((x == torch.round(x)).all()) or bool((x.abs() >= half).any()):
            raise PipelineError(
                "secure aggregation's integer mode expects integers in (-2**31, 2**31) (the "
                "distributed DP stage's output); put distributed_dp before it"
            )
        q = x.to(torch.int64) & ((1 << MODULUS_BITS) - 1)
        ctx.session[self.name] = _Session(round=ctx.round, vector=q)
        return Update(update.client_id, torch.zeros(0), 0.0, metrics=dict(update.metrics))

    def respond(self, phase: str, message: Any, ctx: ClientContext) -> Any:
        """The client's side of one protocol phase: ``keys`` (message: the round's
        ``SecAggConfig``), ``shares``, ``masked``, ``consistency`` (authenticated rounds),
        ``unmask``, then ``end`` (forget the session).

        Raises:
            PipelineError: no quantised input for this round, an unknown phase, a message of the
                wrong type for its phase, or a config for another round, modulus or run (its
                context is not this site's run's).
            SecAggAbort, DecryptionError: from the protocol (the client drops out), among them a
                config below the site's floor.
        """
        from consortium.secagg import protocol as p

        if phase == "end":
            ctx.session.pop(self.name, None)
            return None
        session = ctx.session.get(self.name)
        if not isinstance(session, _Session) or session.round != ctx.round:
            raise PipelineError(
                f"client {ctx.client_id!r} holds no secure-aggregation input for round "
                f"{ctx.round}; it must train in the round before the protocol runs"
            )
        expected: Any = {
            "keys": p.SecAggConfig, "shares": p.KeysBroadcast, "masked": p.SharesForClient,
            "consistency": p.ConsistencyRequest, "unmask": p.UnmaskRequest,
        }.get(phase)
        if expected is None:
            raise PipelineError(
                f"unknown secure-aggregation phase {phase!r}; expected keys, shares, masked, "
                "consistency, unmask, end"
            )
        if not isinstance(message, expected):
            raise PipelineError(
                f"expected a {expected.__name__} in phase {phase!r}, found {type(message).__name__}"
            )
        if phase == "keys":
            run_id = ctx.site.run_id if ctx.site is not None else ""
            context = secagg_context(run_id)
            if (message.round != ctx.round or message.modulus_bits != MODULUS_BITS
                    or bytes(message.context) != context):
                raise PipelineError(
                    f"client {ctx.client_id!r} refuses the secure-aggregation config {message}: "
                    f"expected round {ctx.round}, modulus 2**{MODULUS_BITS} and the context "
                    f"{context!r} of run {run_id!r}"
                )
            identity = self._identity(ctx)
            session.client = p.SecAggClient(
                ctx.client_id, config=message,
                identity=identity.identity if identity is not None else None,
                trust=identity.trust if identity is not None else None,
                floor=self._floor(ctx),
            )
            return session.client.advertise_keys()
        if session.client is None:
            raise PipelineError(f"phase {phase!r} before 'keys' at client {ctx.client_id!r}")
        if phase == "shares":
            return session.client.share_keys(message)
        if phase == "masked":
            if session.vector is None:
                raise PipelineError(f"client {ctx.client_id!r} already sent its masked input")
            masked = session.client.masked_input(message, session.vector)
            session.vector = None
            return masked
        if phase == "consistency":
            return session.client.sign_consistency(message)
        return session.client.unmask(message)

    def _identity(self, ctx: ClientContext) -> Any:
        """The site's :class:`SiteIdentity`, the simulated one, or ``None`` (unauthenticated)."""
        found = getattr(ctx.site, "identity", None) if ctx.site is not None else None
        if found is None and self.simulated is not None:
            found = self.simulated.identity(ctx.client_id)
        return found

    def _floor(self, ctx: ClientContext) -> Any:
        """The site's floor, raised to ``threshold``; in a simulation, ``threshold`` alone."""
        from consortium.secagg.floor import SecAggFloor

        own = getattr(ctx.site, "secagg", None) if ctx.site is not None else None
        if own is not None:
            return dataclasses.replace(own, min_threshold=max(own.min_threshold, self.threshold))
        return SecAggFloor(
            min_threshold=self.threshold, min_neighbours=1,
            require_signatures=self.simulated is not None,
        )


@dataclass(frozen=True)
class SecureSum:
    """Sums the clients' quantised vectors with the SecAgg+ protocol and decodes the mean.

    The server's half of the protocol runs here; the clients' half runs where the clients do,
    reached through ``RoundContext.exchange`` (in simulation: this process, with the real
    cryptography; in a deployment: the sites). The server only ever holds the running sum of
    masked vectors and the unmasked total. Clients that stop answering drop out of the round;
    if too few remain to unmask, :class:`SecAggAbort` (a ``RoundAborted``) ends the round with
    nothing revealed and the run goes on. ``threshold`` is the fraction of a client's
    ``neighbours`` needed to recover its secrets (``neighbours = 0``: every other client, i.e.
    full SecAgg). ``run_id`` names the run in the round's context (:func:`secagg_context`);
    a deployed site refuses a context that is not its run's. When the clients sign their keys,
    the consistency round runs between ``masked`` and ``unmask``.

    Bounds against a malicious client (the server cannot see one client's input, only the
    sum, so it checks the sum against what honest inputs could produce; Bell et al. 2020 and
    Bonawitz et al. 2017 assume honest inputs):

    - Length: every masked vector must be int64 of exactly :meth:`vector_length` values (the
      delta's ``d``, or ``k`` under random-k, each extra, the weight slot) in ``[0, 2**32)``;
      a client that sends another is left out of the sum like a client that dropped after
      sharing its keys (its pairwise masks are recovered from its neighbours' shares) and
      named in the round's ``secagg_malformed``.
    - Headroom: ``n·(2**bits - 1)·HEADROOM <= 2**32`` for the ``n`` clients of a round, checked
      before the protocol starts (:meth:`check_clients`); a round without it is refused.
    - Range: every coordinate of the unmasked sum, the weight slot included, must lie in
      ``[0, count·(2**bits - 1)]``, the range of ``count`` honest quantised inputs. An input
      beyond the quantisation range that wrapped, or a sum that a corrupted share turned into
      noise, aborts the round (:class:`SecAggAbort`) instead of yielding a wrapped aggregate.
    - Weight: ``weights`` holds what the server knows of each client's weight (its training
      examples: the clients' sizes in a simulation, the roster's declared ``num_train`` in a
      deployment; 1 under central or distributed DP). The secure weight sum must equal the
      survivors' known weights (each capped at ``clip·weight_bound``, as the client's slot is)
      within the quantisation error ``count·step·weight_bound``, else the round aborts: a
      forged weight slot can neither inflate the sum nor shrink the divisor (a slot lowered by
      one client amplified the aggregate ×5,900). The server still divides by the secure sum,
      not by the known weights: the check already confines the divisor to the known weights
      within the quantisation error (a relative change of about ``count·step·weight_bound /
      Σw``: 3e-4 for four sites of 100 examples at the defaults), so dividing by the known
      weights would protect no better, and would change every honest result in its last bits.
      Without ``weights`` the sum must be positive and at most ``count·clip·weight_bound``
      (plus the error): a shrunken divisor then goes undetected.

    What stays possible: a client may put any value of its quantisation range in each
    coordinate (``[-clip, clip]·weight_bound`` of ``w·Δ``), more if it wraps into the honest
    range of the sum; per-client range proofs (e.g. ACORN, Bell et al. 2023) are not
    implemented. Corrupted revealed shares are detected (and one per secret corrected) by
    :meth:`~consortium.secagg.protocol.SecAggServer.finish`.
    """

    clip: float = 1.0
    bits: int = 16
    weight_bound: float = 1000.0
    threshold: float = 0.5
    neighbours: int = 0
    extra_bounds: tuple[tuple[str, float], ...] = ()
    stage: str = "secure_aggregation"
    name: str = "secure_sum"
    needs: frozenset[str] = frozenset({"quantized"})
    linear: bool = True
    run_id: str = ""
    weights: tuple[tuple[str, float], ...] = ()
    """Client id -> the weight the server knows it sends (see above); empty: unknown."""
    integer: bool = False
    """Decode the sum as centred integers (values in ``[-2**31, 2**31)``), for
    :class:`SecureAggregation` with ``integer=True``: the exact sum goes to the server's
    halves in the extra ``secagg.integer_sum`` (int64), the weight is the summed count."""
    fraction: float = 1.0
    """Random-k (see :class:`SecureAggregation`): the masked vectors hold the round's shared
    ``k`` coordinates of the delta, scattered back into ``d`` here."""
    error_feedback: bool = False
    """With ``fraction < 1``: the clients keep what they did not send, so the scattered sum
    is not rescaled; without it the delta is scaled by ``d/k`` (unbiased over the set)."""

    def aggregate(self, updates: list[Update], *, ctx: RoundContext) -> Aggregate:
        from consortium.secagg.protocol import (
            ConsistencyRequest,
            SecAggAbort,
            SecAggConfig,
            SecAggServer,
            graph_degree,
        )
        from consortium.secagg.quantize import dequantize_sum

        exchange = ctx.exchange
        if exchange is None:
            raise PipelineError(
                "secure aggregation needs to reach the round's clients (RoundContext.exchange); "
                "run it through the round loop (consortium run / simulate)"
            )
        ids = sorted(u.client_id for u in updates)
        n = len(ids)
        if n < 2:
            raise PipelineError(
                f"secure aggregation needs at least 2 clients in a round, got {n}; raise "
                "sampling.clients_per_round"
            )
        problem = self._headroom_problem(n)
        if problem is not None:  # a sampled round larger than planned: this round only
            raise SecAggAbort(f"round {ctx.round} not summed: {problem}")
        # The threshold is a fraction of the neighbours each client really gets (one more than
        # asked when both counts are odd), the number its floor is checked against.
        k = graph_degree(n, n - 1 if self.neighbours <= 0 else min(self.neighbours, n - 1))
        config = SecAggConfig(
            num_clients_expected=n, threshold=max(1, math.ceil(self.threshold * k)), neighbours=k,
            round=ctx.round, context=secagg_context(self.run_id), modulus_bits=MODULUS_BITS,
        )
        server = SecAggServer(
            config=config, graph_seed=derive_seed(ctx.seed, "secagg-graph").to_bytes(8, "big")
        )

        length = self.vector_length(ctx.layout.size, updates[0].extras)
        malformed: list[str] = []

        def replies(phase: str, messages: Mapping[str, Any]) -> Iterator[Any]:
            for cid, reply in exchange(self.stage, phase, messages):
                sender = getattr(reply, "client_id", getattr(reply, "sender", None))
                if sender != cid:  # a reply claiming another client's id is dropped
                    continue
                vector = getattr(reply, "vector", None) if phase == "masked" else None
                if vector is not None and not (
                    isinstance(vector, torch.Tensor) and vector.dtype == torch.int64
                    and vector.shape == (length,) and _residues(vector)
                ):  # the client is dropped: its pairwise masks are removed as for a dropout
                    malformed.append(cid)
                    continue
                yield reply

        try:
            broadcasts = server.collect_keys(list(replies("keys", dict.fromkeys(ids, config))))
            routed = server.route_shares(list(replies("shares", broadcasts)))
            request = server.collect_masked(replies("masked", routed))
            requests = dict.fromkeys(request.survivors, request)
            if server.authenticated:  # Bonawitz et al. 2017, Fig. 4: ConsistencyCheck
                check = dict.fromkeys(request.survivors, ConsistencyRequest(request.survivors))
                requests = server.collect_consistency(replies("consistency", check))
            answers = list(replies("unmask", requests))
            result = server.finish(answers)
        finally:
            for _ in exchange(self.stage, "end", dict.fromkeys(ids)):
                pass
        count = len(result.contributors)
        dropped = sorted(set(ids) - set(result.contributors))
        info: dict[str, Any] = {"secagg_clients": count, "secagg_dropped": dropped,
                                "secagg_authenticated": server.authenticated}
        if server.corrupted:  # corrected: the sum is right, the holders are named
            info["secagg_corrupted_shares"] = sorted(server.corrupted)
        if malformed:  # sent a masked vector of another length or dtype: left out
            info["secagg_malformed"] = sorted(malformed)
        if self.integer:
            return self._decode_integer(result.sum, result.contributors, ctx, info)
        self._check_range(result.sum, count)
        total = dequantize_sum(
            result.sum, count=count, clip=self.clip, bits=self.bits, modulus=2**MODULUS_BITS,
        )
        d = ctx.layout.size
        k = sparse_count(d, self.fraction)
        weight = float(total[-1]) * self.weight_bound
        self._check_weight(weight, result.contributors)
        segments = _encode_scales(updates[0].extras, self.weight_bound, dict(self.extra_bounds))
        extras, offset = {}, k
        for name, size, scale in segments:
            extras[name] = (total[offset : offset + size] * scale).to(torch.float32)
            offset += size
        if k == d:
            delta = (total[:d] * self.weight_bound / weight).to(torch.float32)
        else:
            delta = self._scattered(total[:k], d, ctx.round) * self.weight_bound / weight
            delta = delta.to(torch.float32)
            info["secagg_coordinates"] = k
        return Aggregate(delta, weight, count, extras, info=info)

    def vector_length(self, d: int, extras: Mapping[str, torch.Tensor]) -> int:
        """The length every client's masked vector must have: the delta's ``k`` coordinates
        (``d`` unless random-k), each extra's size (none in integer mode), the weight slot."""
        if self.integer:
            return d + 1
        return sparse_count(d, self.fraction) + sum(t.numel() for t in extras.values()) + 1

    def _scattered(self, values: torch.Tensor, d: int, round: int) -> torch.Tensor:
        """The ``k`` summed coordinates put back at the round's shared set in a vector of
        ``d`` (float64), scaled by ``d/k`` unless the clients keep a residual."""
        from consortium.compression.secure import round_coordinates

        k = values.numel()
        idx = round_coordinates(d, k, context=secagg_context(self.run_id), round=round)
        out = torch.zeros(d, dtype=torch.float64)
        out[idx] = values.double() if self.error_feedback else values.double() * (d / k)
        return out

    def check_clients(self, n: int) -> None:
        """Refuse a configuration whose rounds of ``n`` clients the modulus cannot hold with
        :data:`HEADROOM`: ``n·(2**bits - 1)·HEADROOM <= 2**32`` (the pipeline's builder calls
        this with the planned cohort; a round that is larger anyway is aborted).

        Raises:
            PipelineError: names the cohort size, ``bits`` and the largest cohort they allow.
        """
        problem = self._headroom_problem(n)
        if problem is not None:
            raise PipelineError(problem)

    def _headroom_problem(self, n: int) -> str | None:
        if self.integer:  # values in (-2**31, 2**31), wrapping by design: no headroom to check
            return None
        levels = (1 << self.bits) - 1
        largest = (1 << MODULUS_BITS) // (levels * HEADROOM)
        if n <= largest:
            return None
        return (
            f"secure aggregation of {n} clients with bits = {self.bits} leaves the modulus "
            f"2**{MODULUS_BITS} less than {HEADROOM}× the largest honest sum ({n}·{levels}); "
            f"at most {largest} clients per round fit: lower secure_aggregation.bits or "
            "sampling.clients_per_round"
        )

    def _check_range(self, total: torch.Tensor, count: int) -> None:
        """Abort unless every coordinate of the unmasked sum is one ``count`` honest quantised
        inputs could produce: ``[0, count·(2**bits - 1)]`` (the sum is already reduced)."""
        from consortium.secagg.messages import SecAggAbort

        top = count * ((1 << self.bits) - 1)
        flat = total.reshape(-1).to(torch.int64)
        beyond = (flat < 0) | (flat > top)
        if bool(beyond.any()):
            where = beyond.nonzero().reshape(-1)
            first = int(where[0])
            slot = "the weight slot" if first == flat.numel() - 1 else f"coordinate {first}"
            raise SecAggAbort(
                f"secure aggregation range check: {int(where.numel())} coordinate(s) of the "
                f"unmasked sum lie outside [0, {top}], the range of {count} honest inputs "
                f"({slot}: {int(flat[first])}); a client sent a masked input beyond the "
                "quantisation range (it wrapped) or a corrupted share; the round is aborted "
                "rather than a wrapped aggregate used"
            )

    def _check_weight(self, weight: float, contributors: tuple[str, ...]) -> None:
        """Abort unless the securely summed ``weight`` is what the contributors' known
        weights allow (see the class docstring)."""
        from consortium.secagg.messages import SecAggAbort
        from consortium.secagg.quantize import quantization_step

        count = len(contributors)
        ceiling = self.clip * self.weight_bound  # the largest weight a slot can carry
        known = dict(self.weights)
        tolerance = count * quantization_step(clip=self.clip, bits=self.bits) * self.weight_bound
        tolerance *= 1 + 1e-9  # float rounding in the decode
        caps = [min(known.get(c, ceiling), ceiling) for c in contributors]
        problem = None
        if not weight > 0:
            problem = "is not positive"
        elif known and all(c in known for c in contributors):
            if abs(weight - sum(caps)) >= tolerance:
                problem = (
                    f"differs from the contributors' known weights {sum(caps):.6g} by more "
                    f"than the quantisation error {tolerance:.3g}"
                )
        elif weight >= sum(caps) + tolerance:
            problem = f"exceeds the {count} contributors' largest possible {sum(caps):.6g}"
        if problem is not None:
            raise SecAggAbort(
                f"secure aggregation weight check: the securely summed weight {weight:.6g} "
                f"{problem}; a client forged its weight slot, and dividing by it would "
                "amplify or shrink the aggregate; the round is aborted"
            )

    def _decode_integer(
        self, total: torch.Tensor, contributors: tuple[str, ...], ctx: RoundContext,
        info: dict[str, Any],
    ) -> Aggregate:
        from consortium.privacy.distributed import INTEGER_SUM
        from consortium.secagg.messages import SecAggAbort

        modulus = 1 << MODULUS_BITS
        v = total.to(torch.int64) % modulus
        v = torch.where(v >= modulus // 2, v - modulus, v)  # centred: [-2**31, 2**31)
        d = ctx.layout.size
        weight = float(v[d])
        count = len(contributors)
        known = dict(self.weights)
        expected = (
            sum(known[c] for c in contributors) if all(c in known for c in contributors)
            else None
        )
        if not weight > 0 or (expected is not None and weight != expected):
            raise SecAggAbort(
                f"secure aggregation weight check: the securely summed count {weight:g} is "
                + (f"not the contributors' known {expected:g}" if expected is not None
                   else "not positive")
                + "; a client forged its weight; the round is aborted"
            )
        return Aggregate(
            (v[:d].double() / weight).to(torch.float32), weight, count, {INTEGER_SUM: v[:d]},
            info=info,
        )


def secure_aggregation(
    *, clip: float = 1.0, bits: int = 16, weight_bound: float = 1000.0, threshold: float = 0.5,
    neighbours: int = 0, extra_bounds: Mapping[str, float] | None = None, run_id: str = "",
    authenticate: bool = False, integer: bool = False, weights: Mapping[str, float] | None = None,
    fraction: float = 1.0, error_feedback: bool = False,
) -> tuple[SecureAggregation, SecureSum]:
    """The stage and the aggregator of secure aggregation, to put in a pipeline together.

    ``extra_bounds`` gives the largest ``|value|`` of each named extra of one client (see an
    algorithm's ``secure_bounds``); extras without one are scaled by ``weight_bound``.
    ``run_id`` binds the rounds to the run (the deployment passes its run id; the sites check
    it). ``authenticate`` makes an in-process run sign and check every key and survivor set
    with certificates of an in-memory CA (:class:`~consortium.secagg.identity.SimulatedAuthority`)
    and run the consistency round, as a deployment with provisioned sites does; deployed sites
    sign with their own identities whatever this says. ``integer`` sums integer deltas and
    weights exactly (distributed DP, :mod:`consortium.privacy.distributed`) instead of
    quantising floats. ``weights`` (client id -> the weight the server knows it sends: its
    training examples, or 1 under central or distributed DP) lets the server check the
    securely summed weight (see :class:`SecureSum`). ``fraction < 1`` sends only the round's
    shared random-k coordinates of the delta (:mod:`consortium.compression.secure`): with
    ``error_feedback`` the clients keep the rest for later rounds, without it the server
    scales the summed coordinates by ``d/k``.
    """
    if not clip > 0 or not weight_bound > 0:
        raise PipelineError("secure aggregation needs clip > 0 and weight_bound > 0")
    if not 0 < threshold <= 1:
        raise PipelineError(f"secure aggregation threshold = {threshold} must be in (0, 1]")
    if not 2 <= bits <= 24:
        raise PipelineError(f"secure aggregation bits = {bits} must be in [2, 24]")
    if not 0 < fraction <= 1:
        raise PipelineError(f"secure aggregation fraction = {fraction} must be in (0, 1]")
    if fraction < 1 and integer:
        raise PipelineError(
            "random-k under secure aggregation does not combine with its integer mode "
            "(distributed DP): the discrete Gaussian noise and its sensitivity are calibrated "
            "on all d coordinates; use compression.uplink = \"none\" with distributed DP"
        )
    bounds = tuple(sorted((extra_bounds or {}).items()))
    for name, bound in bounds:
        if not bound > 0:
            raise PipelineError(f"secure aggregation bound of extra {name!r} = {bound} must be > 0")
    known = tuple(sorted((weights or {}).items()))
    for cid, w in known:
        if not math.isfinite(w) or w < 0:
            raise PipelineError(f"secure aggregation: the known weight of {cid!r} = {w} must be >= 0")
    simulated = None
    if authenticate:
        from consortium.secagg.identity import SimulatedAuthority

        simulated = SimulatedAuthority()
    return (
        SecureAggregation(clip, bits, weight_bound, threshold, bounds, simulated=simulated,
                          integer=integer, fraction=fraction, error_feedback=error_feedback),
        SecureSum(clip, bits, weight_bound, threshold, neighbours, bounds, run_id=run_id,
                  weights=known, integer=integer, fraction=fraction,
                  error_feedback=error_feedback),
    )
