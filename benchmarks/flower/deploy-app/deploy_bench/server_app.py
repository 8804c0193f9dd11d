"""The ServerApp: Flower's own FedAvg over every connected node, timed per round.

FedAvg (McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
Decentralized Data") from ``flwr.serverapp.strategy``, unchanged except for two things a
subclass adds: federated evaluation only in the last round (as benchmarks/deployment.py's
consortium runs do), and one JSON line per round appended to ``log-path``:
``{"round", "clients", "eval_clients", "failed" (node id -> reason), "wall_s"}``, where ``wall_s`` runs from the
moment the round's nodes are sampled to the end of its aggregation (evaluation included).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from deploy_bench.model import initial_arrays

app = ServerApp()


class TimedFedAvg(FedAvg):
    """FedAvg that evaluates only in the last round and logs each round's wall time."""

    def __init__(self, *, log_path: str, num_rounds: int, nodes: int) -> None:
        super().__init__(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=nodes,
                         min_evaluate_nodes=nodes, min_available_nodes=nodes)
        self.log_path, self.num_rounds = log_path, num_rounds
        self.t_start = 0.0
        self.trained = 0
        self.failed: dict[str, str] = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        messages = super().configure_train(server_round, arrays, config, grid)
        self.t_start = time.monotonic()
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        self.trained = sum(1 for m in replies if not m.has_error())
        self.failed = {str(m.metadata.src_node_id): m.error.reason for m in replies if m.has_error()}
        return super().aggregate_train(server_round, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        if server_round < self.num_rounds:
            return []
        return super().configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        metrics = super().aggregate_evaluate(server_round, replies)
        line = {"round": server_round, "clients": self.trained, "eval_clients": len(replies),
                "failed": self.failed, "wall_s": time.monotonic() - self.t_start}
        if self.log_path:
            with open(self.log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(line) + "\n")
        return metrics


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run ``num-rounds`` rounds of FedAvg over ``min-nodes`` nodes, all sampled every round."""
    cfg = context.run_config
    rounds, nodes = int(cfg["num-rounds"]), int(cfg["min-nodes"])
    strategy = TimedFedAvg(log_path=str(cfg["log-path"]), num_rounds=rounds, nodes=nodes)
    start = initial_arrays(int(cfg["input-dim"]), int(cfg["classes"]))
    arrays = ArrayRecord({k: Array(v) for k, v in start.items()})
    strategy.start(grid=grid, initial_arrays=arrays, num_rounds=rounds, timeout=3600)
