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

**Per-client reference** (``compression.downlink_reference = "per_client"``; always in a
deployment). With a shared ``x̂`` a client that was away for rounds needs every message it
missed, which at 10 % participation costs about as much as the whole model (RESULTS.md
"Downlink compression"). Instead the server keeps, for each client it has sent to, the model
``x̂ᵢ`` that client now holds, and sends one message ``C(x − x̂ᵢ)`` per task (seeded by the
round and the client), ``x̂ᵢ ← x̂ᵢ + γ·D(m)``: EF21-P with one reference per receiver (the
error of ``C`` stays in ``x − x̂ᵢ`` and goes with the client's next message). The first
contact, or a message no smaller than the model, sends the float32 model (``x̂ᵢ ← x``). The
server holds ``d`` float32 values per client it has reached: :meth:`Downlink.check_memory`
refuses a population whose references would pass ``compression.downlink_memory_mb``. State:
``{"models": {client: x̂ᵢ}, "synced": {client: round of x̂ᵢ}}`` (checkpointed).

**Over gRPC** a task after the first contact carries a :class:`ModelDelta`: the encoded
message, its scale, the round of the reference it applies to and the SHA-256 of the model it
gives. The site (:class:`SiteReference`) keeps its ``x̂ᵢ`` (in memory and in its ``--state``
file), decodes the message strictly against its own model's size and the run's downlink
method, applies it and checks the hash; a reference that does not match (a restarted site
without its state, a lost task, a restarted server) or a wrong hash is answered with
:data:`RESYNC` and the reason, and the server sends that task again with the float32 model
(:meth:`consortium.deploy.hub.Hub.deliver`), so the site trains from the same ``x̂ᵢ`` and the
run goes on.
"""

from __future__ import annotations

import hashlib
import math
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
from consortium.errors import ConfigError, ConsortiumError, PipelineError
from consortium.seeds import derive_seed
from consortium.types import Layout, Parameters

__all__ = [
    "DOWNLINK_ALGORITHMS",
    "DOWNLINK_METHODS",
    "RESYNC",
    "Downlink",
    "DownlinkMismatch",
    "ModelDelta",
    "SiteReference",
    "downlink_compressor",
    "model_sha256",
]

RESYNC = "downlink reference mismatch"
"""How a site's error result starts when it cannot rebuild the model from a task's
:class:`ModelDelta`: the server then sends the task again with the float32 model."""

REFERENCES = ("shared", "per_client")
"""What ``compression.downlink_reference`` may name."""


class DownlinkMismatch(ConsortiumError):
    """The site cannot rebuild the task's model from its reference (none, another round, a
    message that does not decode for its model, or a model whose SHA-256 differs)."""


def model_sha256(vector: torch.Tensor) -> bytes:
    """SHA-256 of a float32 model's little-endian bytes (what a :class:`ModelDelta` names)."""
    flat = vector.detach().to(torch.float32).contiguous().reshape(-1)
    return hashlib.sha256(flat.numpy().tobytes()).digest()


