"""Contribution scores (issue 19): constructed cases with a known ranking.

Part ``hospitals``: the four heart-disease hospitals plus ``shuffled`` (a copy of Budapest's
training rows with their labels permuted) and ``twin`` (a copy of Cleveland's training rows);
the two extra sites hold no test rows, so the utility (``validation = "sites"``) is measured
on the four hospitals' test splits. The run records its updates once; exact Shapley, GTG,
TMC and leave-one-out then score the same recorded rounds (``consortium contribution``'s
path), so the comparison is of the estimators alone.

Part ``flip``: 100 synthetic clients, all in every round, 10 of them flipping their labels
(``attack.kind = "label-flip"``); GTG-Shapley and TMC scores, and how many attackers are in
the bottom 15.

Part ``retrain``: leave-one-out by n + 1 federations on the six-site case, with and without
secure aggregation.

    OMP_NUM_THREADS=1 python benchmarks/contribution.py [--part hospitals|ten|flip|retrain|all]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from scipy.stats import spearmanr

from consortium.config import ExperimentConfig, default_config_dict
from consortium.contribution.cli import contribution_of_run
from consortium.data.base import ClientData, FederatedDataset, Split
from consortium.simulation import simulate


def hospitals_plus_two(seed: int = 0, *, halves: bool = False) -> FederatedDataset:
    """The four hospitals, a label-shuffled copy of Budapest and a duplicate of Cleveland;
    ``halves``: each hospital split in two sites at random (10 sites in all; the twin
    duplicates ``cleveland_a``)."""
    from consortium.data import load_dataset

    cfg = ExperimentConfig.from_dict(default_config_dict())
    ds = load_dataset(cfg.data, seed=seed)
    clients = {cid: ds.clients[cid] for cid in ds.client_ids}
    hung, clev = clients["hungarian"], clients["cleveland"]
    g = torch.Generator().manual_seed(seed)
    empty = Split(hung.test.x[:0], hung.test.y[:0])
    if halves:
        def half(s: Split, k: int) -> Split:  # a seeded random half (the files are sorted)
            order = torch.randperm(len(s), generator=torch.Generator().manual_seed(seed + 1))
            rows = order[: len(s) // 2] if k == 0 else order[len(s) // 2:]
            return Split(s.x[rows], s.y[rows])

        clients = {f"{cid}_{'ab'[k]}": ClientData(train=half(clients[cid].train, k),
                                                  test=half(clients[cid].test, k))
                   for cid in ds.client_ids for k in (0, 1)}
        clev = clients["cleveland_a"]
    clients["shuffled"] = ClientData(
        train=Split(hung.train.x.clone(), hung.train.y[torch.randperm(len(hung.train), generator=g)]),
        test=empty)
    clients["twin"] = ClientData(train=Split(clev.train.x.clone(), clev.train.y.clone()), test=empty)
    return FederatedDataset(name="heart-disease+2", clients=clients, num_classes=ds.num_classes,
                            input_shape=ds.input_shape, feature_names=ds.feature_names)


def _compare(run: Path, data: FederatedDataset, methods: dict[str, dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, kw in methods.items():
        t = time.perf_counter()
        r = contribution_of_run(run, dataset=data, **kw)
        r["wall_s"] = time.perf_counter() - t
        out[name] = r
    exact = out["exact"]["scores"]
    sites = sorted(exact)
    for name, r in out.items():
        rho = spearmanr([exact[s] for s in sites], [r["scores"][s] for s in sites]).statistic
        r["spearman_vs_exact"] = float(rho)
        r["max_abs_error"] = max(abs(r["scores"][s] - exact[s]) for s in sites)
    return out


def part_hospitals(rounds: int, utility: str, *, halves: bool = False) -> dict[str, Any]:
    run = Path(tempfile.mkdtemp()) / "run"
    data = hospitals_plus_two(halves=halves)
    simulate(overrides=[f"rounds={rounds}", f"sampling.clients_per_round={len(data.clients)}",
                        "contribution.method=exact-shapley", "contribution.record=true",
                        f"contribution.utility={utility}"],
             dataset=data, out=run, report=False)
    return _compare(run, data, {
        "exact": {"method": "exact-shapley"},
        "gtg": {"method": "gtg-shapley"},
        "gtg+": {"method": "gtg-shapley", "permutations": 200, "convergence": 0.01},
        "gtg-t": {"method": "gtg-shapley", "truncation": 0.005, "between": 0.001},
        "tmc": {"method": "tmc-shapley", "permutations": 20},
        "tmc+": {"method": "tmc-shapley", "permutations": 60},
        "loo": {"method": "leave-one-out"},
    })


def part_flip(rounds: int, method: str, permutations: int, data: str = "digits",
              utility: str = "loss") -> dict[str, Any]:
    over = [f"rounds={rounds}", f"data.dataset={data}", "data.clients=100",
            "data.partition=iid" if data != "synthetic" else "data.partition=natural",
            "sampling.clients_per_round=100", 'evaluation.baselines=["local"]',
            "attack.kind=label-flip", "attack.fraction=0.1", f"contribution.method={method}",
            f"contribution.permutations={permutations}", f"contribution.utility={utility}"]
    t = time.perf_counter()
    res = simulate(overrides=over, report=False)
    c = res.summary["contribution"]
    bad = set(res.summary["attack"]["malicious"])
    bottom = c["ranking"][-15:]
    return {"method": method, "data": data, "utility": utility, "wall_s": time.perf_counter() - t, "attackers": sorted(bad),
            "attackers_in_bottom_15": len(bad & set(bottom)), "bottom_15": bottom,
            "flagged": c["flagged"], "attackers_flagged": len(bad & set(c["flagged"])),
            "honest_flagged": len(set(c["flagged"]) - bad),
            "indistinguishable": len(c.get("indistinguishable", ())),
            "attacker_scores": {a: [c["scores"][a], c["standard_error"][a]] for a in sorted(bad)},
            "honest_flagged_scores": {a: [c["scores"][a], c["standard_error"][a]]
                                      for a in sorted(set(c["flagged"]) - bad)},
            "share": max(c["total"], 0.0) / len(c["scores"]),
            "evaluations": c["evaluations"], "seconds": c["seconds"],
            "final_accuracy": res.summary["final"]["accuracy"]}


def part_retrain(rounds: int) -> dict[str, Any]:
    """Leave-one-out by n + 1 federations on the six-site case, with and without SecAgg."""
    from consortium.config import load_config
    from consortium.contribution.retrain import leave_one_out_by_runs

    out = {}
    for sa in ("false", "true"):
        cfg = load_config(None, [f"rounds={rounds}", "sampling.clients_per_round=6",
                                 "evaluation.baselines=[]", f"secure_aggregation.enabled={sa}"])
        t = time.perf_counter()
        r = leave_one_out_by_runs(cfg, dataset=hospitals_plus_two())
        out[f"secagg={sa}"] = {"scores": r["scores"], "flagged": r["flagged"],
                               "wall_s": time.perf_counter() - t}
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--part", choices=("hospitals", "ten", "flip", "retrain", "all"), default="all")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--utility", choices=("accuracy", "loss"), default="loss")
    p.add_argument("--flip-method", default="gtg-shapley")
    p.add_argument("--permutations", type=int, default=30)
    p.add_argument("--flip-data", default="digits", help="digits (iid) or synthetic")
    a = p.parse_args()
    for part in ("hospitals", "ten"):
        if a.part not in (part, "all"):
            continue
        out = part_hospitals(a.rounds, a.utility, halves=part == "ten")
        print(f"{part}: hospitals{' (halved)' if part == 'ten' else ''} + shuffled + twin, "
              f"{a.rounds} rounds, utility {a.utility}")
        print(f"{'site':<12}" + "".join(f"{m:>10}" for m in out))
        for s in out["exact"]["ranking"]:
            print(f"{s:<12}" + "".join(f"{out[m]['scores'][s]:>+10.4f}" for m in out))
        for m, r in out.items():
            print(f"{m:<6} spearman {r['spearman_vs_exact']:.3f}  max |err| {r['max_abs_error']:.4f}"
                  f"  evaluations {r['evaluations']}  scoring {r['seconds']:.2f} s"
                  f"  flagged {r['flagged']}")
    if a.part in ("retrain", "all"):
        print(json.dumps(part_retrain(a.rounds), indent=1))
    if a.part in ("flip", "all"):
        r = part_flip(a.rounds, a.flip_method, a.permutations, a.flip_data, a.utility)
        print(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
