#!/usr/bin/env python3
"""Write a small, valid benchmark .npz (random but learnable data) to smoke-test worker.py.

Usage:  python benchmarks/flower/make_test_data.py OUT.npz --clients N [options]

Labels come from a random linear teacher (argmax of x·W + noise), each client's features
are shifted by its own offset, and client sizes follow the benchmark's W1 rule
``max(10, LogNormal(ln 50 - 1/2, 1))`` split 80/20 into train/test. Only numpy is needed.
The defaults give a 3-round logistic run; ``--rounds 20 --fraction 0.1 --batch-size 10
--lr 0.01`` with the default 60 features and 10 classes is W1-shaped.
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np


def make(args: argparse.Namespace) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(args.seed)
    if args.model == "cnn":
        shape = [1, args.image_size, args.image_size]
    else:
        shape = [args.features]
    dim = math.prod(shape)
    teacher = rng.normal(size=(dim, args.classes)) / math.sqrt(dim)
    sizes = np.maximum(10, rng.lognormal(math.log(50) - 0.5, 1.0, args.clients).astype(int))

    parts: dict[str, list[np.ndarray]] = {"x_train": [], "y_train": [], "x_test": [], "y_test": []}
    train_sizes, test_sizes = [], []
    for size in sizes:
        shift = rng.normal(scale=0.5, size=dim)
        x = (rng.normal(size=(size, dim)) + shift).astype(np.float32)
        logits = x @ teacher + rng.normal(scale=0.1, size=(size, args.classes))
        y = logits.argmax(1).astype(np.int64)
        cut = max(1, int(round(0.8 * size)))
        parts["x_train"].append(x[:cut])
        parts["y_train"].append(y[:cut])
        parts["x_test"].append(x[cut:])
        parts["y_test"].append(y[cut:])
        train_sizes.append(cut)
        test_sizes.append(size - cut)

    meta = {
        "model": args.model,
        "input_shape": shape,
        "num_classes": args.classes,
        "rounds": args.rounds,
        "fraction": args.fraction,
        "clients_per_round": max(1, math.ceil(args.fraction * args.clients)),
        "local_epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "clients": args.clients,
        "workload": "flower-smoke-test",
    }
    out = {k: np.concatenate(v).reshape(-1, *shape) if k.startswith("x") else np.concatenate(v)
           for k, v in parts.items()}
    out["train_offsets"] = np.concatenate([[0], np.cumsum(train_sizes)]).astype(np.int64)
    out["test_offsets"] = np.concatenate([[0], np.cumsum(test_sizes)]).astype(np.int64)
    out["meta"] = np.array(json.dumps(meta))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="where to write the .npz")
    parser.add_argument("--clients", type=int, required=True)
    parser.add_argument("--model", choices=("logistic", "cnn"), default="logistic")
    parser.add_argument("--features", type=int, default=60, help="logistic input size")
    parser.add_argument("--image-size", type=int, default=8, help="cnn: 1×S×S images")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.clients < 1:
        parser.error("--clients must be at least 1")
    np.savez(args.out, **make(args))
    print(f"wrote {args.out}: {args.clients} clients, {args.model}, {args.rounds} rounds")


if __name__ == "__main__":
    main()