@dataclass(frozen=True)
class ModelDelta:
    """What a deployed task carries instead of the float32 model (per-client reference).

    Attributes:
        encoded: ``C(x − x̂ᵢ)`` as encoded (:class:`~consortium.compression.Encoded`).
        scale: the least-squares ``γ`` (float32) of the unbiased quantisers, else ``None``.
        reference_round: the round whose model ``x̂ᵢ`` the message applies to.
        sha256: of the model the site holds after applying it (float32 bytes).
        problem: why the received message is malformed (the wire decoder's reason; the site
            answers with it instead of failing); ``None``: well-formed.
    """

    encoded: Encoded | None
    scale: float | None
    reference_round: int
    sha256: bytes
    problem: str | None = None

    @property
    def nbytes(self) -> int:
        """The message's exact bytes as ``bytes_down`` counts them (the encoding, and the
        scale's 4 bytes when there is one)."""
        n = int(self.encoded.nbytes) if self.encoded is not None else 0
        return n + (4 if self.scale is not None else 0)

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
    reference: str = "shared"
    """``"shared"`` (one ``x̂`` for all) or ``"per_client"`` (one ``x̂ᵢ`` per client)."""
    memory_mb: float = 2048.0
    """Most MiB of per-client references the server may hold (``per_client``)."""
    deployed: bool = False
    """Tasks carry a :class:`ModelDelta` (the gRPC wire form) besides the rebuilt model."""

    @property
    def per_client(self) -> bool:
        """Whether the server keeps one reference per client."""
        return self.reference == "per_client"

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
        step, size, _, _ = self._message(v, seed)
        return step, size

    def _message(
        self, v: torch.Tensor, seed: int
    ) -> tuple[torch.Tensor, int, Encoded, float | None]:
        """:meth:`message` with the encoding and the float32 scale that travel."""
        encoded = self.encode(v, seed)
        try:
            dense = decode(encoded, size=v.numel())
        except MalformedUpdate as exc:
            raise PipelineError(
                f"the downlink message does not decode ({exc}); with fp16 the model moved by "
                "more than 65504 in a coordinate: use compression.downlink = \"bf16\""
            ) from exc
        if not self.scaled:
            return dense, int(encoded.nbytes), encoded, None
        norm2 = float(dense.double().square().sum())
        gamma = float(dense.double() @ v.double()) / norm2 if norm2 > 0 else 1.0
        scale = torch.tensor(gamma, dtype=torch.float32)  # what travels: 4 bytes
        return dense * scale, int(encoded.nbytes) + 4, encoded, float(scale)

    def check_memory(self, population: int, size: int) -> None:
        """Refuse a per-client reference for each of ``population`` clients of a model of
        ``size`` values when together they pass :attr:`memory_mb`.

        Raises:
            ConfigError: the references would not fit, with the number and the fixes.
        """
        need = population * size * 4 / 2**20
        if self.per_client and need > self.memory_mb:
            raise ConfigError(
                f"compression.downlink_reference = \"per_client\" keeps the model each client "
                f"holds at the server: {population} clients x {size} float32 values = "
                f"{need:,.0f} MiB, above compression.downlink_memory_mb = {self.memory_mb:g}; "
                "raise compression.downlink_memory_mb or use downlink_reference = \"shared\""
            )

    def prepare(
        self, state: Mapping[str, Any], params: Parameters, recipients: Sequence[str], *,
        round: int, seed: int, population: int,
    ) -> tuple[dict[str, Parameters], dict[str, int], dict[str, ModelDelta], dict[str, Any]]:
        """One round's downlink in either mode, as the round loop needs it: for each recipient
        the model it trains from, the bytes it receives, the message its deployed task carries
        (per-client mode only) and the new state (:meth:`send`, :meth:`broadcast`)."""
        if self.per_client:
            return self.send(state, params, recipients, round=round, seed=seed,
                             population=population)
        sent, nbytes, new = self.broadcast(state, params, recipients, round=round, seed=seed)
        return dict.fromkeys(recipients, sent), nbytes, {}, new

    def send(
        self, state: Mapping[str, Any], params: Parameters, recipients: Sequence[str], *,
        round: int, seed: int, population: int,
    ) -> tuple[dict[str, Parameters], dict[str, int], dict[str, ModelDelta], dict[str, Any]]:
        """One round's per-client downlink: for each recipient the model it trains from
        (its ``x̂ᵢ`` after this round's message), the bytes it receives, the
        :class:`ModelDelta` its deployed task carries (only when :attr:`deployed` and the
        recipient got a message, not the whole model), and the new state.

        ``state`` is ``{}`` before the first round or ``{"models": {client: x̂ᵢ}, "synced":
        {client: round of x̂ᵢ}}``; ``seed`` is the round's (each client's message draws from
        ``derive_seed(seed, client)``).

        Raises:
            ConfigError: the references would not fit (:meth:`check_memory`).
        """
        x = params.vector.to(torch.float32)
        self.check_memory(population, x.numel())
        models: dict[str, torch.Tensor] = dict(state.get("models", {}))
        synced: dict[str, int] = dict(state.get("synced", {}))
        full = x.numel() * 4  # the whole model in float32
        sent: dict[str, Parameters] = {}
        nbytes: dict[str, int] = {}
        deltas: dict[str, ModelDelta] = {}
        for cid in recipients:
            ref = models.get(cid)
            x_hat, size = x.clone(), full
            if ref is not None:
                step, n, encoded, scale = self._message(x - ref, derive_seed(seed, cid))
                if n < full:
                    x_hat, size = (ref + step).to(torch.float32), n
                    if self.deployed:
                        deltas[cid] = ModelDelta(encoded, scale, synced[cid], model_sha256(x_hat))
            models[cid], synced[cid], nbytes[cid] = x_hat, round, size
            sent[cid] = params.replace(x_hat)
        return sent, nbytes, deltas, {"models": models, "synced": synced}

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
    if "models" in state:  # per-client references
        _check_per_client(state, size, where, round=round)
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


def _check_per_client(state: Mapping[str, Any], size: int, where: str, *, round: int) -> None:
    models, synced = state.get("models"), state.get("synced")
    if not (isinstance(models, dict) and isinstance(synced, dict) and set(models) == set(synced)
            and all(isinstance(r, int) and 0 <= r <= round for r in synced.values())):
        raise PipelineError(f"{where}: the per-client downlink state is malformed (its clients' "
                            "models and rounds do not match); restore the checkpoint")
    for cid, model in models.items():
        if (not isinstance(model, torch.Tensor) or model.dtype != torch.float32
                or model.dim() != 1 or model.numel() != size
                or not bool(torch.isfinite(model).all())):
            raise PipelineError(f"{where}: client {cid!r}'s downlink model x̂ᵢ is not a finite "
                                f"float32 vector of {size} values; the checkpoint was edited: "
                                "restore it")


_KIND = {"int8": "int", "int4": "int", "int2": "int"}


