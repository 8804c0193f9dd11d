"""Issue 16 acceptance (fairness): q-FFL (q-FedAvg, Li, Sanjabi, Beirami, Smith, "Fair Resource
Allocation in Federated Learning", ICLR 2020) against FedAvg on Synthetic(1,1), 100 clients, 10 a
round, logistic regression, 1 local epoch, batch 10 (the paper's Synthetic setting; the paper's
20,000 rounds are out of reach here, 2,000 is the default).

The paper's metrics, each client counting once: "average" = the mean of the clients' test
accuracies, "worst 10 %" = the mean accuracy of the worst 10 % of clients (summary.json's
``client_accuracy.global.worst10_mean``; not the 10th percentile). Baselines: FedAvg weighted by
samples ("fedavg") and q = 0 (every client weighted equally). Clients are drawn uniformly;
``--sampling size`` draws them with probability ∝ their training rows as the paper's code does
(its q = 0 row is then FedAvg's objective; q-FFL minimises ``Σ_k p_k F_k^{q+1}``, ``p_k ∝ n_k``).

Two phases, so nothing is tuned on the test split:

- ``tune``: every method × every learning rate (for q-FFL the step is 1/L = lr, so this is the
  paper's sweep over L), evaluated on a validation split carved out of each client's training
  rows (``data.validation``); the chosen lr per method is the one with the best validation
  *average* (mean client accuracy), ties to the smaller lr.
- ``test``: each method at its chosen lr, on the test split, for every seed (a seed draws new
  data: the paper's data-partition seeds).

Prints one JSON line per run and writes benchmarks/results/fairness-tuned.json (the untuned
session-6 runs stay in fairness.json).

Run:  OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/fairness.py \\
          [--phase tune|test|both] [--rounds 2000] [--seeds 0 1 2] [--q 0 1 2]
          [--lrs 0.003 0.01 0.03 0.1 0.3] [--validation 0.2] [--sampling uniform|size]
(benchmarks/RESULTS.md, "q-FFL on Synthetic(1,1), tuned", has the commands and the results.)
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import consortium
from consortium.config import ExperimentConfig
from consortium.data.registry import load_dataset
from consortium.seeds import derive_seed

torch.set_num_threads(1)

OUT = Path(__file__).with_name("results") / "fairness-tuned.json"


def config(seed: int, rounds: int, lr: float, algorithm: dict, validation: float) -> dict:
    return {
        "name": "fairness-synthetic", "seed": seed, "rounds": rounds,
        "data": {"dataset": "synthetic", "alpha": 1.0, "beta": 1.0, "clients": 100,
                 "validation": validation},
        "model": {"name": "logistic"},
        "algorithm": {"local_epochs": 1, "batch_size": 10, "lr": lr, **algorithm},
        "sampling": {"clients_per_round": 10},
        "evaluation": {"every": rounds},
    }


@dataclass(frozen=True)
class SizeWeightedSampler:
    """``count`` clients a round without replacement, each drawn with probability proportional
    to its training examples: the q-FFL paper's sampling (``sampling = 2`` in its code), under
    which q = 0 with equal weights is FedAvg's objective and q-FFL minimises
    ``Σ_k p_k F_k^{q+1}`` with ``p_k ∝ n_k``. Seeded by (run seed, round)."""

    count: int
    sizes: dict[str, int]

    def expected_size(self, population: int) -> float:
        return float(self.count)

    def sample(self, round: int, client_ids: Sequence[str], *, seed: int) -> list[str]:
        p = np.array([self.sizes[c] for c in client_ids], dtype=np.float64)
        rng = np.random.default_rng(derive_seed(seed, "sample-by-size", round))
        chosen = np.sort(rng.choice(len(client_ids), size=self.count, replace=False, p=p / p.sum()))
        return [client_ids[i] for i in chosen]


def run(seed: int, rounds: int, lr: float, method: str, algorithm: dict, validation: float,
        sampling: str) -> dict:
    t = time.time()
    cfg = ExperimentConfig.from_dict(config(seed, rounds, lr, algorithm, validation))
    sampler = None
    if sampling == "size":
        packed = load_dataset(cfg.data, seed=seed).packed()
        sizes = dict(zip(packed.client_ids, packed.train_sizes().tolist(), strict=True))
        sampler = SizeWeightedSampler(cfg.sampling.clients_per_round, sizes)
    s = consortium.simulate(cfg, sampler=sampler, report=False).summary
    spread = s["client_accuracy"]["global"]
    return {
        "phase": "tune" if validation else "test", "sampling": sampling, "seed": seed,
        "method": method, "lr": lr,
        "rounds": rounds, "wall_s": round(time.time() - t, 1),
        "average": spread["mean"], "worst10": spread["worst10_mean"], "p10": spread["p10"],
        "worst": spread["worst"], "std": spread["std"], "jain": spread["jain"],
        "weighted_accuracy": s["final"]["accuracy"],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--q", type=float, nargs="+", default=[0.0, 1.0, 2.0])
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.01, 0.03, 0.1, 0.3])
    parser.add_argument("--validation", type=float, default=0.2)
    parser.add_argument("--tune-seed", type=int, default=0)
    parser.add_argument("--phase", choices=["tune", "test", "both"], default="both")
    parser.add_argument("--sampling", choices=["uniform", "size"], default="uniform",
                        help="uniform: 10 clients uniformly; size: probability ∝ training "
                        "examples, as in the paper's code")
    parser.add_argument("--no-fedavg", dest="fedavg", action="store_false",
                        help="leave out sample-weighted FedAvg (with --sampling size the "
                        "paper's FedAvg is q = 0: size-weighted draws, equal weights)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    methods: dict[str, dict[str, Any]] = {"fedavg": {"name": "fedavg"}} if args.fedavg else {}
    methods.update({f"qffl_q{q:g}": {"name": "qffl", "q": q} for q in args.q})
    rows: list[dict] = json.loads(args.out.read_text()) if args.out.exists() else []

    def keep(row: dict) -> None:
        rows[:] = [r for r in rows if not all(r.get(k) == row[k] for k in
                                               ("phase", "sampling", "seed", "method", "lr",
                                                "rounds"))]
        rows.append(row)
        print(json.dumps(row), flush=True)
        args.out.parent.mkdir(exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1))

    if args.phase in ("tune", "both"):
        for method, algorithm in methods.items():
            for lr in args.lrs:
                keep(run(args.tune_seed, args.rounds, lr, method, algorithm, args.validation,
                         args.sampling))
    chosen: dict[str, float] = {}
    for method in methods:
        tuned = [r for r in rows if r["phase"] == "tune" and r["method"] == method
                 and r["rounds"] == args.rounds and r["lr"] in args.lrs
                 and r.get("sampling", "uniform") == args.sampling]
        if tuned:
            chosen[method] = max(tuned, key=lambda r: (r["average"], -r["lr"]))["lr"]
    print("chosen lr (best validation average):", json.dumps(chosen), flush=True)
    if args.phase in ("test", "both"):
        for seed in args.seeds:
            for method, algorithm in methods.items():
                if method in chosen:
                    keep(run(seed, args.rounds, chosen[method], method, algorithm, 0.0,
                             args.sampling))
    table(rows, args.rounds, args.sampling)


def table(rows: list[dict], rounds: int, sampling: str) -> None:
    """Mean over the test seeds of each method at its chosen lr."""
    test = [r for r in rows if r["phase"] == "test" and r["rounds"] == rounds
            and r.get("sampling", "uniform") == sampling]
    print("\n| method | lr | seeds | average | worst 10 % | p10 | worst | weighted acc. |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for method in dict.fromkeys(r["method"] for r in test):
        mine = [r for r in test if r["method"] == method]
        mean = {k: sum(r[k] for r in mine) / len(mine)
                for k in ("average", "worst10", "p10", "worst", "weighted_accuracy")}
        print(f"| {method} | {mine[0]['lr']:g} | {len(mine)} | {mean['average']:.3f} | "
              f"{mean['worst10']:.3f} | {mean['p10']:.3f} | {mean['worst']:.3f} | "
              f"{mean['weighted_accuracy']:.3f} |")


if __name__ == "__main__":
    main()
