"""One secure total over the deployment's ``Exchange`` messages, outside any training round:
the site's SecAgg+ half (:class:`SecureTotalSite`) and the server's (:func:`secure_total`).

Two things use it: the encoding statistics summed before round 1 under secure aggregation
(:mod:`consortium.deploy.secure_encoding`) and the totals of a federated analysis
(:mod:`consortium.deploy.analysis_site`, :mod:`consortium.deploy.analytics`). Training's
SecAgg+ runs as a pipeline stage instead (:mod:`consortium.secagg.stage`). The protocol
itself — keys, shares, masked inputs, the consistency round of authenticated runs, unmasking —
is :mod:`consortium.secagg.protocol`'s; this module only routes its messages between the
sites and the server for one fixed (stage, round, context).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from consortium.errors import DataError, PipelineError

__all__ = ["SecureTotal", "SecureTotalSite", "secure_total"]


class SecureTotalSite:
    """A site's side of one secure total: it masks the vector it was given (:meth:`load`)
    once, and answers the protocol's phases ``keys`` (message: the total's config),
    ``shares``, ``masked``, ``consistency`` (authenticated runs), ``unmask``, then ``end``.

    Args:
        site: the site's name.
        stage, round, context: what a config and every phase must name (a config for
            another run, stage or modulus is refused).
        modulus_bits: the modulus the vector's digits live in.
        what: how the refusals name the total (``"the encoding's secure total"``).
        identity: the site's signing identity and trust store (authenticated SecAgg+), or
            None.
        floor: the site's :class:`~consortium.secagg.floor.SecAggFloor`, or None.
    """

    def __init__(self, site: str, *, stage: str, round: int, context: bytes, modulus_bits: int,
                 what: str, identity: Any = None, floor: Any = None) -> None:
        self.site, self.stage, self.round, self.context = site, stage, round, context
        self.modulus_bits, self.what = modulus_bits, what
        self.identity, self.floor = identity, floor
        self._vector: torch.Tensor | None = None  # the digits, until they leave masked
        self._secagg: Any = None  # the SecAggClient of the total
        self._masked = False  # a masked input left this site: never a second one

    @property
    def masked(self) -> bool:
        """Whether this site's masked input has left it."""
        return self._masked

    def load(self, vector: torch.Tensor) -> None:
        """The digits to mask (once).

        Raises:
            PipelineError: a masked input already left this site.
        """
        if self._masked:
            raise PipelineError(f"site {self.site!r} already sent its masked sums")
        self._vector = vector

    def respond(self, stage: str, phase: str, message: Any, *, round: int) -> Any:
        """The reply to one phase message.

        Raises:
            PipelineError: another stage or round, a phase out of order or with a message of
                the wrong type, a config for another run or modulus, no digits loaded, or a
                second ``masked`` request.
            SecAggAbort: from the protocol (among them a config below the site's floor).
        """
        from consortium.secagg import protocol as p

        if stage != self.stage or round != self.round:
            raise PipelineError(f"site {self.site!r} runs no {stage[:40]!r} round {round} here")
        if phase == "end":
            self._secagg = None
            return None
        expected: Any = {
            "keys": p.SecAggConfig, "shares": p.KeysBroadcast, "masked": p.SharesForClient,
            "consistency": p.ConsistencyRequest, "unmask": p.UnmaskRequest,
        }.get(phase)
        if expected is None or not isinstance(message, expected):
            raise PipelineError(f"site {self.site!r}: no {phase[:40]!r} phase with a "
                                f"{type(message).__name__} in {self.what}")
        if phase == "keys":
            if (message.round != self.round or message.modulus_bits != self.modulus_bits
                    or bytes(message.context) != self.context):
                raise PipelineError(
                    f"site {self.site!r} refuses the secure-aggregation config of {self.what}: "
                    f"expected round {self.round}, modulus 2**{self.modulus_bits} and the "
                    f"context {self.context!r}"
                )
            if self._vector is None:
                raise PipelineError(f"site {self.site!r} holds no sums to mask")
            ident = self.identity
            self._secagg = p.SecAggClient(
                self.site, config=message, identity=ident.identity if ident else None,
                trust=ident.trust if ident else None, floor=self.floor,
            )
            return self._secagg.advertise_keys()
        if self._secagg is None:
            raise PipelineError(f"phase {phase!r} before 'keys' at site {self.site!r}")
        if phase == "shares":
            return self._secagg.share_keys(message)
        if phase == "masked":
            if self._vector is None or self._masked:
                raise PipelineError(f"site {self.site!r} already sent its masked sums")
            masked = self._secagg.masked_input(message, self._vector)
            self._vector, self._masked = None, True
            return masked
        if phase == "consistency":
            return self._secagg.sign_consistency(message)
        return self._secagg.unmask(message)


