"""Personalised state at 10,000 clients (issue 16): FedRep and FedPer beside FedAvg on W1.

W1 is the simulation benchmark's first workload (benchmarks/simulation.py): FedProx
Synthetic(1, 1), 60 features, 10 classes, per-client sizes ``max(10, LogNormal(ln 50 − ½, 1))``
(mean ≈ 50), 80/20 train/test per client, seed 0; 10 % of the clients a round, 1 local epoch,
batch 10, SGD lr 0.01, 20 rounds. Here the model is an ``mlp`` (one hidden layer of 64) whose
head, the final layer (64 × 10 + 10 = 650 values), is personal under FedPer and FedRep
(Arivazhagan et al. 2019; Collins et al., ICML 2021): each client's state holds only its head.

Each method runs in a fresh subprocess (so peak RSS and start-up are its own) that builds the
data, assembles the federation as ``consortium.simulate`` does, runs the rounds and reports:
the whole process's wall time (measured by the parent), the rounds' time (training; the final
evaluation of every client, personalised for FedPer/FedRep, timed apart), peak RSS (VmHWM of
the child), and the client-state store: how many clients hold state, its bytes, and the bytes
per client against the head's (or, for Ditto/APFL, the full model's) size.

Prints a table and writes benchmarks/results/personal_scale.json.

Run:  OMP_NUM_THREADS=1 python benchmarks/personal_scale.py [--n 10000] [--rounds 20]
          [--methods fedavg fedper fedrep ditto apfl]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "results" / "personal_scale.json"


def peak_rss_mb() -> float:
    """This process's VmHWM (not ru_maxrss, which Linux carries over from the parent)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def rss_mb() -> float:
    """This process's resident memory now (VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def worker(method: str, n: int, rounds: int) -> dict[str, Any]:
    """One whole run of ``method`` on W1 with ``n`` clients, in this process."""
    sys.path.insert(0, str(ROOT / "src"))
    import numpy as np
    import torch

    from consortium.config import ExperimentConfig
    from consortium.data.synthetic import load_synthetic
    from consortium.federation import Given, assemble

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)  # W1's sizes, exactly as benchmarks/simulation.py draws them
    sizes = np.maximum(10, rng.lognormal(math.log(50) - 0.5, 1.0, n).astype(int))
    dataset = load_synthetic(alpha=1.0, beta=1.0, num_clients=n, seed=0, sizes=sizes.tolist(),
                             test_fraction=0.2)
    cfg = ExperimentConfig.from_dict({
        "name": f"personal-scale-{method}", "seed": 0, "rounds": rounds,
        "model": {"name": "mlp", "hidden": [64]},
        "algorithm": {"name": method, "local_epochs": 1, "batch_size": 10, "lr": 0.01},
        "personalization": {"local_count": 1} if method in ("fedper", "fedrep") else {},
        "sampling": {"clients_per_round": max(1, math.ceil(0.1 * n))},
        "evaluation": {"every": rounds},
    })
    fed = assemble(cfg, Given(dataset=dataset))
    evaluator, timer = fed.server.evaluator, {"eval": 0.0}
    evaluate = evaluator.evaluate

    def timed(*args: Any, **kwargs: Any) -> Any:
        """The final evaluation (global and personalised, every client), timed apart."""
        start = time.perf_counter()
        try:
            return evaluate(*args, **kwargs)
        finally:
            timer["eval"] += time.perf_counter() - start

    evaluator.evaluate = timed  # type: ignore[method-assign]
    rss_before, peak_before = rss_mb(), peak_rss_mb()
    # Reset VmHWM (Linux: "5" to clear_refs), so the rounds' own peak is measured apart from
    # the data generation's, which is the same for every method.
    Path("/proc/self/clear_refs").write_text("5")
    start = time.perf_counter()
    state = fed.server.run(fed.server.init_state(fed.init), rounds=rounds)
    run_s = time.perf_counter() - start
    fed.executor.close()
    rss_after = rss_mb()
    flat = fed.store.to_flat()
    names = sorted({key.split("\x1f", 1)[1] for key in flat})
    store_bytes = sum(t.numel() * t.element_size() for t in flat.values())
    holders = len(fed.store)
    model_values = sum(p.numel() for p in fed.factory().parameters())
    mask = getattr(fed.algorithm, "personal_mask", None)
    head_values = int(mask(fed.init.layout).sum()) if mask is not None else 0
    metrics = state.last_metrics
    return {
        "method": method, "clients": n, "rounds": rounds,
        "clients_per_round": cfg.sampling.clients_per_round,
        "executor": fed.executor.name,
        "train_s": run_s - timer["eval"], "eval_s": timer["eval"],
        "per_round_s": (run_s - timer["eval"]) / rounds,
        "round_wall_s": [round(float(r["wall_s"]), 3) for r in fed.history],
        "peak_rss_mb": max(peak_before, peak_rss_mb()),
        "peak_rss_before_rounds_mb": peak_before, "peak_rss_rounds_mb": peak_rss_mb(),
        "rss_before_rounds_mb": rss_before, "rss_after_rounds_mb": rss_after,
        "store_clients": holders, "store_bytes": store_bytes, "store_keys": names,
        "store_bytes_per_client": store_bytes / holders if holders else 0.0,
        "model_values": model_values, "head_values": head_values,
        "accuracy": metrics.get("accuracy"),
        "personalized_accuracy": metrics.get("personalized_accuracy"),
    }


def run_method(method: str, n: int, rounds: int) -> dict[str, Any]:
    """``method`` in a fresh interpreter; its JSON line plus the whole process's wall time."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", method, "--n", str(n), "--rounds", str(rounds)],
        capture_output=True, text=True, env=env, check=False,
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        return {"method": method, "clients": n, "error": proc.stderr.strip().splitlines()[-1:]}
    row: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    row["whole_process_s"] = wall
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--methods", nargs="+", default=["fedavg", "fedper", "fedrep"])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.n, args.rounds)), flush=True)
        return
    rows = [run_method(m, args.n, args.rounds) for m in args.methods]
    args.out.parent.mkdir(exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))
    print("| method | N | rounds | whole process s | training s | s / round | final eval s "
          "| peak RSS MB | peak RSS in the rounds MB | clients with state | store MB "
          "| store bytes / client |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['method']} | {r['clients']:,} | failed: {r['error']} |")
            continue
        print(f"| {r['method']} | {r['clients']:,} | {r['rounds']} | {r['whole_process_s']:.1f} | "
              f"{r['train_s']:.2f} | {r['per_round_s']:.3f} | {r['eval_s']:.2f} | "
              f"{r['peak_rss_mb']:.0f} | {r['peak_rss_rounds_mb']:.0f} | {r['store_clients']:,} | "
              f"{r['store_bytes'] / 1e6:.2f} | "
              f"{r['store_bytes_per_client']:,.0f} |")


if __name__ == "__main__":
    main()
