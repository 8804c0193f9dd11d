"""``executor.device``: the same runs on the CPU and on a CUDA GPU, compared (issue 17).

Run from the repository root, with a CUDA build of torch and the package's dependencies
importable (no install needed; ``dp-accounting`` is needed by the local-DP run only)::

    PYTHONPATH=src python scripts/gpu_check.py              # cpu and cuda, asserts agreement
    PYTHONPATH=src python scripts/gpu_check.py --cpu-only   # the cpu half (no GPU needed)

Each workload runs with the sequential and the vectorised executor, on ``cpu`` and on
``cuda``, from the same seed (the same sampled clients, batch orders and DP noise: all drawn
on the CPU). It prints a table (final accuracy, wall time, time per round) and, when ``OUT``
is set, writes the rows and the environment to ``$OUT/gpu_check.json``.

Checks (the script exits 1 when one fails):
- every cuda run allocated GPU memory (``torch.cuda.max_memory_allocated() > 0``, counted
  from zero for each run), i.e. the models and batches did run on the GPU;
- every cuda run's final accuracy is within ``TOLERANCE`` of the same run's on the CPU, and
  so are the baselines' (local, pooled) where the run has them.

Why a tolerance and not equality: a GPU sums in another order than the CPU (blocked and
parallel reductions in matrix products, convolutions through cuDNN, which by default may use
TF32 for convolutions), so each step's result differs in the last bits, and 20–30 rounds of
SGD carry those differences into the weights. On a convex model (heart disease, logistic
regression) that moves a prediction only for a test example on the decision boundary; on a
non-convex one (digits MLP/CNN) it can move training onto a nearby trajectory. Two
percentage points is 4–5 of heart disease's 231 test rows and 9 of digits' 451: larger than
that is not rounding but a device bug (a batch, a term or the noise that differs), which
changes accuracy by far more. The relative distance between the cpu and cuda final weights is
reported beside it (small for the logistic model, larger for the nets).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

import consortium  # noqa: E402

TOLERANCE = 0.02
"""Largest |accuracy(cuda) − accuracy(cpu)| accepted (a fraction; see the module docstring)."""

DIGITS = {"data.dataset": '"digits"', "data.partition": '"dirichlet"', "data.clients": "20",
          "data.alpha": "1.0", "sampling.clients_per_round": "10", "algorithm.batch_size": "16",
          "algorithm.lr": "0.1", "algorithm.local_epochs": "2", "rounds": "30",
          "evaluation.baselines": '["local", "pooled"]'}
"""Digits (sklearn's 8×8 images, 10 classes) over 20 sites, Dirichlet(1.0) labels, 10 a round:
about 0.92 accuracy for both nets after 30 rounds on the CPU."""

WORKLOADS: dict[str, dict[str, str]] = {
    # the embedded default: heart disease, logistic regression, 4 hospitals, 30 rounds,
    # local and pooled baselines
    "heart-default": {},
    "digits-mlp": {**DIGITS, "model.name": '"mlp"'},
    "digits-cnn": {**DIGITS, "model.name": '"cnn"'},
}

PATHS: dict[str, dict[str, str]] = {
    # short runs through the other code paths that compute on tensors (both executors)
    "heart-localdp": {"rounds": "5", "privacy.mode": '"local"', "privacy.noise_multiplier": "0.5",
                      "privacy.clip": "1.0", "evaluation.baselines": "[]"},
    "heart-fedprox": {"rounds": "5", "algorithm.name": '"fedprox"', "algorithm.mu": "0.1",
                      "algorithm.momentum": "0.9", "evaluation.baselines": "[]"},
    "heart-ditto": {"rounds": "5", "algorithm.name": '"ditto"', "evaluation.baselines": "[]"},
    "heart-apfl": {"rounds": "5", "algorithm.name": '"apfl"', "evaluation.baselines": "[]"},
    "heart-groups": {"rounds": "5", "evaluation.groups": '["sex"]', "evaluation.baselines": "[]",
                     "fairness.method": '"thresholds"', "fairness.column": '"sex"'},
    "digits-fedrep": {**DIGITS, "rounds": "10", "model.name": '"mlp"', "algorithm.name": '"fedrep"',
                      "evaluation.baselines": "[]"},
    "digits-fedbn": {**DIGITS, "rounds": "10", "model.name": '"cnn_bn"', "algorithm.name": '"fedbn"',
                     "evaluation.baselines": "[]"},
    "digits-ifca": {**DIGITS, "rounds": "10", "model.name": '"mlp"', "algorithm.name": '"ifca"',
                    "evaluation.baselines": "[]", "personalization.finetune_steps": "5"},
}


def run_one(name: str, sets: dict[str, str], executor: str, device: str) -> dict[str, Any]:
    overrides = [f"{k}={v}" for k, v in sets.items()]
    overrides += [f'executor.kind="{executor}"', f'executor.device="{device}"']
    gpu = device != "cpu" and torch.cuda.is_available()  # "auto" must pick the GPU there
    if gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    result = consortium.simulate(overrides=overrides, report=False)
    if gpu:
        torch.cuda.synchronize()
    wall = time.perf_counter() - started
    rounds = [float(r["wall_s"]) for r in result.history if r.get("wall_s") is not None]
    final = result.summary.get("final", {})
    row: dict[str, Any] = {
        "workload": name, "executor": executor, "device": device,
        "accuracy": final.get("accuracy"), "loss": final.get("loss"),
        "wall_s": round(wall, 3),
        "round_s": round(sum(rounds) / len(rounds), 4) if rounds else None,
        "rounds": len(result.history),
        "baselines": {k: v.get("accuracy") for k, v in result.summary.get("baselines", {}).items()},
        "personalized": (result.summary.get("personalized") or {}).get("accuracy"),
        "params": result.params.vector.detach().cpu(),
    }
    if gpu:
        row["gpu_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 2)
    return row


def compare(rows: list[dict[str, Any]]) -> list[str]:
    """Failures: cuda runs that used no GPU memory or whose accuracies left the tolerance."""
    failures: list[str] = []
    cpu = {(r["workload"], r["executor"]): r for r in rows if r["device"] == "cpu"}
    for r in rows:
        if r["device"] == "cpu":
            continue
        key = f"{r['workload']}/{r['executor']}/{r['device']}"
        if not r.get("gpu_peak_mb", 0) > 0:
            failures.append(f"{key}: no GPU memory was allocated: the run did not use the GPU")
        ref = cpu.get((r["workload"], r["executor"]))
        if ref is None:
            continue
        pairs = [("accuracy", r["accuracy"], ref["accuracy"]),
                 ("personalized", r["personalized"], ref["personalized"])]
        pairs += [(f"baseline {k}", v, ref["baselines"].get(k)) for k, v in r["baselines"].items()]
        for what, a, b in pairs:
            if a is None and b is None:
                continue
            if a is None or b is None or not abs(a - b) <= TOLERANCE:
                failures.append(f"{key}: {what} {a} vs cpu {b} (tolerance {TOLERANCE})")
        diff = float(torch.linalg.vector_norm(r["params"] - ref["params"]))
        scale = float(torch.linalg.vector_norm(ref["params"])) or 1.0
        r["param_rel_diff"] = diff / scale
    return failures


def table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'workload':<15} {'executor':<11} {'device':<6} {'accuracy':>8} {'baselines':>17} "
            f"{'wall s':>7} {'s/round':>8} {'GPU MB':>7} {'Δw rel':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        base = " ".join(f"{k[0]}={v:.3f}" for k, v in r["baselines"].items() if v is not None)
        acc = f"{r['accuracy']:.4f}" if r["accuracy"] is not None else "-"
        gpu = f"{r['gpu_peak_mb']:.1f}" if "gpu_peak_mb" in r else "-"
        rel = f"{r['param_rel_diff']:.1e}" if "param_rel_diff" in r else "-"
        per = f"{r['round_s']:.4f}" if r["round_s"] is not None else "-"
        lines.append(f"{r['workload']:<15} {r['executor']:<11} {r['device']:<6} {acc:>8} "
                     f"{base:>17} {r['wall_s']:>7.2f} {per:>8} {gpu:>7} {rel:>8}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu-only", action="store_true", help="run the cpu half only")
    parser.add_argument("--quick", action="store_true",
                        help="heart-default and the short path runs only (a smoke test)")
    args = parser.parse_args(argv)
    devices = ["cpu"] if args.cpu_only else ["cpu", "cuda"]
    if "cuda" in devices and not torch.cuda.is_available():
        print(f"torch {torch.__version__} sees no CUDA GPU; run with --cpu-only",
              file=sys.stderr)
        return 2
    env = {
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpu_threads": torch.get_num_threads(),
        "tolerance": TOLERANCE,
    }
    try:  # what the GPU's float32 matmuls and convolutions may round to (TF32)
        env["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
        env["matmul_allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
    except Exception:  # a torch that dropped the flags
        pass
    print(json.dumps(env), flush=True)
    plan = [(n, s, e) for n, s in WORKLOADS.items() for e in ("sequential", "vectorized")]
    plan += [(n, s, e) for n, s in PATHS.items() for e in ("sequential", "vectorized")]
    if args.quick:
        plan = [p for p in plan if p[0] == "heart-default" or p[0] in PATHS]
    rows: list[dict[str, Any]] = []
    errors: list[str] = []
    started = time.perf_counter()
    for name, sets, executor in plan:
        # once, "auto" on the GPU machine: it must pick the GPU (checked like "cuda")
        auto = ["auto"] if "cuda" in devices and (name, executor) == ("heart-default",
                                                                        "vectorized") else []
        for device in devices + auto:
            try:
                row = run_one(name, sets, executor, device)
            except Exception as exc:  # report every run, then fail
                errors.append(f"{name}/{executor}/{device}: {type(exc).__name__}: {exc}")
                print(f"FAILED {errors[-1]}", flush=True)
                continue
            rows.append(row)
            print(f"{name:<15} {executor:<11} {device:<5} acc={row['accuracy']} "
                  f"wall={row['wall_s']}s", flush=True)
    failures = errors + compare(rows)
    print()
    print(table(rows))
    total = time.perf_counter() - started
    print(f"\ntotal {total:.1f} s; {len(rows)} runs; "
          + ("all checks passed" if not failures else f"{len(failures)} FAILED:"))
    for f in failures:
        print(f"  - {f}")
    out = os.environ.get("OUT")
    if out:
        clean = [{k: v for k, v in r.items() if k != "params"} for r in rows]
        payload = {"env": env, "rows": clean, "failures": failures, "total_s": total,
                   "devices": devices}
        Path(out, "gpu_check.json").write_text(json.dumps(payload, indent=2, default=_plain))
        print(f"wrote {Path(out, 'gpu_check.json')}")
    return 1 if failures else 0


def _plain(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return str(obj)


if __name__ == "__main__":
    sys.exit(main())
