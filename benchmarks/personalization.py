"""Issue 16 acceptance (digits, pathological shards): FedAvg global, local-only, FedPer, FedRep,
FedAvg + fine-tuning; seeds 0-4; every client per round and 10 per round.

Prints one JSON line per run and writes benchmarks/results/personalization.json.

Run:  PYTHONPATH=src python benchmarks/personalization.py
"""
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
}
SETUPS = {"all50": {}, "10per_round": {"sampling.clients_per_round": 10}}
out = []
for setup, sover in SETUPS.items():
    for seed in range(5):
        for method, mover in METHODS.items():
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
Path(__file__).with_name("results").joinpath("personalization.json").write_text(json.dumps(out, indent=1))
