"""SecAgg+ client and server state machines exchanging frozen-dataclass messages (Bell et al. 2020).

The protocol is Bonawitz et al. 2017 ("Practical Secure Aggregation for Privacy-Preserving Machine
Learning") restricted to a sparse neighbour graph as in Bell et al. 2020 ("Secure Single-Server
Aggregation with (Poly)Logarithmic Overhead", SecAgg+): each client masks and shares its secrets
only with its ``k`` neighbours; ``k = n - 1`` is the original, complete-graph SecAgg.

The phases, each a method on :class:`SecAggClient` and one on :class:`SecAggServer` (messages
in :mod:`consortium.secagg.messages`):

1. keys:        each client publishes two X25519 public keys, ``c`` (to encrypt shares) and ``s``
                (to agree pairwise masks), and a hash commitment to its self-mask seed ``b``;
                the server fixes the neighbour graph from a public seed and sends each client
                its neighbours' keys (:class:`KeysBroadcast`).
2. shares:      each client Shamir-shares its self-mask seed ``b`` and its ``s``
                private key t-of-k among its neighbours, and encrypts each neighbour's pair of
                shares with AES-GCM; the server routes the ciphertexts (:class:`SharesForClient`).
3. masked:      each client sends ``y = x + PRG(b) + sum_v sign(u, v) PRG(s_uv) mod 2^bits`` over
                the neighbours ``v`` that survived phase 2 (:class:`MaskedInput`).
(consistency):  with authentication only, each survivor signs the survivor set the server
                states (:class:`ConsistencyRequest` -> :class:`ConsistencySignature`), and the
                server forwards each survivor its neighbours' signatures with the unmask request.
4. unmask:      each survivor reveals, per neighbour, the ``b`` share if the neighbour sent a
                masked input and the ``s`` share if it dropped after phase 2, never both
                (:class:`UnmaskResponse`); the server checks each reconstructed ``b`` against
                the hash commitment sent in phase 1 and each ``s`` against its public key
                (a neighbour may reveal a shifted share), removes the masks, returns the sum.

Without authentication the model is an honest-but-curious server. With authentication
(``identity`` and ``trust`` given to every client: :mod:`consortium.secagg.identity`) it is
Bonawitz et al.'s active adversary (their Fig. 4): every client signs its keys with its
provisioned certificate and checks its neighbours' signatures before sharing, so the server
cannot substitute keys; and every client unmasks only a survivor set that at least ``t`` of
its neighbours signed, the same one it signed itself, so the server cannot tell some
neighbours that a client survived (collecting ``b`` shares) and others that it dropped
(collecting ``s`` shares) unless enough neighbours collude; a
:class:`~consortium.secagg.floor.SecAggFloor` keeps the threshold high enough for that (and the
neighbour count and cohort) whatever the server asks.

There is no transport here: the same objects run in-process (:func:`run_secagg_round`) or behind
gRPC.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from consortium.secagg.crypto import decrypt, encrypt, generate_keypair, shared_key
from consortium.secagg.floor import SecAggFloor
from consortium.secagg.masks import add_masks, apply_mask, mask_sign, pairwise_seed
from consortium.secagg.messages import (
    SEED_COMMITMENT_BYTES,
    AdvertiseKeys,
    ConsistencyRequest,
    ConsistencySignature,
    EncryptedShares,
    KeysBroadcast,
    MaskedInput,
    SecAggAbort,
    SecAggConfig,
    SecAggRefusal,
    SecAggResult,
    SharesForClient,
    UnmaskRequest,
    UnmaskResponse,
    _length_prefixed,
    consistency_bytes,
    seed_commitment,
    signed_keys_bytes,
)
from consortium.secagg.shamir import Share, recover_checked, split_secret

if TYPE_CHECKING:
    from consortium.secagg.identity import SecAggIdentity, TrustAnchor

__all__ = [
    "SEED_COMMITMENT_BYTES",
    "AdvertiseKeys",
    "ConsistencyRequest",
    "ConsistencySignature",
    "EncryptedShares",
    "KeysBroadcast",
    "MaskedInput",
    "SecAggAbort",
    "SecAggClient",
    "SecAggConfig",
    "SecAggFloor",
    "SecAggRefusal",
    "SecAggResult",
    "SecAggServer",
    "SharesForClient",
    "UnmaskRequest",
    "UnmaskResponse",
    "graph_degree",
    "neighbour_graph",
    "run_secagg_round",
]

SEED_BYTES = 32
GRAPH_SEED_BYTES = 32
_SHARE_KEY_INFO = b"consortium/secagg/share-encryption/v1"
_SHARE_AD = b"consortium/secagg/shares/v1"
_GRAPH_LABEL = b"consortium/secagg/graph/v1"
_SHARE_BYTES = len(Share(index=1, value=0).to_bytes())
_DROP_POINTS = ("keys", "shares", "masked", "consistency")


# ---------------------------------------------------------------------------------------- graph


def neighbour_graph(
    participants: Sequence[str], *, degree: int, seed: bytes, only: str | None = None
) -> dict[str, frozenset[str]]:
    """A connected, (about) ``degree``-regular graph over ``participants`` from a public seed.

    Bell et al. 2020 use a random Harary graph: the Harary graph ``H_{k,n}`` (a circulant graph
    joining each vertex to the ``k/2`` next and ``k/2`` previous ones on a cycle, plus the opposite
    vertex when ``k`` is odd and ``n`` even) with the vertices placed on the cycle by a random
    permutation. The permutation here sorts the ids by ``SHA-256(label || seed || id)``, so anyone
    holding the seed derives the same graph. When ``k`` and ``n`` are both odd no ``k``-regular
    graph exists and each client gets ``k + 1`` neighbours; when ``k >= n - 1`` the graph is
    complete. ``only`` (a participant) returns just that client's row, which is all a client
    needs to check the server's broadcast (O(n) hashing instead of the whole graph).

    Raises:
        ValueError: duplicate participants or ``degree < 1``.
    """
    if len(set(participants)) != len(participants):
        raise ValueError("expected distinct participant ids, found duplicates")
    if degree < 1:
        raise ValueError(f"expected degree >= 1, found {degree}")
    n = len(participants)
    if degree >= n - 1:
        everyone = frozenset(participants)
        chosen = participants if only is None else [only] if only in everyone else []
        return {p: everyone - {p} for p in chosen}
    cycle = sorted(
        participants,
        key=lambda p: hashlib.sha256(_GRAPH_LABEL + bytes(seed) + p.encode()).digest(),
    )
    half = (degree + 1) // 2 if degree % 2 and n % 2 else degree // 2
    offsets = set(range(1, half + 1)) | {n - o for o in range(1, half + 1)}
    if degree % 2 and n % 2 == 0:
        offsets.add(n // 2)
    if only is not None:
        if only not in participants:
            return {}
        i = cycle.index(only)
        return {only: frozenset(cycle[(i + o) % n] for o in offsets)}
    return {p: frozenset(cycle[(i + o) % n] for o in offsets) for i, p in enumerate(cycle)}


def graph_degree(participants: int, degree: int) -> int:
    """How many neighbours each of ``participants`` clients gets from :func:`neighbour_graph`
    asked for ``degree``: ``degree + 1`` when both are odd (no odd-degree regular graph has an
    odd number of vertices), at most ``participants - 1``."""
    if degree >= participants - 1:
        return participants - 1
    return degree + 1 if degree % 2 and participants % 2 else degree


# --------------------------------------------------------------------------------------- client


@dataclass
class _ClientState:
    phase: str = "new"
    participants: tuple[str, ...] = ()
    neighbours: tuple[str, ...] = ()
    keys: Mapping[str, tuple[bytes, bytes]] = field(default_factory=dict)
    certificates: Mapping[str, bytes] = field(default_factory=dict)  # verified, per neighbour
    received: Mapping[str, bytes] = field(default_factory=dict)
    signed: tuple[str, ...] | None = None  # the survivor set this client signed
    revealed: dict[str, str] = field(default_factory=dict)  # owner -> "b" or "s"


class SecAggClient:
    """One client's side of a SecAgg+ round (Bonawitz et al. 2017, Fig. 4; Bell et al. 2020).

    Call :meth:`advertise_keys`, :meth:`share_keys`, :meth:`masked_input`, with authentication
    :meth:`sign_consistency`, and :meth:`unmask` in this order, feeding each the server's message
    from the previous phase. A client object serves exactly one round: its keys and self-mask
    seed are fresh and never reused.

    Args:
        client_id: this client's id (a site name when authenticated).
        config: the round's parameters, as the server sent them.
        identity: this client's signing identity; with ``trust``, the round is authenticated:
            this client signs its keys and its survivor set, and checks its neighbours'.
        trust: the consortium CA that vouches for the neighbours' certificates.
        floor: the least this client accepts (threshold, neighbours, cohort, signatures);
            ``None`` checks nothing beyond the config's own consistency.

    Raises:
        ValueError: an empty client id, or only one of ``identity`` and ``trust``.
        SecAggAbort: an identity for another client, or a config below ``floor``.
    """

    def __init__(
        self,
        client_id: str,
        *,
        config: SecAggConfig,
        identity: SecAggIdentity | None = None,
        trust: TrustAnchor | None = None,
        floor: SecAggFloor | None = None,
    ) -> None:
        if not isinstance(client_id, str) or not client_id:
            raise ValueError(f"expected a non-empty string client id, found {client_id!r}")
        if (identity is None) != (trust is None):
            raise ValueError(
                "expected both an identity and a trust anchor (authenticated) or neither, found "
                f"identity={identity is not None}, trust={trust is not None}"
            )
        self.client_id = client_id
        self.config = config
        self.floor = floor
        self._identity = identity
        self._trust = trust
        if identity is not None and identity.client_id != client_id:
            raise SecAggAbort(
                f"client {client_id!r}: its certificate names site {identity.client_id!r}; a "
                "site signs only as itself"
            )
        if floor is not None:
            self._check_floor()
        self._c = generate_keypair()
        self._s = generate_keypair()
        self._b = secrets.token_bytes(SEED_BYTES)
        self._state = _ClientState()

    @property
    def authenticated(self) -> bool:
        """Whether this client signs its messages and checks its neighbours' signatures."""
        return self._trust is not None

    @property
    def revealed(self) -> Mapping[str, str]:
        """Which secret (``"b"`` or ``"s"``) this client has revealed a share of, per owner."""
        return dict(self._state.revealed)

    def advertise_keys(self) -> AdvertiseKeys:
        """Phase 1: the public halves of the ``c`` (encryption) and ``s`` (mask) key pairs,
        signed with this client's identity when authenticated, and the hash commitment to the
        self-mask seed ``b`` the server checks its reconstruction against."""
        self._advance("new", "keys")
        commitment = seed_commitment(self.config, self.client_id, self._b)
        if self._identity is None:
            return AdvertiseKeys(
                self.client_id, self._c.public, self._s.public, seed_commitment=commitment
            )
        signed = signed_keys_bytes(self.config, self.client_id, self._c.public, self._s.public)
        return AdvertiseKeys(
            self.client_id, self._c.public, self._s.public,
            certificate=self._identity.certificate_der, signature=self._identity.sign(signed),
            seed_commitment=commitment,
        )

    def share_keys(self, broadcast: KeysBroadcast) -> EncryptedShares:
        """Phase 2: Shamir-share ``b`` and the ``s`` private key t-of-k among the neighbours.

        Each neighbour's pair of shares is encrypted with AES-GCM under a key derived from the
        ``c`` keys, with associated data binding sender, recipient, round and context. When
        authenticated, every neighbour's certificate and signature over its keys are checked
        first.

        Raises:
            SecAggAbort: a broadcast for another round, neighbour keys that do not match the graph
                derived from the broadcast seed, fewer than ``threshold`` neighbours, a graph
                below the floor, or (authenticated) a neighbour whose certificate or signature
                does not verify, named in the message.
        """
        self._advance("keys", "shares")
        cfg = self.config
        if broadcast.round != cfg.round:
            raise SecAggAbort(
                f"client {self.client_id!r}: expected keys for round {cfg.round}, found round "
                f"{broadcast.round}; the server mixed up rounds"
            )
        graph = neighbour_graph(
            broadcast.participants, degree=cfg.neighbours, seed=broadcast.graph_seed,
            only=self.client_id,
        )
        mine = graph.get(self.client_id)
        if mine is None or set(broadcast.neighbour_keys) != mine:
            raise SecAggAbort(
                f"client {self.client_id!r}: the neighbour keys from the server do not match the "
                "graph derived from its seed and participant list; refusing to share"
            )
        if len(mine) < cfg.threshold:
            raise SecAggAbort(
                f"client {self.client_id!r} has {len(mine)} neighbours, fewer than the threshold "
                f"{cfg.threshold}; the round cannot tolerate this"
            )
        if self.floor is not None:
            reason = self.floor.refusal(
                threshold=cfg.threshold, neighbours=len(mine),
                participants=len(broadcast.participants),
            )
            if reason is not None:
                raise SecAggAbort(f"client {self.client_id!r} refuses to share: {reason}")
        neighbours = tuple(sorted(mine))
        if self._trust is not None:
            self._state.certificates = self._verify_neighbours(broadcast, neighbours)
        self._state.participants = tuple(broadcast.participants)
        self._state.neighbours = neighbours
        self._state.keys = dict(broadcast.neighbour_keys)
        n = len(neighbours)
        b_shares = split_secret(self._b, threshold=cfg.threshold, num_shares=n)
        s_shares = split_secret(
            _private_bytes(self._s.private), threshold=cfg.threshold, num_shares=n
        )
        ciphertexts = {}
        for v, b_share, s_share in zip(neighbours, b_shares, s_shares):
            key = shared_key(self._c.private, self._state.keys[v][0], info=self._share_info())
            ciphertexts[v] = encrypt(
                key,
                b_share.to_bytes() + s_share.to_bytes(),
                associated_data=self._share_ad(self.client_id, v),
            )
        return EncryptedShares(self.client_id, ciphertexts)

    def masked_input(self, shares: SharesForClient, vector: torch.Tensor) -> MaskedInput:
        """Phase 3: ``y = x + PRG(b) + sum_v sign(u, v) PRG(s_uv)  mod 2**modulus_bits``.

        The sum runs over the neighbours whose ciphertexts reached this client, i.e. those that
        survived phase 2. The ciphertexts are stored, not decrypted, until :meth:`unmask`.

        Raises:
            ValueError: ``vector`` is not int64 or has values outside ``[0, 2**modulus_bits)``.
            SecAggAbort: ciphertexts for another client or from non-neighbours, fewer than
                ``threshold`` of them, or (with the floor's ``min_cohort``) fewer than
                ``min_cohort - 1`` neighbours that proved themselves with signed keys and sent
                shares: the masked input is not sent then.
        """
        self._advance("shares", "masked")
        cfg = self.config
        if vector.dtype != torch.int64:
            raise ValueError(
                f"expected an int64 (quantised) vector, found {vector.dtype}; quantize() it"
            )
        modulus = 1 << cfg.modulus_bits
        if vector.numel() and (int(vector.min()) < 0 or int(vector.max()) >= modulus):
            raise ValueError(
                f"expected values in [0, 2**{cfg.modulus_bits}), found "
                f"[{int(vector.min())}, {int(vector.max())}]; quantise with fewer bits"
            )
        senders = set(shares.ciphertexts)
        if shares.recipient != self.client_id or not senders <= set(self._state.neighbours):
            raise SecAggAbort(
                f"client {self.client_id!r}: received ciphertexts addressed to "
                f"{shares.recipient!r} or from non-neighbours; refusing to continue"
            )
        if len(senders) < cfg.threshold:
            raise SecAggAbort(
                f"client {self.client_id!r}: only {len(senders)} of its "
                f"{len(self._state.neighbours)} neighbours sent shares, fewer than the threshold "
                f"{cfg.threshold}"
            )
        if self.floor is not None and self.floor.min_cohort:
            # Every sender is a neighbour whose signed keys verified in share_keys; the
            # server's participant list counts for nothing here.
            if len(senders) < self.floor.min_cohort - 1:
                raise SecAggAbort(
                    f"client {self.client_id!r} refuses to send its masked input: only "
                    f"{len(senders)} other participants proved themselves with signed keys and "
                    f"sent shares, its floor requires {self.floor.min_cohort - 1} "
                    f"(min_cohort {self.floor.min_cohort})"
                )
        self._state.received = dict(shares.ciphertexts)
        flat = vector.reshape(-1)
        bits = cfg.modulus_bits
        me = self._index(self.client_id)
        masks = [(self._b, 1)] + [
            (
                pairwise_seed(
                    self._s.private, self._state.keys[v][1], round=cfg.round,
                    context=bytes(cfg.context),
                ),
                mask_sign(me, self._index(v)),
            )
            for v in sorted(senders)
        ]
        y = add_masks(flat, masks, modulus_bits=bits)
        return MaskedInput(self.client_id, y.reshape(vector.shape))

    def sign_consistency(self, request: ConsistencyRequest) -> ConsistencySignature:
        """Consistency round (authenticated only): sign the survivor set ``U3`` the server states.

        The client signs one set per round and will later unmask only for exactly that set,
        proved by at least ``threshold`` of its neighbours' signatures (Bonawitz et al. 2017,
        Fig. 4, ConsistencyCheck).

        Raises:
            SecAggAbort: the client has no identity to sign with.
            SecAggRefusal: a set with duplicates, non-participants, or without this client; a
                surviving neighbour whose shares never reached this client; fewer than
                ``threshold`` surviving neighbours; or fewer survivors than the floor's
                ``min_cohort``.
        """
        self._advance("masked", "consistency")
        if self._identity is None:
            raise SecAggAbort(
                f"client {self.client_id!r} has no identity to sign the survivor set with; the "
                "consistency round runs only in authenticated rounds"
            )
        survivors = tuple(request.survivors)
        members = set(survivors)
        neighbours = set(self._state.neighbours)
        problem = None
        if len(members) != len(survivors):
            problem = "the survivor set lists a client twice"
        elif self.client_id not in members:
            problem = "it is not in the survivor set"
        elif not members <= set(self._state.participants):
            problem = (
                f"{sorted(members - set(self._state.participants))[:5]} are survivors but were "
                "never participants"
            )
        elif not members & neighbours <= set(self._state.received):
            problem = (
                f"neighbours {sorted((members & neighbours) - set(self._state.received))[:5]} "
                "are listed as survivors but sent it no shares"
            )
        elif len(members & neighbours) < self.config.threshold:
            problem = (
                f"only {len(members & neighbours)} of its neighbours survive, fewer than the "
                f"threshold {self.config.threshold}"
            )
        elif self.floor is not None and len(members) < self.floor.min_cohort:
            problem = (
                f"the sum would hold {len(members)} inputs, fewer than its floor's min_cohort "
                f"{self.floor.min_cohort}"
            )
        if problem is not None:
            raise SecAggRefusal(
                f"client {self.client_id!r} refuses to sign the survivor set: {problem}"
            )
        self._state.signed = tuple(sorted(members))
        data = consistency_bytes(self.config, self._state.signed)
        return ConsistencySignature(self.client_id, self._identity.sign(data))

    def unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        """Phase 4: reveal ``b`` shares of surviving and ``s`` shares of dropped neighbours.

        Every needed ciphertext is decrypted before anything is revealed, so a tampered one
        reveals nothing. When authenticated, the request must carry the survivor set this client
        signed, with at least ``threshold`` valid signatures of its neighbours over that set.

        Raises:
            SecAggRefusal: a client listed as both survivor and dropped, or asked for the other
                secret of a client whose share was revealed before (revealing both would unmask
                its input, Bonawitz et al. 2017, section 4); this client not among the survivors;
                fewer than ``threshold`` survivors; a "dropped" client that had not sent shares;
                or, authenticated, survivors other than those it signed, a dropped list that
                does not follow from them, or a consistency proof with fewer than ``threshold``
                valid neighbour signatures or any invalid one (the signer is named).
            DecryptionError: a ciphertext failed authentication (altered in transit).
        """
        if self._trust is not None:
            self._advance("consistency", "unmasked", allow_repeat=True)
            self._check_proof(request)
        else:
            self._advance("masked", "unmasked", allow_repeat=True)
        cfg = self.config
        survivors, dropped = set(request.survivors), set(request.dropped)
        both = survivors & dropped
        if both:
            raise SecAggRefusal(
                f"client {self.client_id!r} refuses to unmask: {sorted(both)} listed both as "
                "survivors and dropped; revealing both shares would expose their inputs"
            )
        if self.client_id not in survivors:
            raise SecAggRefusal(
                f"client {self.client_id!r} refuses to unmask: it is not in the survivor list"
            )
        if len(survivors) < cfg.threshold:
            raise SecAggRefusal(
                f"client {self.client_id!r} refuses to unmask: {len(survivors)} survivors, fewer "
                f"than the threshold {cfg.threshold}"
            )
        wanted = {
            v: ("b" if v in survivors else "s")
            for v in self._state.received
            if v in survivors | dropped
        }
        unknown = dropped & (set(self._state.neighbours) - set(self._state.received))
        if unknown:
            raise SecAggRefusal(
                f"client {self.client_id!r} refuses to unmask: {sorted(unknown)} listed as "
                "dropped after sending shares, but no shares from them arrived here"
            )
        for v, kind in wanted.items():
            before = self._state.revealed.get(v)
            assert before is None or before in ("b", "s")
            if before is not None and before != kind:
                raise SecAggRefusal(
                    f"client {self.client_id!r} refuses to unmask: it already revealed the "
                    f"{before!r} share of {v!r} and will not reveal its {kind!r} share as well"
                )
        plain = {v: self._decrypt(v) for v in wanted}  # all or nothing
        b_shares, s_shares = {}, {}
        for v, kind in wanted.items():
            b_share, s_share = plain[v]
            if kind == "b":
                b_shares[v] = b_share
            else:
                s_shares[v] = s_share
            self._state.revealed[v] = kind
        assert not set(b_shares) & set(s_shares)
        return UnmaskResponse(self.client_id, b_shares, s_shares)

    # -- helpers

    def _check_floor(self) -> None:
        floor, cfg = self.floor, self.config
        assert floor is not None
        problem = None
        if floor.require_signatures and self._trust is None:
            problem = "its floor requires signed keys, and it has no identity and trust anchor"
        elif floor.min_cohort and self._trust is None:
            problem = (
                f"its floor's min_cohort {floor.min_cohort} counts the peers from their signed "
                "keys, and it has no trust anchor to check them"
            )
        elif cfg.num_clients_expected < floor.min_cohort:
            problem = (
                f"the server expects {cfg.num_clients_expected} clients, fewer than its floor's "
                f"min_cohort {floor.min_cohort}"
            )
        else:
            problem = floor.refusal(
                threshold=cfg.threshold,
                neighbours=min(cfg.neighbours, cfg.num_clients_expected - 1),
                participants=cfg.num_clients_expected,
            )
        if problem is not None:
            raise SecAggAbort(
                f"client {self.client_id!r} refuses the secure-aggregation config: {problem}"
            )

    def _verify_neighbours(
        self, broadcast: KeysBroadcast, neighbours: Sequence[str]
    ) -> dict[str, bytes]:
        from consortium.secagg.identity import UntrustedPeer

        assert self._trust is not None
        certificates = {}
        for v in neighbours:
            entry = broadcast.signatures.get(v)
            if entry is None:
                raise SecAggAbort(
                    f"client {self.client_id!r}: the keys of neighbour {v!r} came without a "
                    "certificate and signature; refusing to share"
                )
            certificate, signature = entry
            c_public, s_public = broadcast.neighbour_keys[v]
            data = signed_keys_bytes(self.config, v, c_public, s_public)
            try:
                self._trust.verify(v, certificate, data, signature)
            except UntrustedPeer as exc:
                raise SecAggAbort(
                    f"client {self.client_id!r}: the keys of neighbour {v!r} are not authentic "
                    f"({exc}); refusing to share"
                ) from exc
            certificates[v] = bytes(certificate)
        return certificates

    def _check_proof(self, request: UnmaskRequest) -> None:
        from consortium.secagg.identity import UntrustedPeer

        assert self._trust is not None
        me, signed = self.client_id, self._state.signed
        if signed is None:  # it refused to sign (or was never asked): nothing to prove
            raise SecAggRefusal(
                f"client {me!r} refuses to unmask: it signed no survivor set in this round's "
                "consistency round"
            )
        if len(set(request.survivors)) != len(request.survivors) or tuple(
            sorted(request.survivors)
        ) != signed:
            raise SecAggRefusal(
                f"client {me!r} refuses to unmask: the survivors in the request are not the "
                f"{len(signed)} it signed in the consistency round"
            )
        neighbours = set(self._state.neighbours)
        expected = set(self._state.received) - set(signed)
        if set(request.dropped) & neighbours != expected:
            raise SecAggRefusal(
                f"client {me!r} refuses to unmask: the dropped neighbours "
                f"{sorted(set(request.dropped) & neighbours)[:5]} do not follow from the signed "
                f"survivors (expected {sorted(expected)[:5]})"
            )
        data = consistency_bytes(self.config, signed)
        for signer, signature in sorted(request.signatures.items()):
            if signer not in neighbours or signer not in signed:
                raise SecAggRefusal(
                    f"client {me!r} refuses to unmask: a consistency signature from {signer!r}, "
                    "which is not a surviving neighbour"
                )
            try:
                self._trust.verify(signer, self._state.certificates[signer], data, signature)
            except UntrustedPeer as exc:
                raise SecAggRefusal(
                    f"client {me!r} refuses to unmask: neighbour {signer!r} did not sign this "
                    f"survivor set ({exc}); the server may be telling clients different stories"
                ) from exc
        if len(request.signatures) < self.config.threshold:
            raise SecAggRefusal(
                f"client {me!r} refuses to unmask: only {len(request.signatures)} of its "
                f"neighbours signed the survivor set, fewer than the threshold "
                f"{self.config.threshold}"
            )

    def _advance(self, expected: str, to: str, *, allow_repeat: bool = False) -> None:
        phase = self._state.phase
        if phase != expected and not (allow_repeat and phase == to):
            raise SecAggAbort(
                f"client {self.client_id!r}: expected phase {expected!r} before {to!r}, but the "
                f"client is in phase {phase!r}; phases run keys, shares, masked, (consistency,) "
                "unmask"
            )
        self._state.phase = to

    def _index(self, client_id: str) -> int:
        return self._state.participants.index(client_id)

    def _share_info(self) -> bytes:
        return _SHARE_KEY_INFO + _bind(self.config)

    def _share_ad(self, sender: str, recipient: str) -> bytes:
        return (
            _SHARE_AD + _length_prefixed(sender.encode(), recipient.encode()) + _bind(self.config)
        )

    def _decrypt(self, sender: str) -> tuple[Share, Share]:
        key = shared_key(self._c.private, self._state.keys[sender][0], info=self._share_info())
        plain = decrypt(
            key,
            self._state.received[sender],
            associated_data=self._share_ad(sender, self.client_id),
        )
        if len(plain) != 2 * _SHARE_BYTES:
            raise SecAggAbort(
                f"client {self.client_id!r}: decrypted shares from {sender!r} have "
                f"{len(plain)} bytes, expected {2 * _SHARE_BYTES}"
            )
        return Share.from_bytes(plain[:_SHARE_BYTES]), Share.from_bytes(plain[_SHARE_BYTES:])


