"""Fine-tuning with a frozen body: equal results in every executor, and what freezing saves.

An MLP (64 → 256 → 256 → 10) on digits across 50 clients; the body (the two hidden layers)
frozen with ``model.freeze = ["1", "3"]``, or everything trained. For the sequential and the
vectorised executor, with and without local DP-SGD: whole-run time, the largest distance of the
final model from the sequential one's, and how far the frozen body moved (must be 0).

Run:  PYTHONPATH=src python benchmarks/frozen.py [--rounds 10] [--out benchmarks/results/frozen.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

import consortium  # noqa: E402
from consortium.executors import SequentialExecutor, VectorizedExecutor  # noqa: E402
from consortium.models.zoo import mlp  # noqa: E402
from consortium.seeds import derive_seed  # noqa: E402

BODY = ("1.weight", "1.bias", "3.weight", "3.bias")
HIDDEN = [256, 256]


def config(rounds: int, *, frozen: bool, private: bool) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "rounds": rounds,
        "seed": 0,
        "data": {"dataset": "digits", "partition": "iid", "clients": 50},
        "model": {"name": "mlp", "hidden": HIDDEN, "freeze": ["1", "3"] if frozen else []},
        "algorithm": {"name": "fedavg", "lr": 0.05, "batch_size": 16, "momentum": 0.9},
        "sampling": {"clients_per_round": 50},
        "evaluation": {"every": rounds, "baselines": []},
    }
    if private:
        cfg["privacy"] = {"mode": "local", "clip": 1.0, "noise_multiplier": 1.0}
    return cfg


def initial_body() -> dict[str, torch.Tensor]:
    torch.manual_seed(derive_seed(0, "init") % (2**31))  # as simulate seeds its model
    module = mlp((64,), 10, hidden=HIDDEN)  # digits: 8×8 images, flattened by the mlp
    return {n: p.detach() for n, p in module.named_parameters() if n in BODY}


def run(rounds: int, *, frozen: bool, private: bool, executor: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    result = consortium.simulate(config(rounds, frozen=frozen, private=private), executor=executor)
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "frozen.json")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a shared machine: one thread, no OpenMP spin-waits
    rows = []
    print(f"{'local DP':>8} {'body':>7} {'sequential s':>12} {'vectorised s':>12} "
          f"{'max |seq-vec|':>13} {'body moved':>10}")
    for private in (False, True):
        for frozen in (False, True):
            t_seq, a = run(args.rounds, frozen=frozen, private=private, executor=SequentialExecutor())
            t_vec, b = run(args.rounds, frozen=frozen, private=private, executor=VectorizedExecutor())
            gap = float((a.params.vector - b.params.vector).abs().max())
            init = initial_body()
            moved = max(
                max(float((r.params.tensors()[n] - init[n]).abs().max()) for n in BODY)
                for r in (a, b)
            )
            row = {"local_dp": private, "frozen": frozen, "sequential_s": t_seq,
                   "vectorized_s": t_vec, "max_abs_gap": gap, "body_moved": moved,
                   "rounds": args.rounds, "clients_per_round": 50, "hidden": HIDDEN}
            rows.append(row)
            print(f"{str(private):>8} {'frozen' if frozen else 'trained':>7} {t_seq:12.2f} "
                  f"{t_vec:12.2f} {gap:13.2e} {moved if frozen else float('nan'):10.3g}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
