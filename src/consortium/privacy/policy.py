"""Site privacy policies: each site's own budget, checked by the site before it trains."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from consortium.client.training import LocalTraining
from consortium.errors import ConfigError
from consortium.messages import Task

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["SitePolicy", "load_policies", "site_epsilon"]

RELEASES = "privacy.releases"
DP_STEPS = "privacy.dp_steps"


def site_epsilon(noise_multiplier: float, releases: int, delta: float) -> float:
    """What ``releases`` Gaussian releases of this site's clipped update cost the site.

    A site knows when it took part, so it cannot count on amplification by sampling: each
    release is a plain Gaussian mechanism (``dp_accounting.GaussianDpEvent``), composed
    with the RDP accountant. This is a conservative, site-verifiable bound.
    """
    if releases <= 0:
        return 0.0
    import dp_accounting

    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(dp_accounting.GaussianDpEvent(noise_multiplier), releases)
    return float(acc.get_epsilon(delta))


@dataclass(frozen=True)
class SitePolicy:
    """A site's own rules, enforced by the site whatever the server asks.

    Budget (every task): never spend more than ``max_epsilon`` at ``delta``; never contribute
    to an aggregate with fewer than ``min_sites`` other sites in it (0 = no such rule).

    Experiment (when a deployed site joins a run, see :mod:`consortium.client.approval`):
    ``approve`` lists the experiment manifests' hashes the site approved, or is
    ``"matching"`` to join any experiment that keeps the rules below; ``models`` the
    ``package.module:factory`` models the operator allows beyond the built-in ones;
    ``algorithms`` the algorithms it accepts (empty: any); ``require_dp`` and
    ``require_secure_aggregation`` what must protect its updates; ``trust_server_noise``
    whether central DP noise, which the server adds and the site cannot see, counts for
    ``max_epsilon`` and ``require_dp``; ``send_metrics`` the training metrics allowed to leave
    the site in the clear (``steps`` always does: it follows from the declared data size);
    ``secagg_threshold`` / ``secagg_neighbours`` the least Shamir threshold (a fraction of the
    neighbours) and neighbour count it accepts in secure aggregation (0 keeps the built-in
    safe defaults). A deployed site counts ``min_sites`` from the signed secure-aggregation
    keys of its peers, so that rule needs secure aggregation with provisioned certificates.

    Analytics (``consortium server --analyze``): ``min_count`` is the smallest nonzero count the
    site releases, whatever the query asks (the site applies the larger of the two; 0: the
    query's); ``max_epsilon`` and ``delta`` bound its DP releases (its own ledger).

    After a training run (``[interpret]``, ``[contribution]``; :mod:`consortium.deploy.
    interpret_site`): ``interpret = false`` refuses to explain the final model (permutation
    importance, SHAP and calibration sums over its test split, under ``min_count``);
    ``contribution = false`` refuses to join an experiment with ``[contribution]`` at all (its
    updates would reach the other sites inside one-site coalition models) and to evaluate
    coalition models. Both default to true.
    """

    max_epsilon: float = float("inf")
    delta: float = 1e-5
    min_sites: int = 0
    approve: tuple[str, ...] | str = ()
    models: tuple[str, ...] = ()
    algorithms: tuple[str, ...] = ()
    require_dp: bool = False
    require_secure_aggregation: bool = False
    trust_server_noise: bool = False
    send_metrics: tuple[str, ...] = ()
    secagg_threshold: float = 0.0
    secagg_neighbours: int = 0
    min_count: int = 0
    interpret: bool = True
    contribution: bool = True

    def __post_init__(self) -> None:
        if not self.max_epsilon > 0:
            raise ConfigError(f"site policy max_epsilon = {self.max_epsilon} must be > 0")
        if not 0 < self.delta < 1:
            raise ConfigError(f"site policy delta = {self.delta} must be in (0, 1)")
        if self.min_sites < 0:
            raise ConfigError(f"site policy min_sites = {self.min_sites} must be >= 0")
        if isinstance(self.approve, str) and self.approve != "matching":
            raise ConfigError(
                f'site policy approve = {self.approve!r}: give a list of manifest hashes or '
                '"matching" (join any experiment that keeps this policy\'s rules)'
            )
        for key in ("approve", "models", "algorithms", "send_metrics"):
            value = getattr(self, key)
            if isinstance(value, list):
                object.__setattr__(self, key, tuple(str(v) for v in value))
        if not 0 <= self.secagg_threshold <= 1:
            raise ConfigError(
                f"site policy secagg_threshold = {self.secagg_threshold} must be a fraction of "
                "the neighbours in [0, 1] (0: the built-in default)"
            )
        if self.secagg_neighbours < 0:
            raise ConfigError(f"site policy secagg_neighbours = {self.secagg_neighbours} must be >= 0")
        if isinstance(self.min_count, bool) or not isinstance(self.min_count, int) or self.min_count < 0:
            raise ConfigError(
                f"site policy min_count = {self.min_count!r} must be a whole number >= 0 (the "
                "smallest nonzero count the site releases in an analysis; 0: the query's)"
            )

    def review(
        self,
        task: Task,
        state: Mapping[str, torch.Tensor],
        *,
        settings: LocalTraining | None = None,
        examples: int = 0,
        deployed: bool = False,
        own_noise: float | None = None,
    ) -> str | None:
        """Why this site refuses ``task``, or ``None`` if it takes part.

        Under local DP (``settings.local_dp``) the spend is the site's DP-SGD accounting over
        all its local steps, this task's included; otherwise it counts the central releases of
        its update it took part in.

        ``deployed``: the task comes from a server the site does not trust, so the policy
        relies only on what the site can check. The cohort size the task states is ignored
        (``min_sites`` is counted from the peers' signed secure-aggregation keys instead), and
        central DP noise, which the server adds out of the site's sight, counts only with
        ``trust_server_noise``.

        ``own_noise``: under distributed DP, the noise multiplier of the noise this site adds
        itself (:meth:`DistributedDP.own_noise_multiplier`); the budget counts that alone,
        each release a plain Gaussian — the other sites' noise is their word.
        """
        others = task.cohort_size - 1
        if self.min_sites and not deployed and others < self.min_sites:
            return (
                f"site {task.client_id!r} refuses round {task.round}: the aggregate would hold "
                f"{others} other sites, its policy requires at least {self.min_sites}"
            )
        if self.max_epsilon == float("inf"):
            return None
        if settings is not None and settings.local_dp:
            return self._review_local(task, state, settings, examples)
        if own_noise is not None:
            return self._review_releases(task, state, own_noise, "its own noise")
        z = next(
            (float(p["noise_multiplier"]) for p in task.stage_payloads if "noise_multiplier" in p),
            None,
        )
        if z is None:
            return (
                f"site {task.client_id!r} refuses round {task.round}: the round releases its "
                "update without differential privacy and its policy sets max_epsilon"
            )
        if deployed and not self.trust_server_noise:
            return (
                f"site {task.client_id!r} refuses round {task.round}: its budget counts only "
                "noise it can verify, and central DP noise is added by the server out of the "
                "site's sight (the server states noise_multiplier "
                f"{z:g}); ask for privacy.mode = \"local\", or set trust_server_noise = true "
                "in the site policy to accept the server's word"
            )
        return self._review_releases(task, state, z, "the central noise")

    def _review_releases(
        self, task: Task, state: Mapping[str, torch.Tensor], z: float, noise: str
    ) -> str | None:
        done = int(state[RELEASES][0]) if RELEASES in state else 0
        after = site_epsilon(z, done + 1, self.delta)
        if after > self.max_epsilon:
            return (
                f"site {task.client_id!r} refuses round {task.round}: taking part would bring its "
                f"epsilon to {after:.3g} (delta {self.delta:g}, counting {noise}), past its "
                f"budget of {self.max_epsilon:g}"
            )
        return None

    def _review_local(
        self, task: Task, state: Mapping[str, torch.Tensor], settings: LocalTraining, examples: int
    ) -> str | None:
        from consortium.client.training import planned_steps, steps_for_work
        from consortium.privacy.accountant import RoundMechanism, epsilon

        done = int(state[DP_STEPS][0]) if DP_STEPS in state else 0
        steps = steps_for_work(planned_steps(examples, settings), task.work)
        rate = min(1.0, settings.batch_size / examples)
        after = epsilon(RoundMechanism(settings.dp_noise, "poisson", rate=rate), done + steps,
                        self.delta)
        if after > self.max_epsilon:
            return (
                f"site {task.client_id!r} refuses round {task.round}: {steps} more DP-SGD steps "
                f"would bring its epsilon to {after:.3g} (delta {self.delta:g}), past its budget "
                f"of {self.max_epsilon:g}"
            )
        return None


def record_release(state: dict[str, torch.Tensor], *, steps: int = 0) -> None:
    """Count one more release of this site's update, and its local DP-SGD steps."""
    done = int(state[RELEASES][0]) if RELEASES in state else 0
    state[RELEASES] = torch.tensor([float(done + 1)])
    if steps:
        taken = int(state[DP_STEPS][0]) if DP_STEPS in state else 0
        state[DP_STEPS] = torch.tensor([float(taken + steps)])


def load_policies(path: str | Path) -> dict[str, SitePolicy]:
    """Read site policies from TOML: ``[default]`` for every site, ``[sites.<id>]`` per site.

    Raises:
        ConfigError: a missing or invalid file, or an unknown key.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"site policy file {str(p)!r} does not exist (privacy.site_policies)")
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"site policy file {str(p)!r} is not valid TOML: {exc}") from exc
    allowed = {f.name for f in fields(SitePolicy)}

    def build(table: object, where: str) -> SitePolicy:
        if not isinstance(table, dict):
            raise ConfigError(f"{where} in {str(p)!r} must be a table")
        unknown = set(table) - allowed
        if unknown:
            raise ConfigError(
                f"unknown key {sorted(unknown)[0]!r} in {where} of {str(p)!r}; allowed: "
                f"{', '.join(sorted(allowed))}"
            )
        return SitePolicy(**table)

    out: dict[str, SitePolicy] = {}
    if "default" in data:
        out["*"] = build(data["default"], "[default]")
    for cid, table in dict(data.get("sites", {})).items():
        merged = {**data.get("default", {}), **table} if isinstance(table, dict) else table
        out[str(cid)] = build(merged, f"[sites.{cid}]")
    extra = set(data) - {"default", "sites"}
    if extra:
        raise ConfigError(f"unknown section {sorted(extra)[0]!r} in {str(p)!r}; use [default] and [sites.<id>]")
    return out
