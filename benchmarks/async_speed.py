"""Simulation speed of the asynchronous mode against synchronous rounds, same client updates.

Issue 18's target: FedBuff on the vectorised executor at N = 10,000 within 2x of the
synchronous mode's wall time for the same number of client updates. Workload W1 (logistic
regression on FedProx Synthetic(1, 1), batch 10, lr 0.01, one local epoch) on issue 18's
trace (30 % of the clients 10x slower, online half the time: ``benchmarks/clock.py``), the
vectorised executor, evaluation only after the last step (every client, in both modes):

- ``sync``: ``--rounds`` rounds of ``--per-round`` clients (no deadline: wait for all);
- ``fedbuff``: ``--rounds`` server steps of ``--buffer`` updates (default ``--per-round``,
  so the same updates), ``--concurrency`` clients in flight (default 2x ``--per-round``).

On the trace a client's time grows with its examples, so FedBuff's updates come more often
from the small (fast) clients and cost less to train; ``--local-steps 10`` makes every
update the same work (and every client equally fast but the slow 30 %), the like-for-like
comparison. The table gives each mode's wall time (the whole ``simulate`` call, and the steps' own
``wall_s`` without the final evaluation), the updates aggregated and the ratio.

Run:  OMP_NUM_THREADS=1 python benchmarks/async_speed.py [--n 10000] [--rounds 20]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def config(args: argparse.Namespace, mode: str) -> dict[str, Any]:
    server: dict[str, Any] = {"mode": mode}
    if mode == "fedbuff":
        server.update(buffer_size=args.buffer or args.per_round,
                      concurrency=args.concurrency or 2 * args.per_round)
    return {
        "seed": args.seed, "rounds": args.rounds,
        "data": {"dataset": "synthetic", "clients": args.n, "alpha": 1.0, "beta": 1.0},
        "model": {"name": "logistic"},
        "algorithm": {"lr": 0.01, "batch_size": 10, "local_epochs": 1,
                      "local_steps": args.local_steps},
        "sampling": {"clients_per_round": args.per_round},
        "simulation": {"availability": "diurnal", "duty": 0.5, "period_s": 3600.0,
                       "slow_fraction": 0.3, "slow_factor": 10.0},
        "server": server,
        "evaluation": {"baselines": [], "every": args.rounds + 1, "include_offline": True},
        "executor": {"kind": "vectorized", "device": args.device},
    }


def run(args: argparse.Namespace, mode: str) -> dict[str, Any]:
    import consortium

    start = time.perf_counter()
    result = consortium.simulate(config(args, mode), report=False)
    wall = time.perf_counter() - start
    h = result.history
    # the last record's wall_s holds the final evaluation (every client): left out here
    steps = sum(float(r["wall_s"]) for r in h[:-1])
    return {"mode": mode, "wall_s": wall, "steps_wall_s": steps, "rounds": len(h),
            "updates": sum(int(r["clients"]) for r in h), "sim_time_s": h[-1]["sim_time_s"],
            "accuracy": h[-1].get("accuracy")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--per-round", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--buffer", type=int, default=0)
    parser.add_argument("--concurrency", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--local-steps", type=int, default=0,
                        help="a fixed number of local steps (0: one epoch); fixed steps make "
                        "every update the same work, so both modes train the same amount")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=str(HERE / "results" / "async_speed.json"))
    args = parser.parse_args()
    rows = [run(args, mode) for mode in ("sync", "fedbuff")]
    sync = rows[0]
    print(f"W1 N={args.n}, vectorised, {args.rounds} steps; sync {args.per_round} a round, "
          f"fedbuff K={args.buffer or args.per_round}, "
          f"concurrency {args.concurrency or 2 * args.per_round}")
    print("| mode | updates | wall (s) | ratio | steps' wall without the final evaluation (s) "
          "| ratio | simulated s | accuracy |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['updates']} | {r['wall_s']:.1f} | "
              f"{r['wall_s'] / sync['wall_s']:.2f} | {r['steps_wall_s']:.1f} | "
              f"{r['steps_wall_s'] / max(sync['steps_wall_s'], 1e-9):.2f} | "
              f"{r['sim_time_s']:.0f} | {r['accuracy']:.3f} |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
