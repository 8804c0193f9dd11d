"""How often the update norm bound would touch honest updates, and what it does to attacks.

Part 1 (choosing the default multiple): honest FedAvg runs record every update's norm and its
round's median; the table gives the share of honest updates that a bound of 2, 3 and 4 times
the median would have scaled down (on the unbounded, honest trajectory).

Part 2: one attacking client among the heart-disease demo's four hospitals, final accuracy
with the plain mean, with the bound at the default multiple, and without an attacker.

Run:  PYTHONPATH=src python benchmarks/update_bound.py [--out benchmarks/out/update_bound.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

import consortium  # noqa: E402
from consortium.aggregation.base import Pipeline, RoundContext  # noqa: E402
from consortium.aggregation.bound import DEFAULT_MULTIPLIER, median, update_norm  # noqa: E402
from consortium.aggregation.mean import weighted_mean  # noqa: E402
from consortium.types import Update  # noqa: E402

MULTIPLES = (2.0, 3.0, 4.0)
HONEST = {
    "heart-disease, 4 hospitals": {},
    "digits, dirichlet α=0.5, 10 clients": {
        "data": {"dataset": "digits", "partition": "dirichlet", "clients": 10, "alpha": 0.5},
        "model": {"name": "mlp"},
    },
    "breast-cancer, quantity σ=1, 10 clients": {
        "data": {"dataset": "breast-cancer", "partition": "quantity", "clients": 10,
                 "quantity_sigma": 1.0},
    },
    "synthetic(1, 1), 10 clients": {
        "data": {"dataset": "synthetic", "clients": 10, "alpha": 1.0, "beta": 1.0},
    },
}
ATTACKS = {
    "scaling ×4": {"kind": "scaling", "factor": 4.0},
    "model replacement (γ = n)": {"kind": "scaling"},
    "sign-flip ×20": {"kind": "sign-flip", "scale": 20.0},
    "gaussian σ=200": {"kind": "gaussian", "sigma": 200.0},
}


class NormRecorder:
    """The weighted mean, recording each round's ratios ‖Δᵢ‖ / median‖Δ‖."""

    name = "weighted_mean"
    needs: frozenset[str] = frozenset()
    linear = True

    def __init__(self) -> None:
        self.ratios: list[float] = []

    def aggregate(self, updates: list[Update], *, ctx: RoundContext) -> Any:
        sizes = [update_norm(u.delta) for u in updates]
        mid = median(sizes)
        self.ratios += [s / mid if mid > 0 else 1.0 for s in sizes]
        mean = weighted_mean()
        acc = mean.start(ctx.layout)
        for u in updates:
            acc = mean.accumulate(acc, u)
        return mean.finalize(acc)


def honest_table(rounds: int) -> dict[str, Any]:
    out = {}
    for label, cfg in HONEST.items():
        recorder = NormRecorder()
        result = consortium.simulate(
            {**cfg, "rounds": rounds, "evaluation": {"baselines": []}},
            pipeline=Pipeline(aggregator=recorder),
        )
        n = len(recorder.ratios)
        out[label] = {
            "updates": n,
            "max_ratio": max(recorder.ratios),
            "accuracy": result.summary["final"].get("accuracy"),
            **{f"clipped_at_{m:g}": sum(r > m for r in recorder.ratios) / n for m in MULTIPLES},
        }
        print(f"{label:40s} {n:5d} updates  " + "  ".join(
            f"×{m:g}: {out[label][f'clipped_at_{m:g}']:6.2%}" for m in MULTIPLES
        ) + f"  max ratio {out[label]['max_ratio']:.2f}", flush=True)
    return out


def attack_table(rounds: int) -> dict[str, Any]:
    base = {"rounds": rounds, "evaluation": {"baselines": []}}
    clean = consortium.simulate(base).summary["final"]["accuracy"]
    print(f"{'no attacker':30s} accuracy {clean:.3f}")
    out: dict[str, Any] = {"no attacker": clean}
    for label, attack in ATTACKS.items():
        row = {}
        for bound in (0.0, DEFAULT_MULTIPLIER):
            cfg = {**base, "attack": {**attack, "ids": ["cleveland"]},
                   "aggregation": {"update_bound": bound}}
            row[f"bound {bound:g}"] = consortium.simulate(cfg).summary["final"]["accuracy"]
        out[label] = row
        print(f"{label:30s} " + "  ".join(f"{k}: {v:.3f}" for k, v in row.items()), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--out", default=str(HERE / "out" / "update_bound.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    report = {"rounds": args.rounds, "honest": honest_table(args.rounds),
              "attacks": attack_table(args.rounds)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
