"""The deployment's encoding sums through SecAgg+ (issue 15): with
``secure_aggregation.enabled`` the server learns only the sites' total per-column count, sum
and sum of squares, and how many sites have a missing value / a non-0/1 value in each column.

A site's ``Summarize`` then carries only what stays in the clear: its table's schema (column
names, numeric flags, labels) and the categories it holds at least ``min_count`` times; its
sums are zero there. Once every expected site has summarised, the server runs one SecAgg+
round (Bell et al. 2020; Bonawitz et al. 2017 with the sites' provisioned identities) over the
hub's exchanges, stage :data:`ENCODING_STAGE`, while the sites wait for the merged encoding:
each site masks its sums encoded as the analytics' fixed-point digits
(:func:`consortium.analytics.secure.encode` with
:func:`consortium.deploy.summary.secure_layout`) and the server decodes only the total. The
implausible-summary checks (:func:`consortium.deploy.summary.implausible_summary`) apply to that
total: a site can no longer be excluded for its own sums, but a total no honest sites could
produce stops the run.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from consortium.data.preprocess import SiteSummary
from consortium.errors import DataError, PipelineError

__all__ = [
    "ENCODING_ROUND", "ENCODING_STAGE", "EncodingSecAgg", "clear_part", "encoding_context",
    "run_secure_encoding",
]

ENCODING_STAGE = "encoding"
"""The stage name of the encoding's secure-aggregation exchanges."""
ENCODING_ROUND = 0
"""The round of the encoding's one SecAgg+ round (before training's round 1)."""


def encoding_context(run_id: str) -> bytes:
    """The SecAgg context of run ``run_id``'s encoding sums: binds keys, masks and signatures
    to that run and apart from training's and an analysis'."""
    return b"consortium/encoding/v1/" + run_id.encode()


def clear_part(summary: SiteSummary) -> SiteSummary:
    """What a site's ``Summarize`` carries under secure aggregation: its released category
    sets; every sum zero and every flag false (they travel through SecAgg+)."""
    d = len(summary.categories)
    return SiteSummary(count=np.zeros(d), total=np.zeros(d), total_sq=np.zeros(d),
                       has_missing=np.zeros(d, dtype=bool), binary=np.zeros(d, dtype=bool),
                       categories=summary.categories)


class EncodingSecAgg:
    """A site's side of the encoding's SecAgg+ round: ``keys`` (the round's config, checked
    against this run's context and the analytics modulus), ``shares``, ``masked``,
    ``consistency`` (authenticated rounds), ``unmask``, then ``end``."""

    def __init__(self, site: str, summary: SiteSummary, *, run_id: str, identity: Any,
                 floor: Any) -> None:
        from consortium.analytics.secure import encode
        from consortium.deploy.summary import secure_layout, summary_answer

        self.site, self.run_id, self.identity, self.floor = site, run_id, identity, floor
        keys = secure_layout(len(summary.categories))
        self._vector: Any = encode(summary_answer(summary, site=site), keys)
        self._secagg: Any = None

    def respond(self, stage: str, phase: str, message: Any, *, round: int) -> Any:
        """The reply to one phase message.

        Raises:
            PipelineError: another stage or round, a phase out of order or of the wrong type, a
                config for another run or modulus, or a second ``masked`` request.
            SecAggAbort: from the protocol (among them a config below the site's floor).
        """
        from consortium.analytics.secure import MODULUS_BITS
        from consortium.secagg import protocol as p

        if stage != ENCODING_STAGE or round != ENCODING_ROUND:
            raise PipelineError(f"site {self.site!r} runs no {stage[:40]!r} round {round} now")
        if phase == "end":
            self._secagg = None
            return None
        expected: Any = {
            "keys": p.SecAggConfig, "shares": p.KeysBroadcast, "masked": p.SharesForClient,
            "consistency": p.ConsistencyRequest, "unmask": p.UnmaskRequest,
        }.get(phase)
        if expected is None or not isinstance(message, expected):
            raise PipelineError(f"site {self.site!r}: no {phase[:40]!r} phase with a "
                                f"{type(message).__name__} in the encoding's secure total")
        if phase == "keys":
            context = encoding_context(self.run_id)
            if (message.round != ENCODING_ROUND or message.modulus_bits != MODULUS_BITS
                    or bytes(message.context) != context):
                raise PipelineError(
                    f"site {self.site!r} refuses the encoding's secure-aggregation config: "
                    f"expected round {ENCODING_ROUND}, modulus 2**{MODULUS_BITS} and {context!r}"
                )
            if self._vector is None:
                raise PipelineError(f"site {self.site!r} already sent its masked sums")
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
            if self._vector is None:
                raise PipelineError(f"site {self.site!r} already sent its masked sums")
            masked = self._secagg.masked_input(message, self._vector)
            self._vector = None
            return masked
        if phase == "consistency":
            return self._secagg.sign_consistency(message)
        return self._secagg.unmask(message)


