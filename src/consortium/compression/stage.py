"""The compression stage: the client half encodes (with error feedback), the server half decodes.

The client half replaces the float32 delta with an :class:`~consortium.compression.encoded.Encoded`
(``update.delta`` becomes empty, ``update.encoded`` carries what travels, and
:attr:`~consortium.messages.Result.nbytes` counts its exact bytes); the ``receive`` half decodes it
before aggregation. Signs (signSGD) also have a server half: the majority vote.

Error feedback (Stich, Cordonnier & Jaggi, "Sparsified SGD with memory", NeurIPS 2018;
Karimireddy, Rebjock, Stich & Jaggi, "Error feedback fixes SignSGD and other gradient
compression schemes", ICML 2019): the client compresses ``v = Δ + e`` and keeps the residual
``e ← v − C(v)`` (what the server will *not* see) in its persistent client state
(``ClientContext.state``, key :data:`RESIDUAL_KEY`), so that nothing a client computed is lost,
only delayed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from consortium.aggregation.base import Aggregate, ClientContext, RoundContext, StageState
from consortium.compression.codecs import (
    encode_cast,
    encode_int,
    encode_qsgd,
    encode_randk,
    encode_sign,
    encode_topk,
    keep_count,
)
from consortium.compression.encoded import Encoded, MalformedUpdate, decode
from consortium.errors import PipelineError
from consortium.seeds import derive_seed
from consortium.types import Layout, Update

__all__ = ["METHODS", "RESIDUAL_KEY", "Compress", "compress"]

METHODS = ("none", "topk", "randk", "qsgd", "int8", "int4", "int2", "fp16", "bf16", "sign",
           "powersgd")
VALUES = ("float32", "fp16")
INDICES = ("int32", "rice")
RESIDUAL_KEY = "compression.residual"
Q_KEY = "compression.q"


def _uniform(ctx: ClientContext, purpose: str) -> Callable[[int], torch.Tensor]:
    """Draws for stochastic rounding: the site's CSPRNG when deployed, else the client's seed."""
    randomness = getattr(ctx.site, "randomness", None) if ctx.site is not None else None
    if randomness is not None:
        return randomness.uniform  # type: ignore[no-any-return]
    gen = torch.Generator().manual_seed(derive_seed(ctx.seed, "compression", purpose))
    return lambda n: torch.rand(n, generator=gen)


def _seed(ctx: ClientContext, purpose: str) -> int:
    randomness = getattr(ctx.site, "randomness", None) if ctx.site is not None else None
    if randomness is not None:
        return int(randomness.seed63())
    return derive_seed(ctx.seed, "compression", purpose)


@dataclass(frozen=True)
class Compress:
    """Compress each client's delta on the way up (see the module docstring).

    Attributes:
        method: one of :data:`METHODS` but ``"none"``.
        fraction: coordinates kept by top-k and random-k.
        bits: bits per coordinate: QSGD's levels ``2^bits − 1`` (plus a sign bit); int8/4/2
            take theirs from the name.
        chunk: bucket length of QSGD and int quantisation (one float32 scale per bucket).
        rank: PowerSGD's rank.
        error_feedback: keep the residual ``v − C(v)`` at the client and add it next round.
        sign_lr: signSGD's server step: the global model moves by ``sign_lr · sign(Σ sᵢ)``.
        values: top-k's kept values: ``"float32"`` or ``"fp16"`` (2 bytes each).
        indices: top-k's indices: ``"int32"`` (4 bytes each) or ``"rice"`` (Golomb–Rice coded
            gaps, about ``log2(d/k) + 1.5`` bits each; the kind ``sparse``).

    PowerSGD's clients take the layers' shapes from their own layout
    (:attr:`ClientContext.layout <consortium.aggregation.base.ClientContext.layout>`: the
    task's parameters, loaded into the client's own model), the server decodes with its own
    layout's shapes, and nothing about the shapes travels in the task; a client's warm-start
    ``Q`` and residual are its persistent state (a deployed site's ``--state``).
    """

    method: str
    fraction: float = 0.01
    bits: int = 4
    chunk: int = 512
    rank: int = 2
    error_feedback: bool = False
    sign_lr: float = 0.01
    values: str = "float32"
    indices: str = "int32"

    @property
    def name(self) -> str:
        return f"compress-{self.method}"

    @property
    def needs(self) -> frozenset[str]:
        return frozenset()

    @property
    def gives(self) -> frozenset[str]:
        return frozenset({"compressed"})

    def init(self, layout: Layout) -> StageState:
        return {}

    def broadcast(self, state: StageState) -> dict[str, Any]:
        """Nothing: every client knows its own layout (PowerSGD's shapes)."""
        return {}

    # -- client ------------------------------------------------------------------------------

    def encode(
        self, v: torch.Tensor, ctx: ClientContext, state: dict[str, torch.Tensor],
        payload: Mapping[str, Any],
    ) -> Encoded:
        """``C(v)`` for this client and round (``state``: its persistent client state;
        ``payload``: the stage's broadcast)."""
        m = self.method
        if m in ("fp16", "bf16"):
            return encode_cast(v, m)
        if m == "topk":
            return encode_topk(v, self.fraction, values=self.values, indices=self.indices)
        if m == "randk":
            return encode_randk(v, self.fraction, _seed(ctx, "randk"))
        if m == "qsgd":
            return encode_qsgd(v, bits=self.bits, chunk=self.chunk, uniform=_uniform(ctx, "qsgd"))
        if m in ("int8", "int4", "int2"):
            return encode_int(v, bits=int(m[3:]), chunk=self.chunk, uniform=_uniform(ctx, m))
        if m == "sign":
            return encode_sign(v)
        if m == "powersgd":
            return self._encode_lowrank(v, ctx, state, _shapes(ctx, payload, v.numel()))
        raise PipelineError(f"unknown compression method {m!r}; expected one of {METHODS}")

    def _encode_lowrank(
        self, v: torch.Tensor, ctx: ClientContext, state: dict[str, torch.Tensor],
        shapes: list[list[int]],
    ) -> Encoded:
        from consortium.compression.lowrank import encode_lowrank, q_length

        need = q_length(shapes, self.rank)
        q = state.get(Q_KEY)
        if q is None or q.numel() != need:  # Vogels et al.: a random start, then warm starts
            gen = torch.Generator().manual_seed(_seed(ctx, "powersgd"))
            q = torch.randn(need, generator=gen)
        values, state[Q_KEY] = encode_lowrank(v, shapes, self.rank, q)
        return Encoded("lowrank", v.numel(), (self.rank,), values=values)

    def client(self, update: Update, payload: Mapping[str, Any], ctx: ClientContext) -> Update:
        """Encode ``Δ (+ e)``; the delta leaves empty and the encoding travels instead.

        Raises:
            PipelineError: error feedback without a persistent client state to keep it in.
        """
        v = update.delta.to(torch.float32)
        state = ctx.state
        if state is None:
            if self.error_feedback or self.method == "powersgd":
                raise PipelineError(
                    f"{self.name} keeps state across rounds (error feedback, PowerSGD's warm "
                    "start) but the client context has no persistent state; pass "
                    "ClientContext(state=...) (the executors pass the client-state store's entry)"
                )
            state = {}
        if self.error_feedback:
            residual = state.get(RESIDUAL_KEY)
            if residual is not None and residual.numel() == v.numel():
                v = v + residual
        enc = self.encode(v, ctx, state, payload)
        if self.error_feedback:
            shapes = _shapes(ctx, payload, v.numel()) if self.method == "powersgd" else None
            state[RESIDUAL_KEY] = v - decode(enc, size=v.numel(), shapes=shapes)
        # one vote per client under signSGD (Bernstein et al.'s majority vote is unweighted)
        weight = 1.0 if self.method == "sign" else update.weight
        return dataclasses.replace(update, delta=torch.zeros(0), encoded=enc, weight=weight)

    # -- server ------------------------------------------------------------------------------

    def receive(self, update: Update, state: StageState, ctx: RoundContext) -> Update:
        """Decode the update (strictly: :meth:`decoded`)."""
        delta = self.decoded(update, ctx.layout)
        return dataclasses.replace(update, delta=delta, encoded=None)

    def decoded(self, update: Update, layout: Layout) -> torch.Tensor:
        """The dense delta of ``update``'s encoding, after checking it is the kind this run
        sends and decodes for ``layout`` (:func:`~consortium.compression.encoded.decode`).

        Raises:
            MalformedUpdate: no encoding, another kind or bit width, a dense delta beside the
                encoding, an encoding :func:`decode` refuses, or top-k with another ``k``
                than ``fraction`` gives or values of another dtype than ``values``.
        """
        enc = update.encoded
        who = f"client {update.client_id!r}"
        if not isinstance(enc, Encoded):
            raise MalformedUpdate(
                f"{who} sent no {self.method} encoding; every client of this run compresses "
                "its update (the same [compression] section)"
            )
        if enc.kind != self.kind:
            raise MalformedUpdate(
                f"{who} sent a {enc.kind!r} encoding; this run expects {self.kind!r}"
            )
        if self.method in ("int8", "int4", "int2") and enc.header[:1] != (int(self.method[3:]),):
            raise MalformedUpdate(f"{who} sent {enc.header[:1]}-bit codes; this run expects "
                                  f"{self.method}")
        if update.delta.numel():
            raise MalformedUpdate(f"{who} sent a dense delta beside its encoding")
        dense = decode(enc, size=layout.size, shapes=[s.shape for s in layout.specs])
        if self.method == "topk":  # after decode, whose reasons name the malformed field
            self._check_topk(enc, layout.size, who)
        return dense

    @property
    def kind(self) -> str:
        """The :class:`Encoded` kind this stage's clients send."""
        if self.method == "topk" and self.indices == "rice":
            return "sparse"
        return _KIND[self.method]

    def _check_topk(self, enc: Encoded, size: int, who: str) -> None:
        # an honest client keeps keep_count(d, fraction) values of the run's dtype
        k = keep_count(size, self.fraction)
        if enc.header[:1] != (k,):
            sent = enc.header[0] if enc.header else "no"
            raise MalformedUpdate(f"{who} sent k = {sent} coordinates; this run keeps "
                                  f"k = {k} (compression.fraction = {self.fraction})")
        dtype = torch.float16 if self.values == "fp16" else torch.float32
        if enc.values is not None and enc.values.dtype != dtype:
            raise MalformedUpdate(f"{who} sent {enc.values.dtype} values; this run's "
                                  f"compression.values = {self.values!r}")

    def server(
        self, aggregate: Aggregate, state: StageState, ctx: RoundContext
    ) -> tuple[Aggregate, StageState]:
        """signSGD's majority vote (Bernstein et al. 2019): the model moves by
        ``sign_lr · sign(Σ wᵢ sᵢ)``; other methods pass the aggregate through."""
        if self.method != "sign" or aggregate.delta.numel() == 0:
            return aggregate, state
        vote = torch.sign(aggregate.delta) * self.sign_lr
        return dataclasses.replace(aggregate, delta=vote), state


def _shapes(ctx: ClientContext, payload: Mapping[str, Any], size: int) -> list[list[int]]:
    """The layers' shapes PowerSGD factorises: the client's own layout (``ctx.layout``), or a
    ``"shapes"`` list a caller passes in the payload (unit tests without a layout)."""
    shapes = payload.get("shapes")
    if shapes is None and ctx.layout is not None:
        shapes = [list(s.shape) for s in ctx.layout.specs]
    if not isinstance(shapes, list) or sum(_numel(s) for s in shapes) != size:
        raise PipelineError(
            f"powersgd needs the layers' shapes of the {size}-value update: pass "
            "ClientContext(layout=...) (the layout of the task's parameters; the executors "
            "and a deployed site pass it)"
        )
    return [[int(x) for x in s] for s in shapes]


def _numel(shape: Any) -> int:
    n = 1
    for x in shape:
        n *= int(x)
    return n


_KIND = {
    "topk": "topk", "randk": "randk", "qsgd": "qsgd", "int8": "int", "int4": "int",
    "int2": "int", "fp16": "fp16", "bf16": "bf16", "sign": "sign", "powersgd": "lowrank",
}


def compress(method: str, **settings: Any) -> Compress:
    """A :class:`Compress` stage after checking its settings.

    Raises:
        PipelineError: an unknown method, top-k's ``values``/``indices`` unknown or set for
            another method, a fraction outside (0, 1], bits outside [1, 7] for
            QSGD, a chunk or rank below 1, a sign_lr ≤ 0, or a method that needs error
            feedback (PowerSGD) without it / cannot take it (sign).
    """
    stage = Compress(method, **settings)
    if method not in METHODS or method == "none":
        raise PipelineError(f"compression method {method!r} is not one of {METHODS[1:]}")
    if not 0 < stage.fraction <= 1:
        raise PipelineError(f"compression.fraction = {stage.fraction} must be in (0, 1]")
    if method == "qsgd" and not 1 <= stage.bits <= 7:
        raise PipelineError(f"compression.bits = {stage.bits} must be in [1, 7] for qsgd")
    if stage.chunk < 1 or stage.rank < 1:
        raise PipelineError("compression.chunk and compression.rank must be >= 1")
    if stage.values not in VALUES or stage.indices not in INDICES:
        raise PipelineError(
            f"compression.values = {stage.values!r} / compression.indices = {stage.indices!r}: "
            f"expected values in {VALUES} and indices in {INDICES}"
        )
    if method != "topk" and (stage.values, stage.indices) != (VALUES[0], INDICES[0]):
        raise PipelineError(
            f"compression.values and compression.indices choose top-k's compact form; "
            f"compression.uplink = {method!r} does not use them: set uplink = \"topk\" or "
            f"leave values = \"float32\" and indices = \"int32\""
        )
    if method == "sign" and not stage.sign_lr > 0:
        raise PipelineError(f"compression.sign_lr = {stage.sign_lr} must be > 0")
    if method == "sign" and stage.error_feedback:
        raise PipelineError(
            "compression.uplink = 'sign' sends ±1 per coordinate and the server takes the "
            "majority vote, so the residual Δ − sign(Δ) is not what the server lost; set "
            "compression.error_feedback = false (or use topk / qsgd with error feedback)"
        )
    if method == "powersgd" and not stage.error_feedback:
        raise PipelineError(
            "PowerSGD is biased and converges only with error feedback (Vogels et al. 2019 §3); "
            "set compression.error_feedback = true"
        )
    return stage
