"""Print a fingerprint (SHA-256 of the final parameters, accuracy, epsilon) of five small
simulations: the demo, SecAgg, adaptive central DP, local DP, SCAFFOLD + SecAgg with dropout.

Run it before and after a change that must leave honest simulations bit-identical and compare
the two lines (same machine, same torch):

    PYTHONPATH=src .venv/bin/python scripts/simulation_fingerprint.py
"""
import hashlib
import json

import torch

import consortium

torch.set_num_threads(1)
out = {}
runs = {
  "demo": {"rounds": 5},
  "secagg": {"rounds": 3, "secure_aggregation": {"enabled": True}},
  "central": {"rounds": 3, "privacy": {"mode": "central", "noise_multiplier": 1.0, "clip": 0.5, "adaptive": True}},
  "local": {"rounds": 2, "privacy": {"mode": "local", "noise_multiplier": 1.0, "clip": 1.0}},
  "scaffold_secagg": {"rounds": 2, "algorithm": {"name": "scaffold"}, "secure_aggregation": {"enabled": True}, "simulation": {"dropout": 0.1}, "data": {"dataset": "breast-cancer", "partition": "iid", "clients": 6}},
}
for name, cfg in runs.items():
    cfg = {**cfg, "evaluation": {"baselines": []}}
    r = consortium.simulate(cfg)
    h = hashlib.sha256(r.params.vector.numpy().tobytes()).hexdigest()[:16]
    out[name] = [h, r.summary["final"].get("accuracy"), r.summary["privacy"].get("epsilon")]
print(json.dumps(out))