# --------------------------------------------------------------------------------------- server


class SecAggServer:
    """The server's side of a SecAgg+ round: routes messages, checks thresholds, unmasks the sum.

    Call :meth:`collect_keys`, :meth:`route_shares`, :meth:`collect_masked`, when
    :attr:`authenticated` :meth:`collect_consistency`, and :meth:`finish` in this order with the
    messages of the clients still present. Every step raises :class:`SecAggAbort` when some
    client that must be recovered has fewer than ``threshold`` neighbours left, before asking
    anyone for shares (Bonawitz et al. 2017, Fig. 4). The server verifies no signature (its
    clients do); it only routes certificates and signatures, and keeps one running sum.

    Args:
        config: the round's parameters, shared with the clients.
        graph_seed: public randomness for the neighbour graph; 32 fresh random bytes if omitted.
    """

    def __init__(self, *, config: SecAggConfig, graph_seed: bytes | None = None) -> None:
        self.config = config
        self.graph_seed = (
            secrets.token_bytes(GRAPH_SEED_BYTES) if graph_seed is None else graph_seed
        )
        self.phase = "new"
        self.authenticated = False
        """Whether the clients signed their keys (then the consistency round runs)."""
        self.reconstructed: list[tuple[str, str]] = []  # (client, "b" or "s"), for auditing
        self.corrupted: list[tuple[str, str, str]] = []
        """(holder, owner, "b" or "s") of each revealed share found corrupted and left out."""
        self._keys: dict[str, AdvertiseKeys] = {}
        self._participants: tuple[str, ...] = ()
        self._graph: dict[str, frozenset[str]] = {}
        self._sent_shares: set[str] = set()
        self._masked_ids: set[str] = set()
        self._total: torch.Tensor | None = None  # running sum of the masked inputs
        self._shape: tuple[int, ...] = ()
        self._request: UnmaskRequest | None = None
        self._signers: set[str] = set()

    def collect_keys(self, adverts: Sequence[AdvertiseKeys]) -> dict[str, KeysBroadcast]:
        """Phase 1: fix the participants and graph; each client's broadcast of neighbour keys.

        If any client signed its keys the round is :attr:`authenticated`: the clients without a
        certificate and signature are left out (their neighbours would refuse them), and each
        broadcast carries the neighbours' certificates and signatures. A client without a
        32-byte seed commitment is left out too: its self-mask seed could not be checked.

        Raises:
            SecAggAbort: duplicate senders, or a client with fewer than ``threshold`` neighbours.
        """
        self._advance("new", "keys")
        ids = [a.client_id for a in adverts]
        if len(set(ids)) != len(ids):
            raise SecAggAbort("two key advertisements came from the same client id")
        self.authenticated = any(a.certificate or a.signature for a in adverts)
        if self.authenticated:
            adverts = [a for a in adverts if a.certificate and a.signature]
        adverts = [a for a in adverts if len(a.seed_commitment) == SEED_COMMITMENT_BYTES]
        self._keys = {a.client_id: a for a in adverts}
        self._participants = tuple(sorted(self._keys))
        self._graph = neighbour_graph(
            self._participants, degree=self.config.neighbours, seed=self.graph_seed
        )
        self._require({u: self._graph[u] for u in self._participants}, "advertised keys")
        keys = self._keys
        return {
            u: KeysBroadcast(
                round=self.config.round,
                graph_seed=self.graph_seed,
                participants=self._participants,
                neighbour_keys={v: (keys[v].c_public, keys[v].s_public) for v in self._graph[u]},
                signatures=(
                    {v: (keys[v].certificate, keys[v].signature) for v in self._graph[u]}
                    if self.authenticated else {}
                ),
            )
            for u in self._participants
        }

    def route_shares(self, messages: Sequence[EncryptedShares]) -> dict[str, SharesForClient]:
        """Phase 2: forward each ciphertext to its recipient, if the recipient also sent shares.

        Raises:
            SecAggAbort: a sender that did not advertise keys, ciphertexts not addressed to exactly
                the sender's neighbours, or a sender whose shares reach fewer than ``threshold``
                neighbours that are still present.
        """
        self._advance("keys", "shares")
        by_sender = {m.sender: m for m in messages}
        for m in messages:
            if m.sender not in self._graph or set(m.ciphertexts) != self._graph[m.sender]:
                raise SecAggAbort(
                    f"client {m.sender!r} sent shares for {sorted(m.ciphertexts)}, expected its "
                    "neighbours from phase 1"
                )
        self._sent_shares = set(by_sender)
        self._require(
            {u: self._graph[u] & self._sent_shares for u in self._sent_shares}, "sent shares"
        )
        return {
            u: SharesForClient(
                recipient=u,
                ciphertexts={
                    v: by_sender[v].ciphertexts[u] for v in self._graph[u] & self._sent_shares
                },
            )
            for u in sorted(self._sent_shares)
        }

    def collect_masked(self, messages: Iterable[MaskedInput]) -> UnmaskRequest:
        """Phase 3: add up the masked inputs as they arrive; the unmask request for every survivor.

        ``messages`` may be any iterable (a generator streaming from the clients): the server
        keeps only the running sum modulo ``2**modulus_bits``, so its memory is one vector
        whatever the number of clients. When :attr:`authenticated`, the request's survivors go
        to the consistency round first (:class:`ConsistencyRequest`).

        Raises:
            SecAggAbort: a sender that did not send shares or sent twice, vectors of different
                shapes, or a client whose secret must be recovered with fewer than ``threshold``
                surviving neighbours (checked before anyone is asked for shares).
        """
        self._advance("shares", "masked")
        bits = self.config.modulus_bits
        for m in messages:
            if m.client_id not in self._sent_shares:
                raise SecAggAbort(
                    f"client {m.client_id!r} sent a masked input without having sent shares"
                )
            if m.client_id in self._masked_ids:
                raise SecAggAbort(f"client {m.client_id!r} sent two masked inputs")
            if self._total is None:
                self._shape = tuple(m.vector.shape)
                self._total = torch.zeros(m.vector.numel(), dtype=torch.int64)
            elif tuple(m.vector.shape) != self._shape:
                raise SecAggAbort(
                    f"expected masked vectors of one shape, found {self._shape} and "
                    f"{tuple(m.vector.shape)} (client {m.client_id!r})"
                )
            vector = m.vector.reshape(-1)
            if vector.dtype != torch.int64 or bool(((vector < 0) | (vector >> bits != 0)).any()):
                raise SecAggAbort(
                    f"client {m.client_id!r} sent a masked input outside [0, 2**{bits}) as int64"
                )
            self._total = apply_mask(self._total, vector, sign=1, modulus_bits=bits)
            self._masked_ids.add(m.client_id)
        survivors = set(self._masked_ids)
        dropped = self._sent_shares - survivors
        self._require(self._needed(survivors, dropped, survivors), "sent masked inputs")
        self._request = UnmaskRequest(tuple(sorted(survivors)), tuple(sorted(dropped)))
        return self._request

    def collect_consistency(
        self, signatures: Iterable[ConsistencySignature]
    ) -> dict[str, UnmaskRequest]:
        """Consistency round: each signer's unmask request with its neighbours' signatures.

        Only survivors that signed are asked to unmask (Bonawitz et al. 2017, Fig. 4: the users
        of ``U4``); each gets the signatures of its neighbours among them, its proof that they
        were told the same survivor set. The server does not check the signatures; the clients
        do, and refuse to unmask without ``threshold`` valid ones.

        Raises:
            SecAggAbort: an unauthenticated round, a signature from a non-survivor or twice from
                one client, or a client whose secret must be recovered with fewer than
                ``threshold`` neighbours that signed.
        """
        self._advance("masked", "consistency")
        if not self.authenticated:
            raise SecAggAbort("the consistency round runs only when the clients signed their keys")
        assert self._request is not None
        survivors, dropped = set(self._request.survivors), set(self._request.dropped)
        signed: dict[str, bytes] = {}
        for m in signatures:
            if m.client_id not in survivors:
                raise SecAggAbort(f"a consistency signature from {m.client_id!r}, not a survivor")
            if m.client_id in signed:
                raise SecAggAbort(f"client {m.client_id!r} signed the survivor set twice")
            signed[m.client_id] = m.signature
        self._signers = set(signed)
        self._require(self._needed(survivors, dropped, self._signers), "signed the survivor set")
        request = self._request
        return {
            u: UnmaskRequest(
                request.survivors, request.dropped,
                signatures={v: signed[v] for v in sorted(self._graph[u] & self._signers)},
            )
            for u in sorted(self._signers)
        }

    def finish(self, responses: Sequence[UnmaskResponse]) -> SecAggResult:
        """Phase 4: reconstruct ``b`` of survivors and ``s`` of dropped clients, unmask the sum.

        Every reconstructed secret is verified before any mask is removed: ``b`` against the
        owner's seed commitment from phase 1, the ``s`` private key against the public key the
        owner advertised (signed, when authenticated). Shamir's interpolation alone would turn a
        neighbour's shifted share into a shifted secret and a silently corrupted sum. A share
        at another neighbour's point or off the polynomial of the verified secret is corrected
        (left out; with more than ``threshold`` shares one corrupted share per secret can be)
        and its holder recorded in :attr:`corrupted`.

        Raises:
            SecAggAbort: fewer than ``threshold`` shares for some client (nothing is reconstructed
                then), shares from which no secret passes its check (the owner is named), or a
                response from a client that was not asked (not a survivor; authenticated: did
                not sign the survivor set).
        """
        self._advance("consistency" if self.authenticated else "masked", "done")
        assert self._request is not None
        cfg = self.config
        survivors, dropped = set(self._request.survivors), set(self._request.dropped)
        b_shares, s_shares = self._gather(responses, survivors, dropped)
        # Check every count before combining anything, so an abort reconstructs nothing.
        for kind, table in (("b", b_shares), ("s", s_shares)):
            for owner, got in sorted(table.items()):
                if len(got) < cfg.threshold:
                    raise SecAggAbort(
                        f"client {owner!r}: only {len(got)} of its neighbours returned its "
                        f"{kind!r} share, fewer than the threshold {cfg.threshold}; aborting"
                    )
        seeds = {u: self._recover(u, "b", b_shares[u]) for u in sorted(survivors)}
        keys = {
            v: X25519PrivateKey.from_private_bytes(self._recover(v, "s", s_shares[v]))
            for v in sorted(s_shares)
        }
        bits = cfg.modulus_bits
        assert self._total is not None  # _require refused an empty set of survivors
        total = self._total
        position = {c: i for i, c in enumerate(self._participants)}

        def masks_to_remove() -> Iterator[tuple[bytes, int]]:
            for u in sorted(survivors):
                yield seeds[u], -1
            for v in sorted(keys):
                for u in sorted(self._graph[v] & survivors):
                    seed = pairwise_seed(
                        keys[v], self._keys[u].s_public, round=cfg.round,
                        context=bytes(cfg.context),
                    )
                    # Survivor u added sign(u, v) * m_uv; take it away.
                    yield seed, -mask_sign(position[u], position[v])

        total = add_masks(total, masks_to_remove(), modulus_bits=bits)
        self._total = None
        return SecAggResult(sum=total.reshape(self._shape), contributors=tuple(sorted(survivors)))

    def _gather(
        self, responses: Sequence[UnmaskResponse], survivors: set[str], dropped: set[str]
    ) -> tuple[dict[str, list[tuple[str, Share]]], dict[str, list[tuple[str, Share]]]]:
        """The revealed shares per owner, each with its holder: ``b`` of survivors, ``s`` of
        dropped clients with surviving neighbours. A share that claims another holder's point
        (its index is not the holder's place among the owner's sorted neighbours, where the
        owner put it) is left out and its holder recorded in :attr:`corrupted`."""
        asked = self._signers if self.authenticated else survivors
        points: dict[str, dict[str, int]] = {}  # owner -> holder -> the index it was given
        b_shares: dict[str, list[tuple[str, Share]]] = {u: [] for u in survivors}
        s_shares: dict[str, list[tuple[str, Share]]] = {v: [] for v in dropped}
        for r in responses:
            if r.client_id not in asked:
                raise SecAggAbort(
                    f"unmask response from {r.client_id!r}, which was not asked to unmask"
                )
            if set(r.b_shares) & set(r.s_shares):  # never both secrets of one client
                raise SecAggAbort(
                    f"client {r.client_id!r} revealed both shares of "
                    f"{sorted(set(r.b_shares) & set(r.s_shares))}; refusing to unmask"
                )
            for kind, revealed, table, owners in (
                ("b", r.b_shares, b_shares, survivors), ("s", r.s_shares, s_shares, dropped),
            ):
                for owner, share in revealed.items():
                    if owner not in owners or r.client_id not in self._graph[owner]:
                        continue
                    if owner not in points:
                        points[owner] = {v: i + 1 for i, v in enumerate(sorted(self._graph[owner]))}
                    if share.index != points[owner][r.client_id]:
                        self.corrupted.append((r.client_id, owner, kind))
                        continue
                    table[owner].append((r.client_id, share))
        s_shares = {v: s for v, s in s_shares.items() if self._graph[v] & survivors}
        return b_shares, s_shares

    def _recover(self, owner: str, kind: str, held: list[tuple[str, Share]]) -> bytes:
        """``owner``'s secret ``kind`` from its neighbours' shares, verified against what the
        owner published in phase 1 (see :meth:`finish`).

        Raises:
            SecAggAbort: no secret passing the check can be recovered.
        """
        check = self._seed_check(owner) if kind == "b" else self._key_check(owner)
        try:
            secret, off = recover_checked(
                [share for _, share in held], threshold=self.config.threshold, check=check
            )
        except ValueError as exc:
            raise SecAggAbort(
                f"the {kind!r} shares of the secret of client {owner!r}, revealed by "
                f"{sorted(holder for holder, _ in held)}, do not reconstruct what {owner!r} "
                f"committed to in phase 1 ({exc}): one of these holders revealed a corrupted "
                "share (with no spare share it cannot be named), so the round is aborted "
                "rather than a corrupted sum returned"
            ) from exc
        holder_of = {share.index: holder for holder, share in held}
        self.corrupted += [(holder_of[i], owner, kind) for i in off]
        self.reconstructed.append((owner, kind))
        return secret

    def _seed_check(self, owner: str) -> Callable[[bytes], bool]:
        expected = bytes(self._keys[owner].seed_commitment)
        return lambda seed: hmac.compare_digest(
            seed_commitment(self.config, owner, seed), expected
        )

    def _key_check(self, owner: str) -> Callable[[bytes], bool]:
        # A secret that differs only in bits X25519 clamps away passes, and is harmless: it is
        # the same scalar, so it derives the same pairwise masks as the advertised key.
        expected = bytes(self._keys[owner].s_public)

        def derives_public(private: bytes) -> bool:
            public = X25519PrivateKey.from_private_bytes(private).public_key()
            raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            return hmac.compare_digest(raw, expected)

        return derives_public

    # -- helpers

    def _advance(self, expected: str, to: str) -> None:
        if self.phase != expected:
            raise SecAggAbort(
                f"server: expected phase {expected!r} before {to!r}, found {self.phase!r}; "
                "phases run keys, shares, masked, (consistency,) unmask"
            )
        self.phase = to

    def _needed(
        self, survivors: set[str], dropped: set[str], holders: set[str]
    ) -> dict[str, frozenset[str]]:
        """The secrets to recover (``b`` of survivors, ``s`` of dropped clients with surviving
        neighbours) and, per owner, its neighbours among ``holders``."""
        needed = {u: self._graph[u] & holders for u in survivors}
        needed |= {v: self._graph[v] & holders for v in dropped if self._graph[v] & survivors}
        return needed

    def _require(self, holders: Mapping[str, frozenset[str] | set[str]], step: str) -> None:
        if not holders:
            raise SecAggAbort(f"no client {step}; the round cannot continue")
        for owner, present in sorted(holders.items()):
            if len(present) < self.config.threshold:
                raise SecAggAbort(
                    f"client {owner!r}: only {len(present)} of its {len(self._graph[owner])} "
                    f"neighbours {step}, fewer than the threshold {self.config.threshold}; "
                    "aborting before any share is revealed"
                )