def run_secure_encoding(hub: Any, executor: Any, cfg: Any, *, stop: threading.Event,
                        timeout_s: float) -> None:
    """The server's side: wait until every expected site's clear summary is in
    (``hub.summaries_in``), run SecAgg+ over those sites and hand the hub the merged summary
    (:meth:`~consortium.deploy.hub.Hub.finish_secure_merge`) or why there is none. Returns at
    once when the hub already holds a merged encoding (a resumed run)."""
    import time

    deadline = time.monotonic() + timeout_s
    while not hub.summaries_in.wait(0.2):
        if stop.is_set() or time.monotonic() > deadline or hub.merged is not None:
            return
    if hub.merged is not None:
        return
    parts = hub.clear_summaries()
    try:
        merged, dropped = _secure_merge(hub, executor, cfg, parts)
    except DataError as exc:
        hub.finish_secure_merge(None, error=str(exc))
        return
    hub.finish_secure_merge(merged, dropped=dropped)


def _secure_merge(hub: Any, executor: Any, cfg: Any,
                  parts: Mapping[str, SiteSummary]) -> tuple[SiteSummary, list[str]]:
    from consortium.analytics.secure import LIMBS, MODULUS_BITS, decode
    from consortium.deploy.summary import secure_layout, summary_from_total
    from consortium.secagg.protocol import (
        ConsistencyRequest,
        MaskedInput,
        SecAggAbort,
        SecAggConfig,
        SecAggServer,
        graph_degree,
    )

    ids = sorted(parts)
    n = len(ids)
    if n < 2:
        raise DataError(
            "secure aggregation of the encoding sums needs at least 2 sites (the total of one "
            "site is its own sums); run with more sites or without secure_aggregation.enabled"
        )
    d = len(parts[ids[0]].categories)
    keys = secure_layout(d)
    size = len(keys) * d * LIMBS
    sa = cfg.secure_aggregation
    k = graph_degree(n, n - 1 if sa.neighbours <= 0 else min(sa.neighbours, n - 1))
    config = SecAggConfig(
        num_clients_expected=n, threshold=max(1, math.ceil(sa.threshold * k)), neighbours=k,
        round=ENCODING_ROUND, context=encoding_context(hub.run_id), modulus_bits=MODULUS_BITS,
    )
    server = SecAggServer(config=config)

    def replies(phase: str, messages: Mapping[str, Any]) -> Iterator[Any]:
        for cid, reply in executor.exchange(ENCODING_STAGE, phase, messages, {},
                                            round=ENCODING_ROUND):
            sender = getattr(reply, "client_id", getattr(reply, "sender", None))
            if sender != cid:  # a reply claiming another site's id is dropped
                continue
            if isinstance(reply, MaskedInput) and tuple(reply.vector.shape) != (size,):
                hub.reject(cid, "-", ENCODING_ROUND, (
                    f"masked encoding sums of shape {list(reply.vector.shape)}, not ({size},): "
                    "the site is dropped from the secure total"))
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
        raise DataError(f"the secure total of the encoding sums was aborted: {exc}") from None
    finally:
        for _ in executor.exchange(ENCODING_STAGE, "end", dict.fromkeys(ids), {},
                                   round=ENCODING_ROUND):
            pass
    contributors = sorted(result.contributors)
    if len(contributors) < 2:
        raise DataError(f"only {contributors} contributed to the encoding's secure total; a "
                        "total of one site is that site's sums")
    if tuple(result.sum.shape) != (size,):
        raise DataError(f"the encoding's secure total has {result.sum.numel()} digits, not {size}")
    total = decode(result.sum, keys, len(contributors))
    categories = [frozenset().union(*(parts[s].categories[j] for s in contributors))
                  for j in range(d)]
    return summary_from_total(total, categories), sorted(set(ids) - set(contributors))
