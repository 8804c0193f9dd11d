"""Privacy–utility: final accuracy against epsilon for central DP-FedAvg.

Two federations:

- the four hospitals of the UCI Heart Disease data (the demo: logistic regression, every
  site in every round, 30 rounds);
- digits split IID over 100 clients (logistic regression, Poisson sampling q = 0.1, 50 rounds).

For each, the run without DP and runs with several noise multipliers (fixed clip norm), each
over three seeds; epsilon at delta = 1e-5 from the RDP accountant. Prints a table, writes JSON
and a plot.

Run:  python benchmarks/privacy.py [--out benchmarks/out/privacy.json]
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

import consortium  # noqa: E402

SETUPS = {
    "heart-disease (4 hospitals)": {
        "config": {"evaluation": {"baselines": []}},
        "clip": 0.5,
        "noise": [0.0, 0.5, 1.0, 2.0, 4.0],
    },
    "digits (100 clients, q = 0.1)": {
        "config": {
            "rounds": 50,
            "data": {"dataset": "digits", "partition": "iid", "clients": 100},
            "algorithm": {"lr": 0.1, "local_epochs": 1, "batch_size": 16},
            "sampling": {"fraction": 0.1, "clients_per_round": 0},
            "evaluation": {"baselines": [], "every": 50},
        },
        "clip": 1.0,
        "noise": [0.0, 0.3, 0.5, 1.0, 2.0],
    },
}
SEEDS = (0, 1, 2)


def run(setup: dict, noise: float, seed: int) -> tuple[float, float | None]:
    """One run over the embedded demo config with this setup's changes."""
    cfg = {**setup["config"], "seed": seed}
    if noise > 0:
        cfg["privacy"] = {"mode": "central", "noise_multiplier": noise, "clip": setup["clip"]}
    overrides = [f"{k}={json.dumps(v)}" for k, v in _flatten(cfg).items()]
    result = consortium.simulate(None, overrides=overrides)
    return result.summary["final"]["accuracy"], result.summary["privacy"]["epsilon"]


def _flatten(cfg: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in cfg.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(HERE / "out" / "privacy.json"))
    parser.add_argument("--plot", default=str(HERE / "results" / "privacy.png"))
    args = parser.parse_args()
    rows = []
    print(f"{'federation':<30} {'noise z':>7} {'epsilon':>9} {'accuracy':>16}")
    for name, setup in SETUPS.items():
        for z in setup["noise"]:
            start = time.perf_counter()
            accs, eps = [], None
            for seed in SEEDS:
                acc, eps = run(setup, z, seed)
                accs.append(acc)
            mean, sd = statistics.fmean(accs), statistics.stdev(accs)
            rows.append({"federation": name, "noise_multiplier": z, "epsilon": eps,
                         "accuracy_mean": mean, "accuracy_sd": sd, "accuracies": accs,
                         "seconds": time.perf_counter() - start})
            eps_text = "∞ (no DP)" if eps is None else f"{eps:.3g}"
            print(f"{name:<30} {z:>7.2f} {eps_text:>9} {mean:>8.3f} ± {sd:.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))
    _plot(rows, Path(args.plot))
    print(f"\nwrote {args.out} and {args.plot}")


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SETUPS), figsize=(10, 3.8))
    for ax, name in zip(axes, SETUPS):
        mine = [r for r in rows if r["federation"] == name]
        dp = [r for r in mine if r["epsilon"] is not None]
        base = [r for r in mine if r["epsilon"] is None]
        ax.errorbar([r["epsilon"] for r in dp], [r["accuracy_mean"] for r in dp],
                    yerr=[r["accuracy_sd"] for r in dp], marker="o", capsize=3, label="DP-FedAvg")
        for r in base:
            ax.axhline(r["accuracy_mean"], color="grey", linestyle="--", label="no DP")
        for r in dp:
            ax.annotate(f"z={r['noise_multiplier']:g}", (r["epsilon"], r["accuracy_mean"]),
                        textcoords="offset points", xytext=(4, -10), fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel("epsilon (δ = 1e-5, RDP)")
        ax.set_ylabel("final accuracy")
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