class SiteReference:
    """A deployed site's side of the per-client downlink: the model ``x̂ᵢ`` it holds, the
    round it got it in, and :meth:`resolve`, which turns a task's :class:`ModelDelta` into the
    model to train from, refusing anything its own model and the run's method do not allow.

    Args:
        method: the run's ``compression.downlink`` (a :data:`DOWNLINK_METHODS` name).
        layout: the site's own model's layout (built from the experiment, not from the server).
        bits: the run's ``compression.bits`` (QSGD's header must say it).
        chunk: the run's ``compression.chunk`` (QSGD's and int's headers must say it).
    """

    def __init__(self, method: str, layout: Layout, *, bits: int = 4, chunk: int = 512) -> None:
        self.method = method
        self.layout = layout
        self.bits, self.chunk = bits, chunk
        self.round: int | None = None
        self.vector: torch.Tensor | None = None

    def keep(self, round: int, vector: torch.Tensor) -> None:
        """Hold ``vector`` (the model received whole in ``round``) as the reference; a vector
        that is not this site's model's size is not kept (its task fails to train anyway)."""
        if vector.dim() == 1 and vector.numel() == self.layout.size:
            self.round, self.vector = round, vector.detach().to(torch.float32).clone()

    def resolve(self, round: int, delta: ModelDelta) -> Parameters:
        """The model ``delta`` rebuilds from this site's reference, which it then becomes.

        Raises:
            DownlinkMismatch: no reference, another round's, a message that does not decode
                for this model and method (sizes, indices, codes, scale), a non-finite model,
                or one whose SHA-256 is not the task's. The reference stays as it was.
        """
        if self.vector is None or self.round is None:
            raise DownlinkMismatch(
                f"{RESYNC}: this site holds no model to apply round {round}'s downlink message "
                "to (it restarted without its --state, or is new to the run); send the whole model"
            )
        if delta.reference_round != self.round:
            raise DownlinkMismatch(
                f"{RESYNC}: the message applies to the model of round {delta.reference_round}, "
                f"this site holds round {self.round}'s; send the whole model"
            )
        if delta.problem is not None:
            raise DownlinkMismatch(f"{RESYNC}: the downlink message is malformed "
                                   f"({delta.problem}); refused")
        enc = delta.encoded
        want = _KIND.get(self.method, self.method)
        if not isinstance(enc, Encoded) or enc.kind != want:
            raise DownlinkMismatch(f"{RESYNC}: a {getattr(enc, 'kind', '?')!r} message, the "
                                   f"run's downlink is {self.method!r}; refused")
        header = {"int": (int(self.method[3:]), self.chunk) if want == "int" else (),
                  "qsgd": (self.bits, self.chunk)}.get(want)
        if header is not None and enc.header != header:
            raise DownlinkMismatch(f"{RESYNC}: a {enc.kind} message of header "
                                   f"{list(enc.header)[:8]}, the run's {self.method!r} downlink "
                                   f"sends {list(header)}; refused")
        try:
            dense = decode(enc, size=self.layout.size)
        except MalformedUpdate as exc:
            raise DownlinkMismatch(f"{RESYNC}: the message does not decode for this site's "
                                   f"model ({exc}); refused") from exc
        scaled = self.method in ("qsgd", "int8", "int4", "int2")
        if scaled != (delta.scale is not None) or (
                delta.scale is not None and not math.isfinite(delta.scale)):
            raise DownlinkMismatch(f"{RESYNC}: the message's scale {delta.scale!r} does not fit "
                                   f"the run's {self.method!r} downlink; refused")
        step = dense * torch.tensor(delta.scale, dtype=torch.float32) if scaled else dense
        x_hat = (self.vector + step).to(torch.float32)
        if not bool(torch.isfinite(x_hat).all()):
            raise DownlinkMismatch(f"{RESYNC}: the rebuilt model is not finite; refused")
        if model_sha256(x_hat) != delta.sha256:
            raise DownlinkMismatch(
                f"{RESYNC}: the model rebuilt from round {self.round}'s reference does not have "
                "the SHA-256 the task names; refused"
            )
        self.round, self.vector = round, x_hat
        return Parameters(self.layout, x_hat)


def downlink_compressor(cfg: Any, *, deployed: bool = False) -> Downlink | None:
    """The :class:`Downlink` ``cfg.compression.downlink`` asks for, or ``None`` for ``"none"``.

    Raises:
        ConfigError: a method that cannot compress the downlink, an algorithm
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
    reference = getattr(c, "downlink_reference", "shared")
    if reference not in REFERENCES:
        raise ConfigError(f"compression.downlink_reference = {reference!r} is not one of "
                          f"{', '.join(REFERENCES)}")
    memory_mb = float(getattr(c, "downlink_memory_mb", 2048.0))
    if not memory_mb > 0:
        raise ConfigError(f"compression.downlink_memory_mb = {memory_mb} must be > 0")
    # a deployment always keeps one reference per site: a site cannot be sent the messages it
    # missed (the server would keep them all), and a site's model is checked by its hash
    return Downlink(method, fraction=c.fraction, bits=c.bits, chunk=c.chunk,
                    reference="per_client" if deployed else reference, memory_mb=memory_mb,
                    deployed=deployed)
