"""Random-k through secure aggregation: bytes up and accuracy, SecAgg dense against SecAgg + randk.

Workloads: the heart-disease demo (four hospitals, every one every round) with the ``mlp``
model, or ``--dataset digits`` (iid over ``--clients``, every one every round) with
``--model`` (e.g. ``cnn``); ``--rounds`` rounds (default 30), secure aggregation at its
defaults (16 bits, full SecAgg), seed 0. Each row is one run:

- ``bytes_up / round``: what metrics.jsonl records (every SecAgg phase's replies: keys,
  encrypted shares, masked vectors, unmask shares), the mean over rounds;
- ``masked / round``: the masked-vector phase alone (counted from the replies, as
  :class:`~consortium.server.traffic.ExchangeTraffic` counts them), with its ratio to dense;
- accuracy and loss of the final global model on every hospital's test split.

The masked vector travels as uint32 (4 bytes a coordinate); before issue 17 it was counted
(and sent) as int64, twice this. ``randk`` rows send the round's shared ``k = fraction·d``
coordinates (scaled by ``d/k`` at the server, or with error feedback at the client).

Run:  OMP_NUM_THREADS=1 python benchmarks/secure_compression.py [--rounds 30] [--model mlp]
      OMP_NUM_THREADS=1 python benchmarks/secure_compression.py --dataset digits --model cnn \
          --out benchmarks/results/secure_compression_digits.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import consortium
from consortium.server import loop as loop_module
from consortium.server.traffic import ExchangeTraffic, payload_nbytes

HERE = Path(__file__).resolve().parent

ROWS: dict[str, dict[str, Any]] = {
    "SecAgg dense": {"uplink": "none"},
    "SecAgg + randk 0.25": {"uplink": "randk", "fraction": 0.25},
    "SecAgg + randk 0.25 + EF": {"uplink": "randk", "fraction": 0.25, "error_feedback": True},
    "SecAgg + randk 0.1": {"uplink": "randk", "fraction": 0.1},
    "SecAgg + randk 0.1 + EF": {"uplink": "randk", "fraction": 0.1, "error_feedback": True},
}


def run(name: str, compression: dict[str, Any], *, rounds: int, model: str,
        data: dict[str, Any]) -> dict[str, Any]:
    masked = [0]

    class Counted(ExchangeTraffic):
        def wrap(self, exchange):  # type: ignore[no-untyped-def]
            def counted(stage, phase, messages):  # type: ignore[no-untyped-def]
                for cid, reply in exchange(stage, phase, messages):
                    if phase == "masked":
                        masked[0] += (len(stage) + len(phase) + 8 + len(cid)
                                      + payload_nbytes(reply))
                    yield cid, reply

            return super().wrap(counted)

    original = loop_module.ExchangeTraffic
    loop_module.ExchangeTraffic = Counted  # type: ignore[misc]
    try:
        start = time.perf_counter()
        result = consortium.simulate({
            "rounds": rounds, "seed": 0, "model": {"name": model}, "data": data,
            "evaluation": {"baselines": [], "every": rounds},
            "secure_aggregation": {"enabled": True}, "compression": compression,
        })
        seconds = time.perf_counter() - start
    finally:
        loop_module.ExchangeTraffic = original  # type: ignore[misc]
    history = result.history
    return {
        "name": name, "d": result.params.layout.size,
        "bytes_up_per_round": sum(h["bytes_up"] for h in history) / len(history),
        "masked_per_round": masked[0] / len(history),
        "accuracy": result.summary["final"]["accuracy"],
        "loss": history[-1]["loss"], "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--dataset", default="heart-disease",
                        help="heart-disease (its four hospitals) or digits (iid over --clients)")
    parser.add_argument("--clients", type=int, default=8, help="digits' clients, all a round")
    parser.add_argument("--out", default=str(HERE / "results" / "secure_compression.json"))
    args = parser.parse_args()
    data: dict[str, Any] = {"dataset": args.dataset}
    if args.dataset != "heart-disease":
        data.update(partition="iid", clients=args.clients)
    rows = [run(name, c, rounds=args.rounds, model=args.model, data=data)
            for name, c in ROWS.items()]
    dense = rows[0]
    print(f"{args.dataset}, {args.model} (d = {dense['d']}), {args.rounds} rounds, "
          f"{data.get('clients', 4)} clients every round")
    print(f"{'run':28} {'bytes_up/round':>15} {'masked/round':>13} {'masked ratio':>12} "
          f"{'accuracy':>9} {'loss':>7} {'s':>6}")
    for r in rows:
        r["masked_ratio"] = dense["masked_per_round"] / r["masked_per_round"]
        print(f"{r['name']:28} {r['bytes_up_per_round']:15,.0f} {r['masked_per_round']:13,.0f} "
              f"{r['masked_ratio']:11.2f}x {r['accuracy']:9.4f} {r['loss']:7.4f} "
              f"{r['seconds']:6.1f}")
    out = Path(args.out)
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"rounds": args.rounds, "model": args.model, "data": data,
                               "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
