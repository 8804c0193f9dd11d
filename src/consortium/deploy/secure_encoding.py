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

import threading
from collections.abc import Mapping
from typing import Any

import numpy as np

from consortium.data.preprocess import SiteSummary
from consortium.errors import DataError

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
        from consortium.analytics.secure import MODULUS_BITS, encode
        from consortium.deploy.secure_total import SecureTotalSite
        from consortium.deploy.summary import secure_layout, summary_answer

        self.site = site
        self._total = SecureTotalSite(
            site, stage=ENCODING_STAGE, round=ENCODING_ROUND, context=encoding_context(run_id),
            modulus_bits=MODULUS_BITS, what="the encoding's secure total", identity=identity,
            floor=floor,
        )
        keys = secure_layout(len(summary.categories))
        self._total.load(encode(summary_answer(summary, site=site), keys))

    def respond(self, stage: str, phase: str, message: Any, *, round: int) -> Any:
        """The reply to one phase message (:meth:`SecureTotalSite.respond
        <consortium.deploy.secure_total.SecureTotalSite.respond>`)."""
        return self._total.respond(stage, phase, message, round=round)


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
    from consortium.deploy.secure_total import secure_total
    from consortium.deploy.summary import secure_layout, summary_from_total

    ids = sorted(parts)
    n = len(ids)
    if n < 2:
        raise DataError(
            "secure aggregation of the encoding sums needs at least 2 sites (the total of one "
            "site is its own sums); run with more sites or without secure_aggregation.enabled"
        )
    d = len(parts[ids[0]].categories)
    keys = secure_layout(d)
    total = secure_total(
        hub, executor, cfg.secure_aggregation, ids, size=len(keys) * d * LIMBS,
        stage=ENCODING_STAGE, round=ENCODING_ROUND, context=encoding_context(hub.run_id),
        modulus_bits=MODULUS_BITS, what="the encoding's secure total",
    )
    contributors = total.contributors
    sums = decode(total.sum, keys, len(contributors))
    categories = [frozenset().union(*(parts[s].categories[j] for s in contributors))
                  for j in range(d)]
    return summary_from_total(sums, categories), total.dropped
