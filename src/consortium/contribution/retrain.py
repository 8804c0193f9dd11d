"""Leave-one-out by retraining: n + 1 federations, the one valuation that works under secure aggregation.

Under secure aggregation the server never sees one site's update, so coalition models cannot
be rebuilt from a round's updates; extra secure sums over ``N ∖ {i}`` in the same round would
not help either, since ``sum(N) − sum(N ∖ {i})`` *is* site ``i``'s update. What the server
may legitimately learn is the final model of a federation: so train the federation once
with every site and once without each site (each run under the experiment's own secure
aggregation and privacy settings), and score ``v(N) − v(N ∖ {i})`` on the validation data
(the leave-one-out baseline of Ghorbani & Zou, ICML 2019, §2; here each "point" is a site).
Cost: n + 1 full trainings. A simulated data attack (label flipping) stays in the sites' data;
a simulated *model* attack is not replayed in the runs without it.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from consortium.contribution.recording import (
    ModelUtility,
    Settings,
    combine_rounds,
    validation_data,
)

__all__ = ["leave_one_out_by_runs"]


def leave_one_out_by_runs(cfg: Any, *, dataset: Any = None) -> dict[str, Any]:
    """Each site's ``v(N) − v(N ∖ {i})`` from n + 1 simulated federations of ``cfg`` (see the
    module docstring); the result has :func:`combine_rounds`' keys, with ``runs`` = n + 1.

    Raises:
        ConfigError: fewer than 2 sites, or what ``simulate`` refuses.
    """
    from consortium.config import AttackConfig, ContributionConfig
    from consortium.errors import ConfigError
    from consortium.federation import Federation, Given, build_data, build_model
    from consortium.simulation import simulate

    started = time.perf_counter()
    f = Federation(cfg, Given(dataset=dataset))
    build_data(f)  # poisoned as the run's sites were
    build_model(f)
    full = f.dataset
    sites = list(full.client_ids)
    if len(sites) < 2:
        raise ConfigError("leave-one-out needs at least 2 sites")
    c = cfg.contribution
    settings = Settings.of(c, seed=cfg.seed, method="leave-one-out")
    evaluate = ModelUtility(f.factory, f.init, validation_data(full, c.validation),
                            utility=c.utility)
    base = cfg.replace(contribution=ContributionConfig(), attack=AttackConfig())

    def value(ds: Any) -> float:
        n = len(ds.clients)
        s = base.sampling
        run_cfg = base.replace(sampling=dataclasses.replace(
            s, clients_per_round=min(s.clients_per_round, n))) if s.clients_per_round else base
        return evaluate(simulate(run_cfg, dataset=ds, report=False).params.vector)

    everyone = value(full)
    empty = evaluate(f.init.vector)
    values = {}
    for site in sites:
        rest = {cid: full.clients[cid] for cid in sites if cid != site}
        values[site] = everyone - value(dataclasses.replace(full, clients=rest, groups={},
                                                            fitting={}))
    record = {"round": 0, "values": values, "standard_error": dict.fromkeys(sites, 0.0),
              "full": everyone, "empty": empty, "evaluations": len(sites) + 2,
              "seconds": time.perf_counter() - started}
    out = combine_rounds([record], sites, settings)
    out.update({"method": "leave-one-out (retrained)", "runs": len(sites) + 1, "rounds": cfg.rounds})
    return out