@dataclass(frozen=True)
class SecureTotal:
    """What the server learns from one secure total.

    Attributes:
        sum: the unmasked sum of the contributors' digits (``size`` of them).
        contributors: the sites whose inputs are in it, sorted.
        dropped: the sites asked that are not, sorted.
        authenticated: whether the keys were signed and the consistency round ran.
        corrupted_shares: (holder, owner) pairs of shares found corrupt and corrected.
    """

    sum: torch.Tensor
    contributors: list[str]
    dropped: list[str]
    authenticated: bool
    corrupted_shares: list[list[str]]


def secure_total(
    hub: Any, executor: Any, sa: Any, ids: list[str], *, size: int, stage: str, round: int,
    context: bytes, modulus_bits: int, what: str,
) -> SecureTotal:
    """Run SecAgg+ over the sites ``ids`` through ``executor.exchange`` (the deployment's
    Exchange) and return the unmasked total of their ``size``-digit inputs.

    A reply that claims another site's id is dropped; a masked input of another size is a
    counted rejection (``hub.reject``) and drops its site from the total. The sites are
    told ``end`` however it finishes. ``sa`` is the experiment's ``[secure_aggregation]``
    (threshold, neighbours).

    Raises:
        DataError: the protocol aborted (nothing was revealed), fewer than two sites
            contributed (a total of one site is that site's input), or the sum has another
            size.
    """
    from consortium.secagg.protocol import (
        ConsistencyRequest,
        MaskedInput,
        SecAggAbort,
        SecAggConfig,
        SecAggServer,
        graph_degree,
    )

    n = len(ids)
    k = graph_degree(n, n - 1 if sa.neighbours <= 0 else min(sa.neighbours, n - 1))
    config = SecAggConfig(
        num_clients_expected=n, threshold=max(1, math.ceil(sa.threshold * k)), neighbours=k,
        round=round, context=context, modulus_bits=modulus_bits,
    )
    server = SecAggServer(config=config)

    def replies(phase: str, messages: Mapping[str, Any]) -> Iterator[Any]:
        for cid, reply in executor.exchange(stage, phase, messages, {}, round=round):
            sender = getattr(reply, "client_id", getattr(reply, "sender", None))
            if sender != cid:  # a reply claiming another site's id is dropped
                continue
            if isinstance(reply, MaskedInput) and tuple(reply.vector.shape) != (size,):
                hub.reject(cid, "-", round, (
                    f"a masked input of shape {list(reply.vector.shape)} in {what}, not "
                    f"({size},): the site is dropped from the secure total"))
                continue
            yield reply

    try:
        broadcasts = server.collect_keys(list(replies("keys", dict.fromkeys(ids, config))))
        routed = server.route_shares(list(replies("shares", broadcasts)))
        request = server.collect_masked(replies("masked", routed))
        requests = dict.fromkeys(request.survivors, request)
        if server.authenticated:
            check = dict.fromkeys(request.survivors, ConsistencyRequest(request.survivors))
            requests = server.collect_consistency(replies("consistency", check))
        result = server.finish(list(replies("unmask", requests)))
    except SecAggAbort as exc:
        raise DataError(f"{what} was aborted, nothing was revealed: {exc}") from None
    finally:
        for _ in executor.exchange(stage, "end", dict.fromkeys(ids), {}, round=round):
            pass
    contributors = sorted(result.contributors)
    if len(contributors) < 2:
        raise DataError(f"only {contributors} contributed to {what}; a total of one site is "
                        "that site's sums: nothing is reported")
    if tuple(result.sum.shape) != (size,):
        raise DataError(f"{what} has {result.sum.numel()} digits, not {size}")
    return SecureTotal(
        result.sum, contributors, sorted(set(ids) - set(contributors)), server.authenticated,
        sorted(map(list, server.corrupted)) if server.corrupted else [],
    )
