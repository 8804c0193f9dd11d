"""Downlink compression: the server broadcasts a compressed model difference, EF21-P style.

EF21-P (Gruntkowska, Tyurin & Richtárik, "EF21-P and friends: improved theoretical
communication complexity for distributed optimization with bidirectional compression", ICML
2023): the server keeps, beside its model ``x``, the model ``x̂`` every client can reconstruct.
Each round it sends ``m = C(x − x̂)`` and both sides set ``x̂ ← x̂ + γ·D(m)``; the clients train
from ``x̂`` and the server applies the aggregate of their deltas to ``x``. The gradients are
taken at ``x̂`` and applied to ``x``, as in EF21-P; what ``C`` loses one round stays in
``x − x̂`` and is sent later, so the compression error never accumulates.

``C`` is one of the uplink's encoders (:mod:`consortium.compression.codecs`): ``fp16``,
``bf16``, ``topk``, ``randk``, ``qsgd``, ``int8``/``int4``/``int2``. EF21-P needs a
*contractive* compressor (``E‖C(v) − v‖² ≤ (1 − α)‖v‖²``): top-k, unscaled random-k and the
half-precision casts are, and go as they are (``γ = 1``). The unbiased quantisers (QSGD, int
with stochastic rounding: ``E C(v) = v``, ``E‖C(v)‖² ≤ (1 + ω)‖v‖²``) are not when ``ω ≥ 1``,
and the fixed remedy ``γ = 1/(1 + ω)`` (Beznosikov, Horváth, Richtárik & Safaryan, "On biased
compression for distributed learning", 2020, Lemma 1) follows the worst case (int2's ``ω`` is
128 for buckets of 512: x̂ would crawl). So for them the server sends with each message the
least-squares scale ``γ = ⟨v, D(m)⟩ / ‖D(m)‖²`` (4 bytes, float32, counted): then
``‖v − γD(m)‖² = ‖v‖²(1 − cos²)`` never exceeds ``‖v‖²``, and since ``(a, b) ↦ a²/b`` is jointly
convex, ``E[⟨v, D⟩²/‖D‖²] ≥ ‖v‖⁴ / ((1 + ω)‖v‖²)``: in expectation it contracts at least as
much as ``1/(1 + ω)`` does, ``E‖v − γD‖² ≤ ω/(1 + ω)·‖v‖²``.
signSGD (no magnitude) and PowerSGD (state at both ends) are refused.

The stochastic rounding draws (and random-k's indices) come from the run seed and the round
(``derive_seed(seed, "downlink", round)``): the server's randomness here protects nothing
private (what it compresses is the model it would otherwise send whole), and a fixed seed keeps
a resumed run bit-identical.

Bytes (``bytes_down``, :attr:`consortium.messages.Task.nbytes`): a client receives what it
needs to hold this round's ``x̂``. On first contact that is the whole model in float32
(``4d`` bytes); after that, a client that last received round ``s``'s model gets the messages
of rounds ``s+1 … t`` (their exact :attr:`~consortium.compression.Encoded.nbytes`), or the whole
model again when that is fewer bytes. The state (``x̂``, each client's last round, the running
total of message sizes) lives in :attr:`consortium.server.loop.RunState.downlink` and is
checkpointed with it.

Simulation only for now: the gRPC task carries a dense model (refused when deployed).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from consortium.compression.codecs import (
    encode_cast,
    encode_int,
    encode_qsgd,
    encode_randk,
    encode_topk,
)
from consortium.compression.encoded import Encoded, MalformedUpdate, decode
from consortium.errors import ConfigError, PipelineError
from consortium.types import Parameters

__all__ = ["DOWNLINK_ALGORITHMS", "DOWNLINK_METHODS", "Downlink", "downlink_compressor"]

DOWNLINK_METHODS = ("topk", "randk", "qsgd", "int8", "int4", "int2", "fp16", "bf16")
"""What ``compression.downlink`` may name besides ``"none"``."""

DOWNLINK_ALGORITHMS = frozenset({"fedavg", "fedprox"})
"""Algorithms whose client update stays correct when clients train from ``x̂`` and the server
steps ``x``: their only anchor is the model the client received (FedProx's proximal term
included). SCAFFOLD's and FedNova's server state, the personalised algorithms' per-client
models and IFCA's cluster models are not checked against ``x̂ ≠ x`` yet, so they are refused."""


