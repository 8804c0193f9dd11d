"""Issue 19 (part B) measurement: what the heart-disease demo's federated model relies on.

Runs the default experiment (`consortium run`: four hospitals, logistic, FedAvg, 30 rounds)
with every part of ``[interpret]`` on, for each seed, and prints per seed the top 5 features
by federated permutation importance (loss increase), by mean |SHAP| and by the largest
absolute logistic coefficient of the feature's columns, the ECE per site and overall, the
features flagged as used differently across sites, and the time each part took. The UCI
literature's strong predictors of coronary disease here are thal, ca, cp, oldpeak, exang (and
thalach, slope, sex): the share of each top 5 among those is printed as ``known``.

Writes benchmarks/results/interpret.json.

Run:  OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/interpret.py [--seeds 0 1 2]
      [--repeats 20] [--sample 50]
"""
import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from consortium.config import load_config
from consortium.interpret import interpret_model
from consortium.simulation import simulate

torch.set_num_threads(1)
KNOWN = {"thal", "ca", "cp", "oldpeak", "exang", "thalach", "slope", "sex"}

parser = argparse.ArgumentParser()
parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
parser.add_argument("--repeats", type=int, default=20)
parser.add_argument("--sample", type=int, default=50)
parser.add_argument("--out", default="benchmarks/results/interpret.json")
args = parser.parse_args()

rows = []
for seed in args.seeds:
    cfg = load_config(None, [f"seed={seed}", "evaluation.baselines=[]"])
    assembled: list = []  # the federation, for its data set (each site's own splits)
    run = simulate(cfg, report=False, on_assembled=assembled.append)
    base = dataclasses.replace(cfg.interpret, repeats=args.repeats, sample=args.sample)
    parts: dict = {}
    seconds: dict = {}
    for name, change in (("permutation", {"importance": "permutation"}), ("shap", {"shap": True}),
                         ("coefficients", {"coefficients": True}),
                         ("calibration", {"calibration": True})):
        started = time.perf_counter()
        out = interpret_model(dataclasses.replace(base, **change), run.model,
                              assembled[-1].dataset, seed=seed)
        seconds[name] = time.perf_counter() - started
        parts[name] = out[name]
    perm, shap, coef, cal = (parts[k] for k in ("permutation", "shap", "coefficients",
                                                 "calibration"))
    top = {"permutation": perm["ranking"][:5], "shap": shap["ranking"][:5],
           "coefficients": coef["ranking"][:5]}
    row = {
        "seed": seed, "accuracy": run.summary["final"]["accuracy"], "top5": top,
        "known": {k: sum(f in KNOWN for f in v) for k, v in top.items()},
        "permutation_loss": {f: perm["loss"][f] for f in perm["ranking"]},
        "permutation_accuracy": {f: perm["accuracy"][f] for f in perm["ranking"]},
        "shap_mean_abs": {f: shap["mean_abs"][f] for f in shap["ranking"]},
        "coefficients": coef["columns"], "coefficient_by_feature": coef["by_feature"],
        "ece": {"overall": cal["overall"]["ece"],
                **{s: b["ece"] for s, b in cal["sites"].items()}},
        "flagged": {"permutation": [x["feature"] for x in perm["differences"]["flagged"]],
                    "shap": [x["feature"] for x in shap["differences"]["flagged"]]},
        "seconds": seconds,
    }
    rows.append(row)
    print(json.dumps({k: row[k] for k in ("seed", "accuracy", "top5", "known", "ece", "flagged",
                                          "seconds")}))
Path(args.out).parent.mkdir(parents=True, exist_ok=True)
Path(args.out).write_text(json.dumps({"repeats": args.repeats, "sample": args.sample,
                                      "runs": rows}, indent=2))
