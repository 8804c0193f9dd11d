"""Sites that come and go: a deployment's roster grows, and its members leave and return.

A consortium's roster was fixed when round 1 started; here (issue 18) it changes between
rounds, the way NVFlare's and Flower's deployments let clients connect while a job runs:

- **late sites** — a provisioned site (certificate valid and not revoked: checked at
  ``Register``) that describes its data after round 1 is checked as the starting sites were
  (plausible sizes at ``Describe``, its data summary against the *merged* encoding at
  ``Summarize``, the same input shape and classes as the roster: :func:`late_refusal`), waits
  in :attr:`Hub.joining <consortium.deploy.hub.Hub.joining>`, and is admitted by
  :meth:`Membership.begin_round` before the next round's draw: it goes on the roster (the
  checkpoint's registry), into the round loop's client pool, the local-DP ledger and secure
  aggregation's known weights, and is sampled from that round on. The encoding the model was
  built with never changes: the late site receives the merged one and must fit it.
- **leaving and returning** — a site that neither waits for work nor calls for
  ``offline_after_s`` (three heartbeats) is offline: it is not sampled (a task already sent
  fails at once), and the first round that finds it gone audits a ``departed`` entry; when
  it registers again under the same identity and describes the same data it is online again
  (``returned``), with its roster entry, counts and its own ``--state`` (SCAFFOLD's
  ``c_i``, its privacy spend) untouched.

Sampling stays honest for the privacy accountants (:class:`OnlineSampler`): a round's cohort
is drawn from the online members only, which leaves every site's chance of taking part at
most what the accountant assumes (Poisson: ``q`` or 0) — except for uniform sampling of a
fixed count under central DP, whose accountant assumes ``k`` of the round-1 population, so
there the draw keeps the offline sites (they fail the round at once, like dropouts), and
late sites are admitted only with ``privacy.sampling = "poisson"`` and ``sampling.fraction``
(a rate that does not depend on the population).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from consortium.errors import ConfigError

__all__ = ["Membership", "OnlineSampler", "late_refusal", "late_sites_allowed"]


def late_refusal(site: str, info: Any, roster: Mapping[str, Any], *, open_roster: bool,
                 why_closed: str = "") -> str | None:
    """Why a site that is not on the fixed ``roster`` may not join the run (None: it may).

    Args:
        site: its name (authenticated before it got here).
        info: its declared :class:`~consortium.deploy.hub.SiteInfo` (already checked for
            plausible sizes by the service).
        roster: the run's sites and what they declared.
        open_roster: whether late sites are admitted at all (``--closed-roster``: no).
        why_closed: a reason late sites are refused in this run even with an open roster.
    """
    if not open_roster:
        return (f"the run started without site {site!r} and its roster is closed "
                "(consortium server --closed-roster): it cannot join a run in progress (it "
                "can take part in the next one)")
    if why_closed:
        return f"site {site!r} cannot join this run in progress: {why_closed}"
    if roster:
        first = next(iter(roster.values()))
        if tuple(info.input_shape) != tuple(first.input_shape) or info.num_classes != first.num_classes:
            return (f"site {site!r} describes inputs of shape {list(info.input_shape)} in "
                    f"{info.num_classes} classes, but the run's model takes shape "
                    f"{list(first.input_shape)} in {first.num_classes} classes: its data does "
                    "not fit the consortium's encoding (check its file's columns and labels)")
    return None


def late_sites_allowed(cfg: Any) -> str:
    """Why this experiment cannot admit sites after round 1 ("" : it can).

    Central DP with fixed-size sampling (``privacy.sampling = "fixed"``, or a Poisson rate derived from ``clients_per_round``)
    has an accountant that composes the sampling rate of the round-1 population; a roster
    that grows would change the rate of the rounds already accounted after a ``--resume``."""
    p, s = cfg.privacy, cfg.sampling
    if cfg.server.mode != "sync":  # each buffer a release without amplification: no rate
        return ""
    if p.mode == "central" and not (p.sampling == "poisson" and s.fraction):
        return ("central DP's accountant composes the sampling rate of the sites that started "
                "the run; admit late sites with privacy.sampling = \"poisson\" and "
                "sampling.fraction (a rate that does not depend on how many sites there are)")
    return ""


@dataclass
class OnlineSampler:
    """The experiment's sampler, drawn from the round's online sites only.

    Before each draw :meth:`Membership.begin_round` admits the sites that joined since the
    last round (the pool grows) and says who is online. Fewer online sites than
    ``sampling.clients_per_round``: every online site takes part (the round's ``min_results``
    and secure aggregation's floors still decide whether it counts). ``keep_offline``: draw
    from every roster site, online or not (central DP with uniform sampling; see the module
    docstring). Its ``size``, ``expected_size`` and ``secret_from_sites`` are the inner
    sampler's, so the privacy plan and ledger see the sampler they expect.
    """

    inner: Any
    membership: Membership
    keep_offline: bool = False

    @property
    def secret_from_sites(self) -> bool:
        return bool(getattr(self.inner, "secret_from_sites", False))

    def size(self, population: int) -> int:
        size = getattr(self.inner, "size", None)
        return int(size(population)) if size is not None else population

    def expected_size(self, population: int) -> float:
        return float(self.inner.expected_size(population))

    def sample(self, round: int, client_ids: Sequence[str], *, seed: int) -> list[str]:
        online = self.membership.begin_round(round)
        ids = self.membership.members(client_ids)
        if not self.keep_offline:
            ids = [c for c in ids if c in online]
        try:
            return list(self.inner.sample(round, ids, seed=seed))
        except ConfigError:  # fewer online sites than clients_per_round: all of them
            return list(ids)


@dataclass
class Membership:
    """The round loop's side of a changing roster (see the module docstring).

    Args:
        hub: the server's :class:`~consortium.deploy.hub.Hub`.
        cfg: the experiment.
        placeholder: ``(cfg, roster) -> FederatedDataset``, the server's placeholder data
            (declared sizes, no data) that the client pool is rebuilt from as sites join.
        say: where the operator's lines go.
    """

    hub: Any
    cfg: Any
    placeholder: Any
    say: Any = None
    pool: Any = None
    ledger: Any = None
    secure_sum: Any = None
    online_now: set[str] = field(default_factory=set)
    _last: set[str] | None = None

    def attach(self, federation: Any) -> None:
        """Take the assembled run's client pool, privacy ledger and secure sum (those a late
        site must join)."""
        self.pool = federation.server.clients
        self.ledger = federation.ledger
        self.secure_sum = federation.secure_sum

    def members(self, client_ids: Sequence[str]) -> list[str]:
        """The client pool's ids now (grown by :meth:`begin_round`), else ``client_ids``."""
        return list(self.pool) if self.pool is not None else list(client_ids)

    def begin_round(self, rnd: int) -> set[str]:
        """Admit the sites waiting to join, audit who left and who came back since the last
        round, and return the roster's sites online now."""
        joining = self.hub.take_joining()
        roster = self.hub.roster or {}
        online = self.hub.online()
        # a site that described its data while round 1 was being set up is a late one too
        for name in sorted(online - set(roster) - set(joining)):
            info = self.hub._declared(name)
            if info is not None and name not in self.hub.expelled:
                joining[name] = info
        for name in sorted(joining):
            self._admit(name, joining[name], rnd)
        roster = self.hub.roster or {}
        online &= set(roster)
        if self._last is not None:
            for name in sorted(self._last - online):
                self.hub.log_event("departed", site=name, round=rnd)
                self._print(f"site {name!r} is offline from round {rnd} (not sampled until it "
                            "connects again)")
            for name in sorted((online - self._last) - set(joining)):
                self.hub.log_event("returned", site=name, round=rnd)
                self._print(f"site {name!r} is back online from round {rnd}")
        self._last = set(online)
        self.online_now = online
        return online

    def _admit(self, name: str, info: Any, rnd: int) -> None:
        self.hub.admit(name, info, rnd)
        if self.pool is not None and name not in self.pool.packed.client_ids:
            self.pool.grow(self.placeholder(self.cfg, dict(self.hub.roster)).packed())
        admit = getattr(self.ledger, "admit", None)
        if admit is not None:  # local DP: the site's own accounting starts at 0
            admit(name, info.num_train)
        if self.secure_sum is not None:
            _know_weight(self.secure_sum, name, self._weight(info))
        self._print(f"site {name!r} joined the run ({info.num_train} training examples); "
                    f"sampled from round {rnd}")

    def _weight(self, info: Any) -> float:
        unit = self.cfg.privacy.mode in ("central", "distributed")
        return 1.0 if unit else float(info.num_train)

    def before_record(self, record: dict[str, Any], state: Any) -> None:
        """``metrics.jsonl`` gains ``sites`` (on the roster) and ``sites_online``."""
        record["sites"] = len(self.hub.roster or {})
        record["sites_online"] = len(self.online_now)

    def _print(self, line: str) -> None:
        (self.say or _stderr)(f"consortium server: {line}")


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _know_weight(secure_sum: Any, site: str, weight: float) -> None:
    """Add ``site``'s known weight to secure aggregation's weight check (the check of the
    securely summed weight against the contributors' known weights, which a site outside it
    would loosen to an upper bound). The aggregator is a frozen dataclass shared with the
    pipeline; its known weights change only between rounds, here."""
    known = dict(getattr(secure_sum, "weights", ()))
    if site in known or not hasattr(secure_sum, "weights"):
        return
    known[site] = weight
    object.__setattr__(secure_sum, "weights", tuple(sorted(known.items())))
