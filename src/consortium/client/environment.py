"""What belongs to a site and never comes from the server.

A deployed site does not trust the server: every choice that protects its data is made from
the site's own resources, gathered here and handed to the pipeline's client halves through
``ClientContext.site``. A simulation passes ``None`` and keeps drawing from the task's seed,
so that a run can be repeated exactly (a simulation-only mode: the simulator is every party).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["SiteEnvironment"]


@dataclass(frozen=True)
class SiteEnvironment:
    """A site's private resources.

    Attributes:
        randomness: the site's CSPRNG (:class:`consortium.privacy.randomness.SystemRandomness`
            in a deployment): DP-SGD noise and batches, secure-aggregation rounding. ``None``
            draws from the task's seed (simulation only).
        identity: the site's signing identity for secure aggregation (its provisioned key and
            certificate, and the consortium CA to check its peers), or ``None``.
        run_id: the run the site joined (secure aggregation binds its keys to it).
        secagg: the site's own secure-aggregation minimums (threshold, neighbours, cohort);
            the server's configuration can raise them, never lower them.
        send_metrics: the training metrics allowed to leave the site in the clear (None: all,
            as in a simulation).
    """

    randomness: Any = None
    identity: Any = None
    run_id: str = ""
    secagg: Any = None
    send_metrics: frozenset[str] | None = None