# ----------------------------------------------------------------------------------- in-process


def run_secagg_round(
    inputs: Mapping[str, torch.Tensor],
    *,
    config: SecAggConfig,
    drop_after: Mapping[str, str] | None = None,
    graph_seed: bytes | None = None,
    identities: Mapping[str, SecAggIdentity] | None = None,
    trust: TrustAnchor | None = None,
    floor: SecAggFloor | None = None,
) -> SecAggResult:
    """Play one SecAgg+ round in-process and return the server's unmasked sum.

    Args:
        inputs: client id -> quantised int64 vector in ``[0, 2**config.modulus_bits)``.
        config: the round's parameters.
        drop_after: client id -> ``"keys"``, ``"shares"``, ``"masked"`` or ``"consistency"``:
            the last phase whose message the client sends before it drops out. A client dropping
            after ``"masked"`` still counts in the sum but answers no later request.
        graph_seed: public randomness for the neighbour graph (random if omitted).
        identities: client id -> its signing identity; with ``trust``, the authenticated round
            (signed keys and the consistency round) is played.
        trust: the trust anchor every client checks its neighbours with.
        floor: every client's floor (see :class:`~consortium.secagg.floor.SecAggFloor`).

    Returns:
        The sum over ``result.contributors`` (the clients that sent masked inputs) modulo
        ``2**config.modulus_bits``.

    Raises:
        SecAggAbort: too many clients dropped for the threshold, or a client refused.
        DecryptionError: a client could not authenticate a ciphertext.
        ValueError: an unknown drop point or client, or identities without trust.
    """
    drop_after = dict(drop_after or {})
    for cid, point in drop_after.items():
        if cid not in inputs or point not in _DROP_POINTS:
            raise ValueError(
                f"expected drop_after to map input clients to one of {_DROP_POINTS}, found "
                f"{cid!r}: {point!r}"
            )
    if (identities is None) != (trust is None):
        raise ValueError("expected identities and trust together (authenticated) or neither")
    server = SecAggServer(config=config, graph_seed=graph_seed)
    clients = {
        cid: SecAggClient(
            cid, config=config, identity=identities[cid] if identities else None, trust=trust,
            floor=floor,
        )
        for cid in inputs
    }

    def alive(after: str) -> list[str]:
        stop = _DROP_POINTS.index(after)
        return [
            c
            for c in sorted(clients)
            if c not in drop_after or _DROP_POINTS.index(drop_after[c]) > stop
        ]

    broadcasts = server.collect_keys([clients[c].advertise_keys() for c in sorted(clients)])
    routed = server.route_shares(
        [clients[c].share_keys(broadcasts[c]) for c in alive("keys") if c in broadcasts]
    )
    request = server.collect_masked(
        [clients[c].masked_input(routed[c], inputs[c]) for c in alive("shares") if c in routed]
    )
    requests: Mapping[str, UnmaskRequest] = dict.fromkeys(request.survivors, request)
    if server.authenticated:
        check = ConsistencyRequest(request.survivors)
        requests = server.collect_consistency(
            [clients[c].sign_consistency(check) for c in alive("masked") if c in requests]
        )
    responses = [clients[c].unmask(requests[c]) for c in alive("consistency") if c in requests]
    return server.finish(responses)


def _private_bytes(private: X25519PrivateKey) -> bytes:
    return private.private_bytes(
        encoding=serialization.Encoding.Raw,
        format=serialization.PrivateFormat.Raw,
        encryption_algorithm=serialization.NoEncryption(),
    )


def _bind(config: SecAggConfig) -> bytes:
    return _length_prefixed(bytes(config.context)) + config.round.to_bytes(8, "big")
