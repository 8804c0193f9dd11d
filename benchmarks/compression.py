"""Uplink compression: final accuracy against the bytes the clients sent, for every method.

Workloads (issue 17), each run once per method with the same seed, data and initial model:

- digits-cnn: ``cnn`` on ``digits``, Dirichlet(0.3) over 100 clients, 10 a round, 1 local
  epoch, batch 16, SGD lr 0.05, ``--rounds`` rounds (default 300);
- w1: logistic regression on FedProx Synthetic(1, 1), 100 clients, 10 a round, batch 10,
  lr 0.01, ``--rounds`` rounds.

``bytes_up`` is what the run's metrics.jsonl records: the encoded updates' exact sizes
(:attr:`consortium.compression.Encoded.nbytes`), summed over rounds; the ratio is float32's
bytes over the method's. The "down …" rows compress the broadcast model instead (EF21-P,
:mod:`consortium.compression.downlink`); ``bytes_down`` counts what each sampled client needs
to catch up (its missed messages, or the whole float32 model when that is fewer bytes), and
``down_ratio`` is float32's over the method's; the "… per-client" rows keep one reference
``x̂ᵢ`` per client at the server (``compression.downlink_reference = "per_client"``): one
message a task after the first contact. The two "all 100 a round" rows sample every
client every round (compare them with each other, not with the 10-a-round base). Accuracy is the global model's on every client's test split.

Run:  OMP_NUM_THREADS=1 python benchmarks/compression.py [--rounds 300] [--workloads digits-cnn,w1]
      [--methods "float32 (none),top-2 % + EF compact"] [--server avgm] [--seed 0]

The first method of ``--methods`` is the reference of the ratio and the loss (float32 with the
same ``--server`` optimiser). "compact" rows send top-k with fp16 values and Golomb–Rice coded
index gaps (``compression.values = "fp16"``, ``compression.indices = "rice"``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

METHODS: dict[str, dict[str, Any]] = {
    "float32 (none)": {"uplink": "none"},
    "fp16": {"uplink": "fp16"},
    "bf16": {"uplink": "bf16"},
    "int8": {"uplink": "int8"},
    "int4": {"uplink": "int4"},
    "int2": {"uplink": "int2"},
    "qsgd 2-bit": {"uplink": "qsgd", "bits": 2},
    "qsgd 1-bit + EF": {"uplink": "qsgd", "bits": 1, "error_feedback": True},
    "int2 + EF": {"uplink": "int2", "error_feedback": True},
    "sign (majority vote)": {"uplink": "sign", "sign_lr": 0.002},
    "top-10 % + EF": {"uplink": "topk", "fraction": 0.1, "error_feedback": True},
    "top-3 % + EF": {"uplink": "topk", "fraction": 0.03, "error_feedback": True},
    "top-1 % + EF": {"uplink": "topk", "fraction": 0.01, "error_feedback": True},
    "top-1.5 % + EF": {"uplink": "topk", "fraction": 0.015, "error_feedback": True},
    "top-2 % + EF": {"uplink": "topk", "fraction": 0.02, "error_feedback": True},
    "top-4 % + EF": {"uplink": "topk", "fraction": 0.04, "error_feedback": True},
    "top-1 % without EF": {"uplink": "topk", "fraction": 0.01},
    # compact top-k: fp16 values and Golomb–Rice coded index gaps (kind "sparse")
    **{f"top-{p} % + EF compact": {"uplink": "topk", "fraction": p / 100, "error_feedback": True,
                                   "values": "fp16", "indices": "rice"}
       for p in (1, 1.5, 2, 3, 4, 5)},
    "top-3 % + EF fp16": {"uplink": "topk", "fraction": 0.03, "error_feedback": True,
                          "values": "fp16"},
    "top-3 % + EF rice": {"uplink": "topk", "fraction": 0.03, "error_feedback": True,
                          "indices": "rice"},
    "random-10 % + EF": {"uplink": "randk", "fraction": 0.1, "error_feedback": True},
    "powersgd r=2 + EF": {"uplink": "powersgd", "rank": 2, "error_feedback": True},
    # downlink (EF21-P, consortium.compression.downlink): the broadcast model compressed
    "down fp16": {"downlink": "fp16"},
    "down int8": {"downlink": "int8"},
    "down int4": {"downlink": "int4"},
    "down int2": {"downlink": "int2"},
    "down qsgd 4-bit": {"downlink": "qsgd", "bits": 4},
    "down top-10 %": {"downlink": "topk", "fraction": 0.1},
    "int8 both ways": {"uplink": "int8", "downlink": "int8"},
    "down int8 (all 100 a round)": {"downlink": "int8"},
    "float32 (all 100 a round)": {},
    # per-client references (compression.downlink_reference): one message C(x − x̂ᵢ) a task
    **{f"down {name} per-client": {**down, "downlink_reference": "per_client"}
       for name, down in (
           ("fp16", {"downlink": "fp16"}), ("int8", {"downlink": "int8"}),
           ("int4", {"downlink": "int4"}), ("int2", {"downlink": "int2"}),
           ("qsgd 4-bit", {"downlink": "qsgd", "bits": 4}),
           ("top-10 %", {"downlink": "topk", "fraction": 0.1}))},
    "int8 both ways per-client": {"uplink": "int8", "downlink": "int8",
                                  "downlink_reference": "per_client"},
}

EVERYONE = ("down int8 (all 100 a round)", "float32 (all 100 a round)")
"""Rows run with every client every round (downlink catch-up costs nothing there)."""

WORKLOADS: dict[str, dict[str, Any]] = {
    "digits-cnn": {
        "data": {"dataset": "digits", "clients": 100, "partition": "dirichlet", "alpha": 0.3},
        "model": {"name": "cnn"},
        "algorithm": {"lr": 0.05, "batch_size": 16, "local_epochs": 1},
        "sampling": {"clients_per_round": 10},
    },
    "w1": {
        "data": {"dataset": "synthetic", "clients": 100, "alpha": 1.0, "beta": 1.0},
        "model": {"name": "logistic"},
        "algorithm": {"lr": 0.01, "batch_size": 10, "local_epochs": 1},
        "sampling": {"clients_per_round": 10},
    },
}


def run(workload: str, method: str, rounds: int, server: str = "sgd", seed: int = 0
        ) -> dict[str, Any]:
    import consortium

    cfg = {"seed": seed, "rounds": rounds, **WORKLOADS[workload],
           "evaluation": {"every": rounds}, "compression": METHODS[method]}
    if server != "sgd":  # e.g. avgm: server momentum (lr 1.0, momentum 0.9)
        cfg["server"] = {"optimizer": server}
    if method in EVERYONE:
        cfg["sampling"] = {"fraction": 1.0}
    start = time.perf_counter()
    try:
        result = consortium.simulate(cfg)
    except consortium.errors.ClientError as exc:  # the local loss diverged: recorded, not fatal
        return {"workload": workload, "method": method, "rounds": rounds, "accuracy": None,
                "bytes_up": None, "bytes_down": None, "diverged": str(exc),
                "wall_s": time.perf_counter() - start}
    up = sum(r["bytes_up"] for r in result.history)
    down = sum(r["bytes_down"] for r in result.history)
    return {"workload": workload, "method": method, "rounds": rounds,
            "accuracy": result.summary["final"]["accuracy"], "bytes_up": up, "bytes_down": down,
            "wall_s": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--workloads", default="digits-cnn,w1")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated names")
    parser.add_argument("--server", default="sgd",
                        help="server.optimizer of every run (sgd | avgm | adam ...); the ratio "
                             "and loss are against the first method run with the same one")
    parser.add_argument("--seed", type=int, default=0, help="the runs' seed (data split, "
                        "initial model, sampling)")
    parser.add_argument("--out", default=str(HERE / "results" / "compression.json"))
    args = parser.parse_args()
    rows = []
    for workload in args.workloads.split(","):
        base = None
        for method in args.methods.split(","):
            row = run(workload, method, args.rounds, args.server, args.seed)
            row["server"], row["seed"] = args.server, args.seed
            base = base or row
            if row["accuracy"] is None:
                rows.append(row)
                print(f"| {workload} | {method} | diverged: {row['diverged']} |", flush=True)
                continue
            row["ratio"] = base["bytes_up"] / row["bytes_up"]
            row["down_ratio"] = base["bytes_down"] / row["bytes_down"]
            row["loss_points"] = 100 * (base["accuracy"] - row["accuracy"])
            rows.append(row)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(rows, indent=2))
            print(f"| {workload} | {method} | {row['accuracy']:.3f} | {row['bytes_up']:,} | "
                  f"{row['ratio']:.1f}× | {row['loss_points']:+.1f} | {row['wall_s']:.1f} | "
                  f"{row['bytes_down']:,} | {row['down_ratio']:.2f}× |",
                  flush=True)


if __name__ == "__main__":
    main()
