"""Issue 16 acceptance (fairness): q-FFL (q-FedAvg, Li et al. 2020) against FedAvg on
Synthetic(1,1) with 100 clients, 10 a round, logistic regression: mean test accuracy and the
worst-10 % clients' accuracy (summary.json's client_accuracy: p10 and worst).

Prints one JSON line per run and writes benchmarks/results/fairness.json.

Run:  PYTHONPATH=src python benchmarks/fairness.py [--rounds 200] [--seeds 0 1 2] [--q 0 1 2 5]
(q = 0 is FedAvg with equal client weights; "fedavg" is the sample-weighted baseline.)
"""
import argparse
import json
import time
from pathlib import Path

import torch

import consortium

torch.set_num_threads(1)

parser = argparse.ArgumentParser()
parser.add_argument("--rounds", type=int, default=200)
parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
parser.add_argument("--q", type=float, nargs="+", default=[1.0, 2.0, 5.0])
args = parser.parse_args()


def config(seed: int, algorithm: dict) -> dict:
    return {
        "name": "fairness-synthetic", "seed": seed, "rounds": args.rounds,
        "data": {"dataset": "synthetic", "alpha": 1.0, "beta": 1.0, "clients": 100},
        "model": {"name": "logistic"},
        "algorithm": {"local_epochs": 1, "batch_size": 10, "lr": 0.1, **algorithm},
        "sampling": {"clients_per_round": 10},
        "evaluation": {"every": args.rounds},
    }


METHODS = {"fedavg": {"name": "fedavg"}, **{f"qffl_q{q:g}": {"name": "qffl", "q": q} for q in args.q}}
out = []
for seed in args.seeds:
    for method, algorithm in METHODS.items():
        t = time.time()
        s = consortium.simulate(config(seed, algorithm), report=False).summary
        row = {"seed": seed, "method": method, "wall_s": round(time.time() - t, 1),
               "accuracy": s["final"]["accuracy"], "spread": s["client_accuracy"]}
        out.append(row)
        print(json.dumps(row), flush=True)
Path(__file__).with_name("results").mkdir(exist_ok=True)
Path(__file__).with_name("results").joinpath("fairness.json").write_text(json.dumps(out, indent=1))
