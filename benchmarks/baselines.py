"""Baselines beside the federation on the README's digits experiment: the sequential
one-at-a-time trainer (the old way, ``"full"`` budget), the run's executor with the
``"full"`` budget, and the run's executor with the ``"matched"`` budget (the default,
``evaluation.baseline_budget``; server/baselines.py).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/baselines.py [--rounds 60] [--no-sequential]
        [--json out.json]

Prints one table (wall seconds: the rounds; local-only and pooled in each column, and both
together: the executor columns train pooled in a second thread beside local-only), the
baselines' accuracies (sequential and executor "full" must agree: the same training,
batched) and the budgets.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from typing import Any

# The README's example experiment ("An experiment file"), as it is written there.
README_DIGITS: dict[str, Any] = {
    "name": "digits-noniid", "seed": 0, "rounds": 60,
    "data": {"dataset": "digits", "partition": "dirichlet", "clients": 20, "alpha": 0.3},
    "model": {"name": "cnn"},
    "algorithm": {"name": "fedprox", "local_epochs": 2, "batch_size": 32, "lr": 0.05, "mu": 0.01},
    "sampling": {"clients_per_round": 10},
    "server": {"optimizer": "adam"},
    "simulation": {"stragglers": 0.5},
    "evaluation": {"baselines": []},
}


def main() -> None:
    from consortium.config import ExperimentConfig
    from consortium.federation import Given, assemble
    from consortium.server.baselines import (
        BaselineSetup,
        Budget,
        local_baseline,
        pooled_baseline,
        run_baselines,
    )

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--no-sequential", action="store_true",
                        help="skip the sequential trainer's column (the slowest)")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    cfg = ExperimentConfig.from_dict({**README_DIGITS, "rounds": args.rounds})
    fed = assemble(cfg, Given())
    state = fed.server.init_state(fed.init)
    t = time.perf_counter()
    state = fed.server.run(state, rounds=cfg.rounds)
    rounds_s = time.perf_counter() - t
    full = BaselineSetup(fed.factory, fed.init, fed.settings, fed.loss_fn, cfg.rounds, cfg.seed)
    matched = dataclasses.replace(full, budget=Budget("matched", len(fed.dataset.clients),
                                                      cfg.simulation.stragglers))

    columns: dict[str, dict[str, Any]] = {}
    if not args.no_sequential:
        t = time.perf_counter()
        seq_local, _ = local_baseline(fed.dataset, full)
        local_s = time.perf_counter() - t
        t = time.perf_counter()
        seq_pooled, _ = pooled_baseline(fed.dataset, full, per_round_clients=fed.per_round)
        columns["sequential full"] = {
            "local_s": local_s, "pooled_s": time.perf_counter() - t,
            "local": seq_local["accuracy"], "pooled": seq_pooled["accuracy"],
        }
    for name, setup in (("executor full", full), ("executor matched", matched)):
        t = time.perf_counter()
        out = run_baselines(["local", "pooled"], fed.dataset, setup, fed.executor,
                            per_round_clients=fed.per_round)
        columns[name] = {
            "both_s": time.perf_counter() - t,
            "local_s": out.results["local"]["budget"]["wall_s"],
            "pooled_s": out.results["pooled"]["budget"]["wall_s"],
            "local": out.results["local"]["accuracy"], "pooled": out.results["pooled"]["accuracy"],
            "local_min": out.results["local"]["accuracy_min"],
            "budget": {k: {b: v for b, v in out.results[k]["budget"].items() if b != "rule"}
                       for k in ("local", "pooled")},
        }
    fed.executor.close()

    print(f"{cfg.name}: {cfg.rounds} rounds, {len(fed.dataset.clients)} clients, "
          f"{fed.per_round} a round, executor {fed.executor.name}; federated accuracy "
          f"{state.last_metrics.get('accuracy'):.4f}")
    print(f"{'wall s':<18}" + "".join(f"{c:>18}" for c in columns))
    print(f"{'rounds':<18}" + "".join(f"{rounds_s:>18.1f}" for _ in columns))
    for key, label in (("local_s", "local only"), ("pooled_s", "pooled")):
        print(f"{label:<18}" + "".join(f"{c[key]:>18.1f}" for c in columns.values()))
    # the run's way trains pooled beside local-only in a second thread (server/baselines.py):
    # the wall time of both together, not the sum of the two
    print(f"{'both baselines':<18}" + "".join(
        f"{c.get('both_s', c['local_s'] + c['pooled_s']):>18.1f}" for c in columns.values()))
    for key, label in (("local", "local accuracy"), ("pooled", "pooled accuracy")):
        print(f"{label:<18}" + "".join(f"{c[key]:>18.4f}" for c in columns.values()))
    for name, c in columns.items():
        if "budget" in c:
            print(f"{name} budgets: {c['budget']}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"rounds_s": rounds_s, "columns": columns,
                       "final": state.last_metrics.get("accuracy")}, fh, indent=2, default=str)


if __name__ == "__main__":
    main()
