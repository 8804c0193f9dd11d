"""Issue 16 acceptance (digits, pathological shards): FedAvg global, local-only, FedPer, FedRep,
FedAvg + fine-tuning; seeds 0-4; every client per round and 10 per round.

Also Ditto (lambda 0.1 and 1) and APFL (alpha 0.25), personal models per client.

Prints one JSON line per run and writes benchmarks/results/personalization.json (or, with
--methods, personalization_<methods>.json).

Run:  PYTHONPATH=src python benchmarks/personalization.py [--methods ditto apfl] [--seeds 0]
"""
import argparse
import json
import time
from pathlib import Path

import torch

import consortium

torch.set_num_threads(1)

METHODS = {
    "fedavg": {"algorithm.name": "fedavg"},
    "fedavg+ft20": {"algorithm.name": "fedavg", "personalization.finetune_steps": 20},
    "fedavg+ft100": {"algorithm.name": "fedavg", "personalization.finetune_steps": 100},
    "fedper": {"algorithm.name": "fedper"},
    "fedrep_h1": {"algorithm.name": "fedrep", "personalization.head_epochs": 1},
    "fedrep_h5": {"algorithm.name": "fedrep", "personalization.head_epochs": 5},
    "ditto": {"algorithm.name": "ditto", "personalization.ditto_lambda": 0.1},
    "ditto_l1": {"algorithm.name": "ditto", "personalization.ditto_lambda": 1.0},
    "apfl": {"algorithm.name": "apfl", "personalization.apfl_alpha": 0.25},
}
parser = argparse.ArgumentParser()
parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=None)
parser.add_argument("--seeds", type=int, nargs="+", default=list(range(5)))
args = parser.parse_args()
chosen = {m: METHODS[m] for m in args.methods} if args.methods else METHODS
SETUPS = {"all50": {}, "10per_round": {"sampling.clients_per_round": 10}}
out = []
for setup, sover in SETUPS.items():
    for seed in args.seeds:
        for method, mover in chosen.items():
            sets = [f"{k}={json.dumps(v)}" for k, v in {**sover, **mover, "seed": seed}.items()]
            t = time.time()
            r = consortium.simulate("examples/personalized_digits.toml", overrides=sets)
            s = r.summary
            row = {"setup": setup, "seed": seed, "method": method, "wall_s": time.time() - t,
                   "global": s["final"]["accuracy"], "local": s["baselines"]["local"]["accuracy"],
                   "personalized": s.get("personalized", {}).get("accuracy"),
                   "spread": s["client_accuracy"]}
            out.append(row)
            print(json.dumps(row), flush=True)
Path(__file__).with_name("results").mkdir(exist_ok=True)
name = "personalization" + ("_" + "_".join(args.methods) if args.methods else "")
Path(__file__).with_name("results").joinpath(f"{name}.json").write_text(json.dumps(out, indent=1))
