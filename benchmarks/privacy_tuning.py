"""Privacy–utility, tuned: clip norm, adaptive clipping and the server optimiser under DP-FedAvg.

The two federations of ``benchmarks/privacy.py`` (same configs, same untuned clip norm), at a
few target epsilons (``privacy.target_epsilon``: the noise multiplier is calibrated for the run's
rounds, delta = 1e-5, RDP). For each federation and epsilon it sweeps

- a fixed clip norm C with the plain server step (FedAvg, ``server.optimizer = "sgd"``) and a
  server learning rate eta: C and eta together set the step (once every update is clipped,
  (C, eta) and (C/k, k*eta) give the same run), so both are swept;
- adaptive clipping (``privacy.adaptive = true``, ``target_quantile = 0.5``, starting from the
  untuned C) with the same server learning rates;
- server momentum (FedAvgM, momentum 0.9) and FedAdam, each with a fixed C or adaptive
  clipping, over a few server learning rates.

Selection and report use different seeds: every grid point runs on the *tuning* seeds
(default 100, 101, 102), the best configuration per federation and epsilon (and the best of
each family) is picked by the mean final accuracy there, and only those are re-run on the
*report* seeds (0, 1, 2, the seeds of ``privacy.py``), next to the untuned baseline, the run
without DP, and the best configuration with negligible noise (z = 0.001: its clipping and
server step alone, so the rest of the gap is the price of the noise). A seed sets the
train/test split, the initial model, client sampling and the DP noise, so the reported numbers
are not the ones the choice was made on; but there is no separate validation set, so the
choice was still made on test accuracy of the same data pool. Nor does epsilon count the
tuning runs themselves, which on real data would spend privacy too.

Run:  python benchmarks/privacy_tuning.py [--out benchmarks/out/privacy_tuning.json]
      python benchmarks/privacy_tuning.py --quick      # a tiny grid, one seed: smoke test
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from privacy import SETUPS, _flatten  # noqa: E402  (the federations of the untuned benchmark)

import consortium  # noqa: E402

EPSILONS = (2.0, 8.0, 40.0)
DELTA = 1e-5
TUNE_SEEDS = (100, 101, 102)
REPORT_SEEDS = (0, 1, 2)

CLIPS = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
SGD_LRS = (0.3, 1.0, 3.0, 10.0)
MOMENTUM_CLIPS = (0.05, 0.2, 1.0)
AVGM_LRS = (0.03, 0.1, 0.3, 1.0)
ADAM_LRS = (0.01, 0.03, 0.1, 0.3)
MOMENTUM = 0.9
TARGET_QUANTILE = 0.5

ADAPTIVE = "adaptive"  # in place of a clip norm
NO_NOISE = 1e-3  # the noise multiplier of the "no noise" reference (the stage needs z > 0)


def grid(base_clip: float, quick: bool = False) -> list[dict]:
    """The configurations swept for one federation and epsilon (see the module docstring)."""
    if quick:
        return [point("sgd", base_clip, 1.0), point("sgd", 0.05, 3.0),
                point("sgd", ADAPTIVE, 1.0, base_clip), point("avgm", 0.05, 0.3),
                point("adam", 0.05, 0.1)]
    out = [point("sgd", c, lr) for c in CLIPS for lr in SGD_LRS]
    out += [point("sgd", ADAPTIVE, lr, base_clip) for lr in SGD_LRS]
    for opt, lrs in (("avgm", AVGM_LRS), ("adam", ADAM_LRS)):
        out += [point(opt, c, lr) for c in MOMENTUM_CLIPS for lr in lrs]
        out += [point(opt, ADAPTIVE, lr, base_clip) for lr in lrs]
    return out


def point(optimizer: str, clip: float | str, lr: float, start_clip: float | None = None) -> dict:
    return {"optimizer": optimizer, "server_lr": lr, "clip": clip,
            "start_clip": start_clip if clip == ADAPTIVE else clip}


def family(p: dict) -> str:
    if p.get("no_dp"):
        return "no DP"
    if p["optimizer"] == "sgd":
        return "adaptive clip, FedAvg" if p["clip"] == ADAPTIVE else "fixed clip, FedAvg"
    return {"avgm": "FedAvgM (momentum 0.9)", "adam": "FedAdam"}[p["optimizer"]]


def label(p: dict) -> str:
    opt = {"sgd": "FedAvg", "avgm": f"FedAvgM β={MOMENTUM:g}", "adam": "FedAdam"}
    if p.get("no_dp"):
        return "no DP"
    clip = (f"adaptive q={TARGET_QUANTILE:g} from C={p['start_clip']:g}" if p["clip"] == ADAPTIVE
            else f"C={p['clip']:g}")
    return f"{clip}, {opt[p['optimizer']]} lr={p['server_lr']:g}"


def run(setup: dict, p: dict, epsilon: float | None, seed: int) -> dict:
    """One simulation at ``epsilon``; a no-DP point runs without DP, and ``epsilon = None``
    with a DP point runs its clipping and server step with negligible noise (z = ``NO_NOISE``)."""
    cfg = {**setup["config"], "seed": seed}
    if not p.get("no_dp"):
        cfg["privacy"] = {
            "mode": "central", "target_epsilon": epsilon or 0.0,
            "noise_multiplier": 0.0 if epsilon else NO_NOISE, "delta": DELTA,
            "clip": p["start_clip"], "adaptive": p["clip"] == ADAPTIVE,
            "target_quantile": TARGET_QUANTILE,
        }
    if "optimizer" in p:
        cfg["server"] = {"optimizer": p["optimizer"], "lr": p["server_lr"], "momentum": MOMENTUM}
    overrides = [f"{k}={json.dumps(v)}" for k, v in _flatten(cfg).items()]
    result = consortium.simulate(None, overrides=overrides)
    priv = result.summary.get("privacy") or {}
    clips = [h["dp_clip"] for h in result.history if "dp_clip" in h]
    return {"accuracy": result.summary["final"]["accuracy"], "epsilon": priv.get("epsilon"),
            "noise_multiplier": priv.get("noise_multiplier"),
            "final_clip": clips[-1] if clips else None}


def evaluate(setup: dict, p: dict, epsilon: float | None, seeds) -> dict:
    runs = [run(setup, p, epsilon, s) for s in seeds]
    accs = [r["accuracy"] for r in runs]
    return {
        **p, "family": family(p), "label": label(p), "seeds": list(seeds), "accuracies": accs,
        "accuracy_mean": statistics.fmean(accs),
        "accuracy_sd": statistics.stdev(accs) if len(accs) > 1 else 0.0,
        "epsilon": runs[0]["epsilon"], "noise_multiplier": runs[0]["noise_multiplier"],
        "final_clip_mean": (statistics.fmean(r["final_clip"] for r in runs)
                            if runs[0]["final_clip"] is not None else None),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(HERE / "out" / "privacy_tuning.json"))
    parser.add_argument("--epsilons", type=float, nargs="+", default=list(EPSILONS))
    parser.add_argument("--tune-seeds", type=int, nargs="+", default=list(TUNE_SEEDS))
    parser.add_argument("--report-seeds", type=int, nargs="+", default=list(REPORT_SEEDS))
    parser.add_argument("--federation", action="append", choices=list(SETUPS),
                        help="only these federations (default: both)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: these tiny models are fastest, and steadiest on a "
                             "shared machine, single-threaded; results are the same)")
    parser.add_argument("--quick", action="store_true", help="a 5-point grid, for a smoke test")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    cells = []
    for name in args.federation or list(SETUPS):
        setup = SETUPS[name]
        base = point("sgd", setup["clip"], 1.0)
        start = time.perf_counter()
        no_dp = evaluate(setup, {"no_dp": True}, None, args.report_seeds)
        print(f"\n{name}: no DP {no_dp['accuracy_mean']:.3f} ± {no_dp['accuracy_sd']:.3f} "
              f"(report seeds {args.report_seeds})", flush=True)
        for eps in args.epsilons:
            tuning = []
            for p in grid(setup["clip"], args.quick):
                tuning.append(evaluate(setup, p, eps, args.tune_seeds))
            tuning.sort(key=lambda r: -r["accuracy_mean"])  # stable: grid order breaks ties
            picks = {"best": tuning[0]}
            for r in tuning:
                picks.setdefault(r["family"], r)
            chosen = [base] + [{k: r[k] for k in ("optimizer", "server_lr", "clip", "start_clip")}
                               for r in picks.values()]
            report = []
            for p in chosen:
                if p not in [{k: q[k] for k in p} for q in report]:
                    report.append(evaluate(setup, p, eps, args.report_seeds))
            key = lambda r: (r["optimizer"], r["server_lr"], r["clip"])
            by_key = {key(r): r for r in report}
            tuned = by_key[key(picks["best"])]
            baseline = by_key[key(base)]
            # the tuned configuration with (almost) no noise: what is left is the cost of noise
            tuned_no_noise = evaluate(setup, chosen[1], None, args.report_seeds)
            cell = {
                "federation": name, "target_epsilon": eps, "delta": DELTA,
                "epsilon": baseline["epsilon"], "noise_multiplier": baseline["noise_multiplier"],
                "no_dp": no_dp, "baseline": baseline, "tuned": tuned,
                "tuned_no_noise": tuned_no_noise,
                "family_best": {f: by_key[key(r)] for f, r in picks.items() if f != "best"},
                "tuning": tuning, "seconds": time.perf_counter() - start,
            }
            cells.append(cell)
            start = time.perf_counter()
            _print_cell(cell, tuning, args.tune_seeds)
    wall = time.perf_counter() - t0
    _print_summary(cells)
    out = {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "wall_seconds": wall, "tune_seeds": args.tune_seeds, "report_seeds": args.report_seeds,
        "grid": {"clips": CLIPS, "sgd_lrs": SGD_LRS, "momentum_clips": MOMENTUM_CLIPS,
                 "avgm_lrs": AVGM_LRS, "adam_lrs": ADAM_LRS, "momentum": MOMENTUM,
                 "target_quantile": TARGET_QUANTILE, "no_noise_multiplier": NO_NOISE,
                 "quick": args.quick},
        "selection": "best mean final accuracy over the tuning seeds; reported on the report seeds",
        "cells": cells,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"\nwall time {wall:.0f} s; wrote {args.out}")


def _print_cell(cell: dict, tuning: list[dict], seeds) -> None:
    print(f"\n  ε = {cell['target_epsilon']:g} (z = {cell['noise_multiplier']:.3g}); "
          f"top of {len(tuning)} on tuning seeds {list(seeds)}:")
    for r in tuning[:5]:
        print(f"    {r['accuracy_mean']:.3f} ± {r['accuracy_sd']:.3f}  {r['label']}")
    print("  on the report seeds:")
    shown = []
    for r in [cell["baseline"], *cell["family_best"].values()]:
        if any(r is q for q in shown):
            continue
        shown.append(r)
        tag = " (untuned)" if r is cell["baseline"] else ""
        tag += " <- best" if r is cell["tuned"] else ""
        print(f"    {r['accuracy_mean']:.3f} ± {r['accuracy_sd']:.3f}  {r['family']:<24} "
              f"{r['label']}{tag}", flush=True)
    r = cell["tuned_no_noise"]
    tag = f"best, noise z={NO_NOISE:g}"
    print(f"    {r['accuracy_mean']:.3f} ± {r['accuracy_sd']:.3f}  {tag:<24} {r['label']}")


def _print_summary(cells: list[dict]) -> None:
    print(f"\n{'federation':<30} {'ε':>4} {'untuned':>14} {'tuned':>14} {'gain':>6} "
          f"{'ratio':>6} {'best, no noise':>16}  best configuration")
    for c in cells:
        b, t, tn = c["baseline"], c["tuned"], c["tuned_no_noise"]
        print(f"{c['federation']:<30} {c['target_epsilon']:>4g} "
              f"{b['accuracy_mean']:>6.3f} ± {b['accuracy_sd']:.3f} "
              f"{t['accuracy_mean']:>6.3f} ± {t['accuracy_sd']:.3f} "
              f"{t['accuracy_mean'] - b['accuracy_mean']:>+6.3f} "
              f"{t['accuracy_mean'] / b['accuracy_mean']:>5.2f}× "
              f"{tn['accuracy_mean']:>8.3f} ± {tn['accuracy_sd']:.3f}  {t['label']}")


if __name__ == "__main__":
    main()