@dataclass(frozen=True)
class Downlink:
    """EF21-P downlink compression (see the module docstring).

    Attributes:
        method: one of :data:`DOWNLINK_METHODS`.
        fraction: coordinates kept by top-k / random-k.
        bits: QSGD's bits (``2^bits − 1`` levels).
        chunk: bucket length of QSGD and int quantisation.
    """

    method: str
    fraction: float = 0.01
    bits: int = 4
    chunk: int = 512

    @property
    def scaled(self) -> bool:
        """Whether a message carries the least-squares scale ``γ`` (the unbiased quantisers)."""
        return self.method in ("qsgd", "int8", "int4", "int2")

    def encode(self, v: torch.Tensor, seed: int) -> Encoded:
        """``C(v)`` with this round's draws (``seed``)."""
        m = self.method
        gen = torch.Generator().manual_seed(seed)

        def uniform(n: int) -> torch.Tensor:
            return torch.rand(n, generator=gen)

        if m in ("fp16", "bf16"):
            return encode_cast(v, m)
        if m == "topk":
            return encode_topk(v, self.fraction)
        if m == "randk":
            return encode_randk(v, self.fraction, seed)
        if m == "qsgd":
            return encode_qsgd(v, bits=self.bits, chunk=self.chunk, uniform=uniform)
        if m in ("int8", "int4", "int2"):
            return encode_int(v, bits=int(m[3:]), chunk=self.chunk, uniform=uniform)
        raise PipelineError(f"downlink method {m!r} is not one of {DOWNLINK_METHODS}")

    def message(self, v: torch.Tensor, seed: int) -> tuple[torch.Tensor, int]:
        """``γ·D(C(v))`` (what every receiver adds to ``x̂``) and the message's exact bytes.

        Raises:
            PipelineError: the message does not decode (fp16 overflow: ``x − x̂`` beyond ±65504).
        """
        encoded = self.encode(v, seed)
        try:
            dense = decode(encoded, size=v.numel())
        except MalformedUpdate as exc:
            raise PipelineError(
                f"the downlink message does not decode ({exc}); with fp16 the model moved by "
                "more than 65504 in a coordinate: use compression.downlink = \"bf16\""
            ) from exc
        if not self.scaled:
            return dense, int(encoded.nbytes)
        norm2 = float(dense.double().square().sum())
        gamma = float(dense.double() @ v.double()) / norm2 if norm2 > 0 else 1.0
        scale = torch.tensor(gamma, dtype=torch.float32)  # what travels: 4 bytes
        return dense * scale, int(encoded.nbytes) + 4

    def broadcast(
        self, state: Mapping[str, Any], params: Parameters, recipients: Sequence[str], *,
        round: int, seed: int,
    ) -> tuple[Parameters, dict[str, int], dict[str, Any]]:
        """One round's downlink: the model the clients train from (``x̂`` after this round's
        message), the bytes each recipient receives, and the new state.

        ``state`` is ``{}`` before the first round (``x̂`` starts as the current model) or
        ``{"model": x̂, "synced": {client: last round received}, "sent": [total message bytes
        up to each round]}``.
        """
        x = params.vector
        if state:
            x_hat = state["model"]
            synced, sent = dict(state["synced"]), list(state["sent"])
        else:
            x_hat, synced, sent = x.clone(), {}, [0] * round  # rounds before: nothing sent
        step, size = self.message((x - x_hat).to(torch.float32), seed)
        x_hat = (x_hat + step).to(torch.float32)
        sent.append(sent[-1] + size)  # sent[r]: bytes of messages 1 … r
        full = x.numel() * 4  # the whole model in float32
        nbytes: dict[str, int] = {}
        for cid in recipients:
            last = synced.get(cid)
            catch_up = sent[round] - sent[last] if last is not None else full
            nbytes[cid] = min(catch_up, full)
            synced[cid] = round
        return (params.replace(x_hat), nbytes,
                {"model": x_hat, "synced": synced, "sent": sent})


def check_state(state: Mapping[str, Any], size: int, where: str, *, round: int) -> None:
    """Refuse a checkpoint's downlink state (after ``round``) that is not a finite float32
    model of ``size``, one running byte total a round and each client's last round in it.

    Raises:
        PipelineError: the state is malformed.
    """
    if not state:
        return
    model = state.get("model")
    if (not isinstance(model, torch.Tensor) or model.dtype != torch.float32
            or model.dim() != 1 or model.numel() != size or not bool(torch.isfinite(model).all())):
        raise PipelineError(f"{where}: the downlink model x̂ is not a finite float32 vector of "
                            f"{size} values; the checkpoint was edited: restore it")
    synced, sent = state.get("synced"), state.get("sent")
    if not (isinstance(synced, dict) and isinstance(sent, list) and len(sent) == round + 1
            and all(isinstance(n, int) and n >= 0 for n in sent)
            and all(isinstance(r, int) and 0 <= r <= round for r in synced.values())):
        raise PipelineError(f"{where}: the downlink state is malformed (its clients' rounds or "
                            "byte totals do not fit the round); restore the checkpoint")


def downlink_compressor(cfg: Any, *, deployed: bool = False) -> Downlink | None:
    """The :class:`Downlink` ``cfg.compression.downlink`` asks for, or ``None`` for ``"none"``.

    Raises:
        ConfigError: a method that cannot compress the downlink, a deployment, an algorithm
            outside :data:`DOWNLINK_ALGORITHMS`, or an invalid setting.
    """
    c = cfg.compression
    method = c.downlink
    if method == "none":
        return None
    if method not in DOWNLINK_METHODS:
        raise ConfigError(
            f"compression.downlink = {method!r} cannot compress the broadcast model ("
            + ("signs carry no magnitude to move the clients' model by"
               if method == "sign" else "PowerSGD's warm start would be state at every client")
            + f"); use one of {', '.join(DOWNLINK_METHODS)}"
        )
    if deployed:
        raise ConfigError(
            f"compression.downlink = {method!r} works in simulation only for now: the gRPC "
            "task carries the dense model; set compression.downlink = \"none\" for a deployment"
        )
    name = cfg.algorithm.name
    if name not in DOWNLINK_ALGORITHMS:
        raise ConfigError(
            f"compression.downlink = {method!r} makes clients train from the compressed model "
            f"x̂ while the server steps its own x; algorithm.name = {name!r} is not checked to "
            f"stay correct with that (it works with {', '.join(sorted(DOWNLINK_ALGORITHMS))}); "
            "set compression.downlink = \"none\" or use fedavg/fedprox"
        )
    if not 0 < c.fraction <= 1:
        raise ConfigError(f"compression.fraction = {c.fraction} must be in (0, 1]")
    if method == "qsgd" and not 1 <= c.bits <= 7:
        raise ConfigError(f"compression.bits = {c.bits} must be in [1, 7] for qsgd")
    if c.chunk < 1:
        raise ConfigError("compression.chunk must be >= 1")
    return Downlink(method, fraction=c.fraction, bits=c.bits, chunk=c.chunk)
