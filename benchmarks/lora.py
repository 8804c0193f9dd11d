"""Issue 17 acceptance, LoRA federation: minilm-lora (frozen all-MiniLM-L6-v2 + LoRA r=8 on
query/value + linear head) on the triage notes (4 sites), FedAvg against local-only and pooled.

Records per seed: accuracy (federated, local-only, pooled), bytes per client per round against
the full model's float32 size, the frozen base's SHA-256 before and after the run (every
site's model shares the one base in memory), and the vectorised executor's answer (it falls
back to sequential, saying why; the results are compared).

Prints one JSON line per run and writes benchmarks/results/lora.json.

Run:  OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 PYTHONPATH=src python benchmarks/lora.py [--seeds 0 1 2]
"""
import argparse
import contextlib
import io
import json
import os
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import consortium
from consortium.models.peft import base_hash, load_base
from consortium.types import Parameters

torch.set_num_threads(1)

CONFIG = {
    "name": "triage-lora", "rounds": 10,
    "data": {"dataset": "triage", "samples_per_client": 120, "test_fraction": 0.25},
    "model": {"name": "minilm-lora", "peft": {"r": 8, "alpha": 16, "target": ["query", "value"]}},
    "algorithm": {"name": "fedavg", "local_epochs": 1, "batch_size": 16, "lr": 0.1},
    "sampling": {"clients_per_round": 4},
    "evaluation": {"baselines": ["local", "pooled"]},
    "executor": {"kind": "sequential"},
}
parser = argparse.ArgumentParser()
parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
parser.add_argument("--rounds", type=int, default=CONFIG["rounds"])
args = parser.parse_args()

base = load_base()
out = []
for seed in args.seeds:
    cfg = {**CONFIG, "seed": seed, "rounds": args.rounds}
    t = time.time()
    r = consortium.simulate(cfg, report=False)
    wall = time.time() - t
    trainable = Parameters.from_module(r.model).layout.size
    frozen = sum(b.numel() for b in r.model.buffers() if b.is_floating_point())
    per_client = [row["bytes_up"] / row["clients"] for row in r.history]
    s = r.summary
    row = {
        "seed": seed, "rounds": args.rounds, "wall_s": round(wall, 1),
        "federated": s["final"]["accuracy"], "local": s["baselines"]["local"]["accuracy"],
        "pooled": s["baselines"]["pooled"]["accuracy"],
        "balanced": {"federated": s["final"]["balanced_accuracy"],
                     "local": s["baselines"]["local"]["balanced_accuracy"],
                     "pooled": s["baselines"]["pooled"]["balanced_accuracy"]},
        "trainable_params": trainable, "frozen_params": frozen,
        "bytes_up_per_client_round": per_client[0],
        "bytes_down_per_client_round": r.history[0]["bytes_down"] / r.history[0]["clients"],
        "full_model_bytes": (trainable + frozen) * 4,
        "ratio": per_client[0] / ((trainable + frozen) * 4),
        "base_sha256": base.sha256,
        "base_unchanged": r.model.base_hash() == base.sha256 == base_hash(base.encoder),
    }
    if seed == args.seeds[0]:  # the vectorised executor: its notice, and the same result?
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            v = consortium.simulate({**cfg, "rounds": 1, "executor": {"kind": "vectorized"},
                                     "evaluation": {"baselines": []}}, report=False)
        q = consortium.simulate({**cfg, "rounds": 1, "evaluation": {"baselines": []}},
                                report=False)
        row["vectorized_notice"] = err.getvalue().strip()
        row["vectorized_equals_sequential"] = bool(torch.equal(v.params.vector, q.params.vector))
    out.append(row)
    print(json.dumps(row), flush=True)
Path(__file__).with_name("results").mkdir(exist_ok=True)
Path(__file__).with_name("results").joinpath("lora.json").write_text(json.dumps(out, indent=1))
